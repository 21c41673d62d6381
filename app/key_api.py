"""The key-management API, `/v1/keys`: a team's management key creates, lists, changes, rolls and
revokes the team's speech keys over HTTP.

Only a management key may call it (403 `management_key_required` for a speech key); a management
key reaches its own team's speech keys only, never another management key (404). A new or rolled
secret is in that one answer and nowhere else. Keys made here are recorded as made by the member
who made the management key. Controls are read and checked by app/keys.py, as the dashboard's are.
"""

from datetime import timedelta

from flask import Blueprint, g, jsonify
from sqlalchemy import select

from app import api, keys
from app.errors import ApiError
from app.extensions import db
from app.models import ApiKey, KeyKind, Team, User

bp = Blueprint("key_api", __name__, url_prefix="/v1/keys")
# The same key check, throttle and timing as every /v1 route (app/api.py).
bp.before_request(api.authenticate)
bp.after_request(api.server_timing)


@bp.before_request
def management_keys_only():
    if g.caller is not None and g.caller.kind != KeyKind.MANAGEMENT:
        raise ApiError(
            403,
            "Only a management key may manage keys. Make one on the dashboard's API keys page.",
            code="management_key_required",
        )


CONTROLS = ("spend_limit", "spend_period", "expires_at", "allowed_ips", "allowed_voices", "allowed_models")
FIELDS = ("name", *CONTROLS)


def describe(key: ApiKey) -> dict:
    """A speech key as the API shows it: never its secret, only the prefix that names it."""
    return {
        "id": key.id,
        "object": "api_key",
        "name": key.name,
        "prefix": key.prefix,
        "created_at": keys.moment(key.created_at),
        "last_used_at": keys.moment(key.last_used_at),
        "revoked_at": keys.moment(key.revoked_at),
        "expires_at": keys.moment(key.expires_at),
        "spend_limit": key.spend_limit,
        "spend_period": key.spend_period,
        "spent": keys.use_now(key),
        "limit_resets_at": keys.moment(keys.limit_resets_at(key)),
        "allowed_ips": keys.listed(key.allowed_ips) or None,
        "allowed_voices": keys.listed(key.allowed_voices) or None,
        "allowed_models": keys.listed(key.allowed_models) or None,
        "rolled_at": keys.moment(key.rolled_at),
        "previous_secret_expires_at": keys.moment(key.previous_expires_at) if key.previous_works else None,
    }


def _body(allowed: tuple[str, ...]) -> dict:
    """The body's fields, each one of `allowed`; no body at all is no field (every field is optional)."""
    body = api.json_body(empty={})
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"Unknown field '{unknown[0]}'; the fields are {', '.join(allowed)}.", param=unknown[0])
    return body


def _name(body: dict, default: str = "") -> str:
    name = body.get("name", default)
    if name is None:
        return ""
    if not isinstance(name, str) or len(name) > 100 or not name.isprintable():
        raise ApiError(400, "'name' must be one line of at most 100 characters.", param="name")
    return name


def _controls(read) -> keys.Controls:
    try:
        return read()
    except keys.BadControl as bad:
        raise ApiError(400, str(bad), param=bad.field) from None


def _speech_key(key_id: int) -> ApiKey:
    key = db.session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.team_id == g.caller.team_id, ApiKey.kind == KeyKind.SPEECH)
    )
    if key is None:
        raise ApiError(404, f"No speech key {key_id} in this team.")
    return key


@bp.get("")
def list_keys():
    found = db.session.scalars(
        select(ApiKey)
        .where(ApiKey.team_id == g.caller.team_id, ApiKey.kind == KeyKind.SPEECH)
        .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    )
    return jsonify(object="list", data=[describe(key) for key in found])


@bp.post("")
def create_key():
    body = _body(FIELDS)
    name = _name(body)
    controls = _controls(lambda: keys.read_controls(**{field: body.get(field) for field in CONTROLS}))
    team, maker = db.session.get(Team, g.caller.team_id), db.session.get(User, g.caller.created_by_id)
    key, secret = keys.create_key(team, maker, name, controls=controls)
    db.session.commit()
    return jsonify({**describe(key), "secret": secret}), 201


@bp.get("/<int:key_id>")
def show_key(key_id: int):
    return jsonify(describe(_speech_key(key_id)))


@bp.patch("/<int:key_id>")
def change_key(key_id: int):
    """Change the fields the body names (null clears a control); the others stay as they are."""
    body = _body(FIELDS)
    key = _speech_key(key_id)
    # Read as locked: a change made meanwhile to a field this one does not name is kept.
    keys.lock(key)
    if key.revoked:
        raise ApiError(409, "This key is revoked; it cannot be changed.", code="key_revoked")
    controls = _controls(
        lambda: keys.changed_controls(key, {field: body[field] for field in CONTROLS if field in body})
    )
    if "name" in body:
        key.name = " ".join(_name(body).split())
    keys.set_controls(key, controls)
    db.session.commit()
    return jsonify(describe(key))


@bp.post("/<int:key_id>/roll")
def roll_key(key_id: int):
    """A new secret for the key; the current one works for `grace_seconds` more (0, the default: none)."""
    body = _body(("grace_seconds",))
    grace = body.get("grace_seconds", 0)
    longest = int(keys.MAX_ROLL_GRACE.total_seconds())
    if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= longest:
        raise ApiError(400, f"'grace_seconds' must be a whole number from 0 to {longest}.", param="grace_seconds")
    key = _speech_key(key_id)
    if key.revoked:
        raise ApiError(409, "This key is revoked; it cannot be rolled.", code="key_revoked")
    try:
        secret = keys.roll(key, timedelta(seconds=grace))
    except keys.KeyChanged:
        db.session.rollback()
        raise ApiError(
            409, "The key was rolled meanwhile; nothing was changed. Roll it again.", code="key_changed"
        ) from None
    db.session.commit()
    return jsonify({**describe(key), "secret": secret})


@bp.delete("/<int:key_id>")
def revoke_key(key_id: int):
    key = _speech_key(key_id)
    keys.revoke(key)
    db.session.commit()
    return jsonify(describe(key))
