"""API keys: made from `secrets`, stored only as a SHA-256 digest, found by digest; and what a key may do.

A key's controls, all optional, are checked here and nowhere else:

    expiry              after `expires_at` it is refused (401 key_expired), before any work
    allowed addresses   addresses and CIDR ranges its requests may come from (403 ip_not_allowed)
    allowed voices      and models: what its speech requests may ask for, after OpenAI's names
                        are resolved (403 voice_not_allowed, model_not_allowed)
    spending limit      credits per lifetime, UTC day, ISO week or month; counted in `spent` by
                        `count_use` in the debit's own transaction, so it is never overshot, and
                        given back by `give_back` with a refund (402 key_limit_reached)
    rolling             a new secret; the previous one works for a grace period, then 401 key_rolled

A key's `spent` counts its use in one window ("day:2026-12-03", "week:2026-W49", "month:2026-12" or
"lifetime"): a debit in another window than the one stored starts the count again, so a period
resets exactly at its boundary with no job to run.
"""

import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from sqlalchemy import and_, bindparam, case, func, literal, or_, select, update
from werkzeug.datastructures import Authorization

from app import catalog
from app.extensions import db
from app.models import ApiKey, KeyKind, LimitPeriod, SpeechRequest, Team, User, utcnow

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


def create_key(
    team: Team, made_by: User, name: str, kind: str = KeyKind.SPEECH, controls: "Controls | None" = None
) -> tuple[ApiKey, str]:
    """Add a key of `team`, made by its member `made_by`, to the session; return it with its secret,
    which is never stored."""
    secret = generate()
    key = ApiKey(
        team=team,
        created_by=made_by,
        name=" ".join(name.split())[:100],
        kind=kind,
        prefix=_prefix(secret),
        digest=digest(secret),
        spent=0,
        spent_window=LIFETIME_WINDOW,
    )
    db.session.add(key)
    if controls is not None:
        _apply(key, controls)
        key.spent_window = window(key.spend_period, utcnow())
    return key, secret


def _prefix(secret: str) -> str:
    return secret[: len(KEY_PREFIX) + DISPLAY_CHARS]


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
        ApiKey.kind,
        ApiKey.expires_at,
        ApiKey.allowed_ips,
        ApiKey.allowed_voices,
        ApiKey.allowed_models,
        ApiKey.spend_limit,
        ApiKey.spend_period,
        ApiKey.spent,
        ApiKey.spent_window,
        # The secret sent is the key's previous one (rolled): it works until `previous_expires_at`.
        (ApiKey.digest != bindparam("digest")).label("previous_secret"),
        ApiKey.previous_expires_at,
    )
    .join(Team, ApiKey.team_id == Team.id)
    .join(User, ApiKey.created_by_id == User.id)
    .where(or_(ApiKey.digest == bindparam("digest"), ApiKey.previous_digest == bindparam("digest")))
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
    kind: str = KeyKind.SPEECH
    expires_at: datetime | None = None
    allowed_ips: str | None = None
    allowed_voices: str | None = None
    allowed_models: str | None = None
    spend_limit: int | None = None
    spend_period: str | None = None
    spent: int = 0
    spent_window: str = "lifetime"
    previous_secret: bool = False
    previous_expires_at: datetime | None = None


class KeyRefused(Exception):
    """No usable key on the request: missing, malformed, unknown, revoked, expired or rolled (answered 401)."""

    status = 401

    def __init__(self, detail: str, code: str | None = None, known: bool = True):
        super().__init__(detail)
        self.detail = detail
        # The error's `code` (None: invalid_api_key).
        self.code = code
        # A key of ours (revoked, expired, rolled, disabled), not a guess: not counted as guessing keys.
        self.known = known


class KeyForbidden(KeyRefused):
    """A usable key, sent from an address it may not be used from (answered 403)."""

    status = 403


BEARER_HINT = "Send your key as 'Authorization: Bearer kp_live_…'."


