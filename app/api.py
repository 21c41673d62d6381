"""The metered `/v1` API: bearer keys, JSON errors, streamed speech.

Every request's key is looked up before anything else happens (`authenticate`), so an
unknown or revoked key gets 401 whatever else is wrong with the request, and no work
starts for it. The metered speech request itself lives in app/speech.py.
"""

import json
import re
import time

from flask import Blueprint, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from app import catalog, config, keys, services, speech
from app.errors import CAPTIONED_PATH, ApiError
from app.extensions import db
from app.models import KeyKind, new_request_id
from app.upstream import UpstreamError

bp = Blueprint("api", __name__, url_prefix="/v1")
# Kokoro-FastAPI's captioned speech at its own path, so its clients only change the host and key.
captioned = Blueprint("captioned", __name__)


# Served without a key when PUBLIC_CATALOG is on (Open WebUI and others fetch them keyless).
CATALOG_ENDPOINTS = ("api.models", "api.audio_models", "api.voices")


# A client's own X-Request-Id is kept (answered back, logged, stored with a speech request) when it looks like one.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


@bp.before_request
@captioned.before_request
def authenticate():
    g.received = time.monotonic()
    own = request.headers.get("X-Request-Id", "")
    g.client_request_id = own if _CLIENT_REQUEST_ID.fullmatch(own) else None
    g.request_id = g.client_request_id or new_request_id()
    settings = config.current()
    throttle = services.throttle()
    ip = request.remote_addr or "-"
    if request.method == "OPTIONS" and settings.cors_allowed_origins:
        # A browser's CORS preflight never carries a key; Flask-CORS answers it (app/__init__.py).
        g.caller = None
        return
    if settings.public_catalog and request.endpoint in CATALOG_ENDPOINTS:
        g.caller = None
        _throttled(throttle.anonymous_request(ip))
        return
    # An address that has guessed wrong too often is not even looked up until its window passes.
    _throttled(throttle.key_guessing_blocked(ip), "Too many requests with an invalid API key from this address.")
    try:
        g.caller = keys.authenticate(request.authorization, settings.key_last_used_resolution, request.remote_addr)
    except keys.KeyForbidden as forbidden:
        raise ApiError(forbidden.status, forbidden.detail, code=forbidden.code) from None
    except keys.KeyRefused as refused:
        # A key of ours that is refused (revoked, expired, rolled) is not a guess: an app still sending
        # its old secret does not lock its address out for the new one.
        if not refused.known:
            throttle.key_failed(ip)
        raise ApiError(401, refused.detail, {"WWW-Authenticate": "Bearer"}, code=refused.code) from None
    # The key's last use, when it was due to be written.
    db.session.commit()
    _throttled(throttle.api_request(g.caller.key_id, g.caller.team_id))


@bp.after_request
@captioned.after_request
def server_timing(response):
    """The gateway's own time for every /v1 answer (speech sets its own, with the upstream's)."""
    if "received" in g:
        response.headers.setdefault("Server-Timing", f"gateway;dur={(time.monotonic() - g.received) * 1000:.2f}")
    return response


def _throttled(retry_after: int | None, reason: str = "Rate limit reached.") -> None:
    if retry_after is not None:
        raise ApiError(429, f"{reason} Retry in {retry_after} seconds.", {"Retry-After": str(retry_after)})


def json_body(empty=None):
    """The request body decoded as JSON; ApiError(400) when it is not JSON, (413) when too large.
    `empty`, when given, is what an empty body stands for (where every field is optional)."""
    raw = _raw_body()
    if empty is not None and not raw.strip():
        return empty
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "Invalid JSON body.", code="invalid_json") from None


def _raw_body() -> bytes:
    """The raw request body, at most MAX_REQUEST_BYTES however it is sent; ApiError(413) beyond."""
    limit = config.current().max_request_bytes
    too_large = ApiError(413, f"The request body is larger than the limit of {limit} bytes.")
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise too_large from None
    except ClientDisconnected:
        # A chunked body cut off at the limit is reported as a disconnect by Werkzeug.
        if request.content_length is None and limit is not None:
            raise too_large from None
        raise ApiError(400, "Invalid JSON body.", code="invalid_json") from None
    # Werkzeug cuts a chunked body (no Content-Length) off at the limit without a word: a byte
    # still waiting behind it means the body was larger.
    if limit is not None and request.content_length is None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise too_large
    return raw


@bp.post("/audio/speech")
def speech_request():
    return _serve(speech.read_order)


@captioned.post(CAPTIONED_PATH)
def captioned_speech():
    """Kokoro-FastAPI's captioned speech (its body and answers), metered as speech."""
    return _serve(speech.read_captioned_order)


def _serve(read):
    caller = g.caller
    if caller.kind != KeyKind.SPEECH:
        raise ApiError(
            403, "A management key cannot call speech: use one of the team's speech keys.", code="speech_key_required"
        )
    order = read(json_body(), config.current().max_input_chars)
    payer = speech.Payer(caller.team_id, caller.created_by_id, caller.key_id, caller.balance, caller.unlimited, caller)
    arrival = speech.Arrival.of(request.environ, g.received, g.request_id, g.client_request_id)
    return speech.serve(payer, order, arrival)


def _catalog(path: str):
    try:
        return services.upstream().catalog(path)
    except UpstreamError as failure:
        raise ApiError(502, failure.detail) from None


def _model_entries() -> list[dict]:
    """The upstream's models, then OpenAI's model names that the gateway sends to one of them."""
    document = _catalog("models")
    listed = catalog.model_ids(document)
    entries = [entry for entry in document.get("data", []) if isinstance(entry, dict)]
    for name, target in config.current().names.models.items():
        if name not in listed and target in listed:
            entries.append({"id": name, "object": "model", "created": catalog.OPENAI_CREATED, "owned_by": "kokoro-pay"})
    return entries


@bp.get("/models")
def models():
    return jsonify(object="list", data=_model_entries())


@bp.get("/audio/models")
def audio_models():
    """The speech models, as Open WebUI asks for them: `{"models": [{"id": …}]}`."""
    return jsonify(models=[{"id": model} for model in catalog.model_ids({"data": _model_entries()})])


@bp.get("/audio/voices")
def voices():
    """Every voice with its name, language and speaker, then OpenAI's names for some of them.

    `?legacy=true` lists plain ids, as Kokoro-FastAPI's older releases did.
    """
    entries = catalog.listing(catalog.voice_ids(_catalog("audio/voices")), config.current().names)
    if request.args.get("legacy", "").lower() == "true":
        return jsonify(voices=[entry["id"] for entry in entries])
    return jsonify(voices=entries)


@bp.get("/balance")
def balance():
    """The team's balance, and the calling key's own limit: what it may spend, has spent, and when that resets."""
    caller = g.caller
    key = {
        "spend_limit": caller.spend_limit,
        "spend_period": caller.spend_period,
        "spent": keys.use_now(caller),
        "limit_resets_at": keys.moment(keys.limit_resets_at(caller)),
        "expires_at": keys.moment(caller.expires_at),
    }
    return jsonify(balance=caller.balance, unlimited=caller.unlimited, key=key)
