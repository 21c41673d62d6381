"""API keys: made from `secrets`, stored only as a SHA-256 digest, found by digest."""

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import bindparam, select, update
from werkzeug.datastructures import Authorization

from app.extensions import db
from app.models import ApiKey, Team, User, utcnow

KEY_PREFIX = "kp_live_"
# 32 random bytes give 43 URL-safe characters.
RANDOM_BYTES = 32
DISPLAY_CHARS = 4
MAX_KEY_LENGTH = 200


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate() -> str:
    """A new key secret: `kp_live_` and 43 random URL-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(RANDOM_BYTES)


def create_key(team: Team, made_by: User, name: str) -> tuple[ApiKey, str]:
    """Add a key of `team`, made by its member `made_by`, to the session; return it with its secret,
    which is never stored."""
    secret = generate()
    key = ApiKey(
        team=team,
        created_by=made_by,
        name=name.strip()[:100],
        prefix=secret[: len(KEY_PREFIX) + DISPLAY_CHARS],
        digest=digest(secret),
    )
    db.session.add(key)
    return key, secret


def stored_digest(secret: str) -> str | None:
    """The digest a key with this secret is stored under; None for what cannot be a key at all."""
    return digest(secret) if secret.startswith(KEY_PREFIX) and len(secret) <= MAX_KEY_LENGTH else None


# Built once: every API request runs it, and a prebuilt statement skips SQLAlchemy's per-call cache keying.
_FIND = (
    select(
        ApiKey.id.label("key_id"),
        ApiKey.revoked_at,
        ApiKey.last_used_at,
        Team.id.label("team_id"),
        ApiKey.created_by_id,
        Team.balance,
        Team.unlimited,
        # Set when an admin disabled the person who made the key.
        User.disabled_at,
        # Set when an admin disabled the team.
        Team.disabled_at.label("team_disabled_at"),
    )
    .join(Team, ApiKey.team_id == Team.id)
    .join(User, ApiKey.created_by_id == User.id)
    .where(ApiKey.digest == bindparam("digest"))
)


class Caller(NamedTuple):
    """An API key and the team it spends for, as one lookup found them."""

    key_id: int
    revoked_at: datetime | None
    last_used_at: datetime | None
    team_id: int
    # Who made the key: the member its requests are recorded under.
    created_by_id: int
    balance: int
    unlimited: bool
    # Set when an admin disabled the person who made the key: refused like a revoked key.
    disabled_at: datetime | None = None
    # Set when an admin disabled the team: every key of it is refused.
    team_disabled_at: datetime | None = None


class KeyRefused(Exception):
    """No usable key on the request: missing, malformed, unknown or revoked (answered 401)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


BEARER_HINT = "Send your key as 'Authorization: Bearer kp_live_…'."


def authenticate(authorization: Authorization | None, resolution_seconds: int) -> Caller:
    """The caller of a request, looked up now from its bearer key; KeyRefused otherwise.

    Every API request goes through here before anything else, so no work is ever
    started for a key that this request has not confirmed. A use of the key is
    recorded at most once per `resolution_seconds` (the caller commits it).
    """
    if authorization is None or (authorization.type == "bearer" and not authorization.token):
        raise KeyRefused(f"Missing API key. {BEARER_HINT}")
    if authorization.type != "bearer":
        raise KeyRefused(f"Malformed Authorization header. {BEARER_HINT}")
    key_digest = stored_digest(authorization.token)
    caller = lookup(key_digest) if key_digest else None
    if caller is None:
        raise KeyRefused("Invalid API key.")
    if caller.revoked_at is not None:
        raise KeyRefused("This API key has been revoked.")
    if caller.disabled_at is not None:
        raise KeyRefused("This account is disabled. Contact the operator of this service.")
    if caller.team_disabled_at is not None:
        raise KeyRefused("This key's team is disabled. Contact the operator of this service.")
    touch(caller.key_id, caller.last_used_at, resolution_seconds)
    return caller


def lookup(key_digest: str) -> Caller | None:
    """The key with this digest and its team, revoked or not.

    One round trip on a connection of its own in autocommit (a single read needs no
    transaction), given back at once, so no connection is held while the caller waits
    on anything else.
    """
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        row = connection.execute(_FIND, {"digest": key_digest}).first()
    return Caller(*row) if row else None


def touch(key_id: int, last_used_at: datetime | None, resolution_seconds: int, now: datetime | None = None) -> bool:
    """Record that the key was used, at most once per `resolution_seconds`.

    Returns True when a write was queued, so a busy key costs one write a minute,
    not one per request.
    """
    now = now or utcnow()
    if last_used_at is not None and now - last_used_at < timedelta(seconds=resolution_seconds):
        return False
    db.session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
    return True


def revoke(key: ApiKey) -> bool:
    """Revoke `key`; False when it was revoked already."""
    if key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True