def authenticate(authorization: Authorization | None, resolution_seconds: int, address: str | None = None) -> Caller:
    """The caller of a request from `address`, looked up now from its bearer key; KeyRefused otherwise
    (KeyForbidden for an address the key may not be used from).

    Every API request goes through here before anything else, so no work is ever
    started for a key that this request has not confirmed. A use of the key is
    recorded at most once per `resolution_seconds` (the caller commits it).
    """
    if authorization is None or (authorization.type == "bearer" and not authorization.token):
        raise KeyRefused(f"Missing API key. {BEARER_HINT}", known=False)
    if authorization.type != "bearer":
        raise KeyRefused(f"Malformed Authorization header. {BEARER_HINT}", known=False)
    key_digest = stored_digest(authorization.token)
    caller = lookup(key_digest) if key_digest else None
    if caller is None:
        raise KeyRefused("Invalid API key.", known=False)
    if caller.revoked_at is not None:
        raise KeyRefused("This API key has been revoked.")
    if caller.disabled_at is not None:
        raise KeyRefused("This account is disabled. Contact the operator of this service.")
    if caller.team_disabled_at is not None:
        raise KeyRefused("This key's team is disabled. Contact the operator of this service.")
    now = utcnow()
    if caller.expires_at is not None and caller.expires_at <= now:
        raise KeyRefused(f"This API key expired at {moment(caller.expires_at)}.", "key_expired")
    if caller.previous_secret and caller.previous_expires_at <= now:
        raise KeyRefused(
            f"This secret was replaced when the key was rolled; it stopped working at "
            f"{moment(caller.previous_expires_at)}. Use the key's new secret.",
            "key_rolled",
        )
    if not address_allowed(caller.allowed_ips, address):
        raise KeyForbidden(f"This key may not be used from {address or 'an unknown address'}.", "ip_not_allowed")
    touch(caller.key_id, caller.last_used_at, resolution_seconds)
    return caller


def moment(when: datetime | None) -> str | None:
    """A time as the API states it: ISO 8601 in UTC, to the second (None for none)."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else None


def lookup(key_digest: str) -> Caller | None:
    """The key with this digest and its team, revoked or not.

    One round trip on a connection of its own in autocommit (a single read needs no
    transaction), given back at once, so no connection is held while the caller waits
    on anything else.
    """
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        row = connection.execute(_FIND, {"digest": key_digest}).first()
    # SQLite answers the comparison `previous_secret` as 0 or 1.
    return Caller(*row[:-2], bool(row[-2]), row[-1]) if row else None


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


class KeyChanged(Exception):
    """The key was rolled by someone else between reading it and rolling it: nothing was changed."""


def roll(key: ApiKey, grace: timedelta) -> str:
    """Give `key` a new secret, returned (never stored); the current one keeps working for `grace`
    (zero: it stops now), then gets 401 key_rolled.

    The secret before the current one, if any, is forgotten (401 invalid_api_key): a key has at most
    two working secrets. The key's row is locked and read afresh first, and the change applies only
    to the secret read, so two rolls at once never hand out a secret that does not work: the second
    starts from the first's (KeyChanged where the database cannot lock a row and they crossed).
    """
    if grace < timedelta(0) or grace > MAX_ROLL_GRACE:
        raise ValueError(f"the grace period must be between 0 and {MAX_ROLL_GRACE.days} days")
    lock(key)
    secret = generate()
    now = utcnow()
    rolled = db.session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id, ApiKey.digest == key.digest)
        .values(
            previous_digest=key.digest,
            previous_prefix=key.prefix,
            previous_expires_at=now + grace,
            digest=digest(secret),
            prefix=_prefix(secret),
            rolled_at=now,
        )
    )
    if rolled.rowcount != 1:
        raise KeyChanged(f"key {key.id} was rolled meanwhile")
    return secret


MAX_ROLL_GRACE = timedelta(days=7)


# --- Spending limits: windows, counted with each debit and refund ---------------------------------

LIFETIME_WINDOW = "lifetime"


def window(period: str | None, now: datetime) -> str:
    """The name of the window of `period` that `now` falls in ("lifetime" for no period)."""
    now = now.astimezone(timezone.utc)
    if period == LimitPeriod.DAY:
        return f"day:{now:%Y-%m-%d}"
    if period == LimitPeriod.WEEK:
        year, week, _ = now.isocalendar()
        return f"week:{year}-W{week:02d}"
    if period == LimitPeriod.MONTH:
        return f"month:{now:%Y-%m}"
    return LIFETIME_WINDOW


def window_bounds(period: str | None, now: datetime) -> tuple[datetime | None, datetime | None]:
    """When the window of `period` that `now` falls in started and when it ends (None: never)."""
    now = now.astimezone(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == LimitPeriod.DAY:
        return day, day + timedelta(days=1)
    if period == LimitPeriod.WEEK:
        monday = day - timedelta(days=now.weekday())
        return monday, monday + timedelta(weeks=1)
    if period == LimitPeriod.MONTH:
        first = day.replace(day=1)
        following = (
            first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
        )
        return first, following
    return None, None


def window_range(name: str) -> tuple[datetime | None, datetime | None]:
    """When the window named `name` (as `window` names it) starts and ends (None: never)."""
    if name == LIFETIME_WINDOW:
        return None, None
    period, _, when = name.partition(":")
    if period == LimitPeriod.WEEK:
        year, week = when.split("-W")
        moment_in = datetime.fromisocalendar(int(year), int(week), 1)
    elif period == LimitPeriod.MONTH:
        moment_in = datetime.strptime(when + "-01", "%Y-%m-%d")
    else:
        moment_in = datetime.strptime(when, "%Y-%m-%d")
    return window_bounds(period, moment_in.replace(tzinfo=timezone.utc))


def _window_params(now: datetime) -> dict:
    return {period.value: window(period, now) for period in (LimitPeriod.DAY, LimitPeriod.WEEK, LimitPeriod.MONTH)}


_keys = ApiKey.__table__
# The window a time falls in for the key's own period, computed in the statement from the key's row as
# it is when the row is locked: a period changed meanwhile is the one that counts.
_WINDOW_THEN = case(
    *(
        (_keys.c.spend_period == period.value, bindparam(period.value))
        for period in (LimitPeriod.DAY, LimitPeriod.WEEK, LimitPeriod.MONTH)
    ),
    else_=literal(LIFETIME_WINDOW),
)
# Whether the key's stored count is of that window or a later one of the same period: names of one
# period's windows sort as their times do ("day:2026-12-03" < "day:2026-12-04"), and their first four
# letters name the period.
_STORED_NOT_EARLIER = and_(
    _keys.c.spent_window >= _WINDOW_THEN,
    func.substr(_keys.c.spent_window, 1, 4) == func.substr(_WINDOW_THEN, 1, 4),
)
# The window a debit counts in: its own, or the key's stored one when that is later. A clock a few
# milliseconds behind another gateway's, around a boundary, never takes the count back a period.
_COUNTED_WINDOW = case((_STORED_NOT_EARLIER, _keys.c.spent_window), else_=_WINDOW_THEN)
# What the key has spent in that window: nothing yet when the stored count is an earlier window's.
_SPENT_SO_FAR = case((_STORED_NOT_EARLIER, _keys.c.spent), else_=0)
# Counts a debit, only while the key's limit covers it: no interleaving of debits can overshoot it.
_COUNT_USE = (
    update(_keys)
    .where(
        _keys.c.id == bindparam("key_id"),
        or_(_keys.c.spend_limit.is_(None), _SPENT_SO_FAR + bindparam("credits") <= _keys.c.spend_limit),
    )
    .values(spent=_SPENT_SO_FAR + bindparam("credits"), spent_window=_COUNTED_WINDOW)
    .returning(_keys.c.spent_window)
)
# A refund gives back to the window its debit was counted in, if that is still the key's current one.
_GIVE_BACK = (
    update(_keys)
    .where(_keys.c.id == bindparam("key_id"), _keys.c.spent_window == _WINDOW_THEN)
    .values(spent=_keys.c.spent - bindparam("credits"))
)


class KeyLimitReached(Exception):
    """The key's spending limit does not cover this request."""

    def __init__(self, limit: int, spent: int, cost: int, resets_at: datetime | None):
        super().__init__(f"key limit {limit}: {spent} spent, {cost} asked")
        self.limit = limit
        self.spent = spent
        self.cost = cost
        self.resets_at = resets_at


def count_use(key_id: int, credits: int, now: datetime) -> datetime:
    """Count a debit of `credits` made `now` against the key's limit, in the debit's transaction; the time
    the debit counts at: `now`, or the start of the later window the key has reached (a clock behind).

    The debit's request is dated at that time, so its date always falls in the window it was counted
    in, which refunds, a new limit's count and the audit all go by. Raises KeyLimitReached, with nothing
    counted, when the limit does not cover it; the caller rolls back. Concurrent debits of one key are
    counted one by one: the key's row is locked by the UPDATE, and PostgreSQL checks its condition again
    on the row as the previous debit left it.
    """
    windows_now = _window_params(now)
    counted = db.session.execute(_COUNT_USE, {"key_id": key_id, "credits": credits, **windows_now}).first()
    if counted is not None:
        if counted.spent_window == LIFETIME_WINDOW or counted.spent_window in windows_now.values():
            return now
        # A later window than `now`'s: dated at its start.
        return window_range(counted.spent_window)[0]
    key = db.session.get(ApiKey, key_id)
    if key is None:
        raise LookupError(f"no key {key_id}")
    raise KeyLimitReached(key.spend_limit, use_now(key, now), credits, window_bounds(key.spend_period, now)[1])


def give_back(key_id: int, credits: int, charged_at: datetime) -> None:
    """A refund of `credits` of a debit made at `charged_at`: the key's use goes down by as much,
    if the debit was counted in the window the key counts now (a later window never saw it)."""
    db.session.execute(_GIVE_BACK, {"key_id": key_id, "credits": credits, **_window_params(charged_at)})


def use_now(key: ApiKey | Caller, now: datetime | None = None) -> int:
    """What the key has spent in its current window."""
    return key.spent if key.spent_window == window(key.spend_period, now or utcnow()) else 0


def recorded_use(key_id: int, window_name: str) -> int:
    """What the key's requests dated in the window `window_name` cost, less their refunds, from the requests."""
    start, end = window_range(window_name)
    query = select(func.coalesce(func.sum(SpeechRequest.credits - SpeechRequest.credits_refunded), 0)).where(
        SpeechRequest.api_key_id == key_id
    )
    if start is not None:
        query = query.where(SpeechRequest.created_at >= start, SpeechRequest.created_at < end)
    return db.session.scalar(query)


def limit_resets_at(key: ApiKey | Caller, now: datetime | None = None) -> datetime | None:
    """When the key's limit starts again (None: no limit, or a lifetime one)."""
    if key.spend_limit is None:
        return None
    return window_bounds(key.spend_period, now or utcnow())[1]


# --- Controls: read from a form or the API, applied to a key ---------------------------------------

# A voice or model name as a key's allowed list holds it: one voice (no blend, sign or weight), one model.
_VOICE_NAME = re.compile(r"[A-Za-z0-9_.:]{1,100}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.:\-/]{1,100}")
MAX_LIST_ENTRIES = 50
MAX_LIMIT = 10**12


@dataclass(frozen=True)
class Controls:
    """What a key may do, as checked values: each None means no restriction."""

    spend_limit: int | None = None
    spend_period: str | None = None
    expires_at: datetime | None = None
    allowed_ips: str | None = None
    allowed_voices: str | None = None
    allowed_models: str | None = None


class BadControl(ValueError):
    """A control that cannot be set; `field` names it and the message says why, for people."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def controls_of(key: ApiKey) -> Controls:
    return Controls(
        key.spend_limit, key.spend_period, key.expires_at, key.allowed_ips, key.allowed_voices, key.allowed_models
    )


def read_controls(
    *,
    spend_limit=None,
    spend_period=None,
    expires_at=None,
    allowed_ips=None,
    allowed_voices=None,
    allowed_models=None,
    now: datetime | None = None,
) -> Controls:
    """Controls from what a person or a program sent: BadControl names the first field that is wrong.

    Lists may be strings (split on commas and white space) or lists of strings; an empty one is no
    restriction. A limit needs a period, and a period a limit.
    """
    now = now or utcnow()
    limit = _limit(spend_limit)
    period = _period(spend_period)
    if limit is not None and period is None:
        raise BadControl("spend_period", "A spending limit needs a period: lifetime, day, week or month.")
    if limit is None and period is not None:
        raise BadControl("spend_limit", "A period needs a spending limit in credits.")
    return Controls(
        limit,
        period,
        _expiry(expires_at, now),
        _joined("allowed_ips", allowed_ips, _network),
        _joined("allowed_voices", allowed_voices, _name("voice", _VOICE_NAME)),
        _joined("allowed_models", allowed_models, _name("model", _MODEL_NAME)),
    )


def _limit(value) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadControl("spend_limit", "The spending limit must be a whole number of credits.")
    try:
        number = int(value)
    except ValueError:
        raise BadControl("spend_limit", "The spending limit must be a whole number of credits.") from None
    if not 0 <= number <= MAX_LIMIT:
        raise BadControl("spend_limit", f"The spending limit must be between 0 and {MAX_LIMIT:,} credits.")
    return number


def _period(value) -> str | None:
    if value is None or value == "":
        return None
    if value not in tuple(LimitPeriod):
        raise BadControl("spend_period", "The period must be one of lifetime, day, week or month.")
    return LimitPeriod(value).value


def _expiry(value, now: datetime) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadControl("expires_at", "The expiry must be a date and time such as 2027-01-31T18:00:00Z.") from None
    if not isinstance(value, datetime):
        raise BadControl("expires_at", "The expiry must be a date and time such as 2027-01-31T18:00:00Z.")
    if value.tzinfo is None:
        # A time without a zone is read as UTC, as every time this service shows.
        value = value.replace(tzinfo=timezone.utc)
    try:
        value = value.astimezone(timezone.utc)
    except OverflowError:
        raise BadControl("expires_at", "The expiry must be a date before the year 9999 ends.") from None
    if value <= now:
        raise BadControl("expires_at", "The expiry must be in the future.")
    return value


def _joined(field: str, value, check) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        entries = value.replace(",", " ").split()
    elif isinstance(value, list) and all(isinstance(entry, str) for entry in value):
        entries = [piece for entry in value for piece in entry.replace(",", " ").split()]
    else:
        raise BadControl(field, "Give a list of names, or one string of names separated by commas or spaces.")
    if len(entries) > MAX_LIST_ENTRIES:
        raise BadControl(field, f"At most {MAX_LIST_ENTRIES} entries.")
    checked = []
    for entry in entries:
        try:
            written = check(entry)
        except ValueError as error:
            raise BadControl(field, str(error)) from None
        if written not in checked:
            checked.append(written)
    return " ".join(checked) or None


def _network(entry: str) -> str:
    """An address or CIDR range, as its network (`10.0.0.7/8` is `10.0.0.0/8`; one address is /32 or /128)."""
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f"'{entry[:60]}' is not an IPv4 or IPv6 address or CIDR range.") from None
    # An IPv4 address written the IPv6 way (::ffff:203.0.113.7) is kept as the IPv4 it is, as clients are matched.
    if network.version == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped is not None:
        network = ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    return str(network)


def _name(what: str, pattern: re.Pattern):
    def check(entry: str) -> str:
        if not pattern.fullmatch(entry):
            raise ValueError(f"'{entry[:60]}' is not a {what} name (one {what}, no blend or weight).")
        return entry

    return check


def set_controls(key: ApiKey, controls: Controls) -> None:
    """Give `key` these controls, in the caller's transaction.

    The key's row is locked first (a debit of it waits, or is waited for), and its use is counted
    again from its requests for the window of its new period: so a limit set now covers what the
    key already spent this period, and an interleaved debit is counted once.
    """
    lock(key)
    stored = key.spent_window
    _apply(key, controls)
    counted = window(key.spend_period, utcnow())
    # As a debit does: a window of the same period the key has already reached stays (a clock behind).
    if stored[:4] == counted[:4] and stored > counted:
        counted = stored
    key.spent, key.spent_window = recorded_use(key.id, counted), counted


def lock(key: ApiKey) -> None:
    """Lock the key's row until this transaction ends (a debit of it waits) and read it afresh."""
    db.session.execute(select(ApiKey.id).where(ApiKey.id == key.id).with_for_update())
    db.session.refresh(key)


def _apply(key: ApiKey, controls: Controls) -> None:
    key.spend_limit, key.spend_period = controls.spend_limit, controls.spend_period
    key.expires_at = controls.expires_at
    key.allowed_ips = controls.allowed_ips
    key.allowed_voices, key.allowed_models = controls.allowed_voices, controls.allowed_models


def address_allowed(allowed_ips: str | None, address: str | None) -> bool:
    """Whether a request from `address` (as the app sees it, proxies it trusts applied) may use the key."""
    if allowed_ips is None:
        return True
    try:
        client = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    # An IPv4 client seen through an IPv6 socket (::ffff:203.0.113.9) is that IPv4 address.
    mapped = getattr(client, "ipv4_mapped", None)
    candidates = (client, mapped) if mapped else (client,)
    return any(
        candidate in network
        for network in map(ipaddress.ip_network, allowed_ips.split())
        for candidate in candidates
        if candidate.version == network.version
    )


def listed(allowed: str | None) -> list[str]:
    return allowed.split() if allowed else []


def refused_voice(allowed_voices: str | None, voice: str, names: catalog.Names) -> str | None:
    """The first voice of `voice` (resolved, as sent upstream; a blend part by part) the key may not ask
    for; None when it may ask for all. An allowed OpenAI name allows the voice it is spoken by."""
    if allowed_voices is None:
        return None
    allowed = {names.voices.get(name, name) for name in listed(allowed_voices)}
    for _, part, _ in catalog.blend(voice):
        if part not in allowed:
            return part
    return None


def model_allowed(allowed_models: str | None, model: str, names: catalog.Names) -> bool:
    """Whether the key may ask for `model` (resolved, as sent upstream); OpenAI's names are resolved alike."""
    if allowed_models is None:
        return True
    return model in {catalog.resolve_model(name, names, None) for name in listed(allowed_models)}


def changed_controls(key: ApiKey, changes: dict) -> Controls:
    """The key's controls with `changes` (fields as read_controls takes them; None clears one) made.

    Only what changes is checked again: an expiry already past stays as it is unless it is changed.
    """
    current = controls_of(key)
    merged = {
        "spend_limit": current.spend_limit,
        "spend_period": current.spend_period,
        "allowed_ips": current.allowed_ips,
        "allowed_voices": current.allowed_voices,
        "allowed_models": current.allowed_models,
        **changes,
    }
    if "expires_at" not in changes:
        return replace(read_controls(**merged), expires_at=current.expires_at)
    return read_controls(**merged)
