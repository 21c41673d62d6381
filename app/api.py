"""The metered `/v1` API: bearer keys, JSON errors, streamed speech."""

import math
import time
from functools import partial

import requests
from flask import Blueprint, current_app, g, jsonify, request, stream_with_context
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import BadRequest

from app import billing, keys
from app.errors import api_error
from app.extensions import db
from app.upstream import SpeechStream, UpstreamError, timed_out

bp = Blueprint("api", __name__, url_prefix="/v1")

AUDIO_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
DEFAULT_MODEL = "kokoro"
DEFAULT_VOICE = "af_heart"
DEFAULT_FORMAT = "mp3"
MIN_SPEED, MAX_SPEED = 0.25, 4.0
BEARER_HINT = "Send your key as 'Authorization: Bearer kp_live_…'."


class KeyRefused(Exception):
    """The request's key is unknown or revoked: answered 401 with `detail`."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@bp.errorhandler(KeyRefused)
def refused(error: KeyRefused):
    return api_error(401, error.detail, {"WWW-Authenticate": "Bearer"})


@bp.before_request
def authenticate():
    scheme, _, secret = request.headers.get("Authorization", "").strip().partition(" ")
    secret = secret.strip()
    if not scheme or (scheme.lower() == "bearer" and not secret):
        raise KeyRefused(f"Missing API key. {BEARER_HINT}")
    if scheme.lower() != "bearer":
        raise KeyRefused(f"Malformed Authorization header. {BEARER_HINT}")
    g.key_digest = keys.stored_digest(secret)
    # Speech may start on this process's last good lookup of the key: it is looked up again
    # beside the upstream call, before anything is charged or relayed (see _charge_and_open).
    g.caller = current_app.extensions["recent_keys"].get(g.key_digest) if request.endpoint == "api.speech" else None
    g.confirmed = False
    if g.caller is None:
        confirm()
    retry_after = current_app.extensions["throttle"].api_request(g.caller.key_id, g.caller.user_id)
    if retry_after is not None:
        confirm()
        return api_error(429, f"Rate limit reached. Retry in {retry_after} seconds.", {"Retry-After": str(retry_after)})


def confirm() -> keys.Caller:
    """The request's key and owner, looked up now unless they already were; KeyRefused (401) otherwise."""
    if not g.get("confirmed"):
        g.caller, g.confirmed = look_up(g.key_digest), True
    return g.caller


def look_up(key_digest: str | None) -> keys.Caller:
    """A key's current row, remembered for later requests; KeyRefused if it is unknown or revoked."""
    recent = current_app.extensions["recent_keys"]
    caller = keys.lookup(key_digest) if key_digest else None
    if caller is None or caller.revoked_at is not None:
        recent.forget(key_digest)
        raise KeyRefused("Invalid API key." if caller is None else "This API key has been revoked.")
    if keys.touch(caller.key_id, caller.last_used_at, current_app.config["KEY_LAST_USED_RESOLUTION"]):
        db.session.commit()
    recent.remember(key_digest, caller)
    return caller


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(body: dict, field: str, valid, message: str, nullable: bool = False) -> None:
    if field not in body or (nullable and body[field] is None):
        return
    if not valid(body[field]):
        raise BadRequest(f"'{field}' {message}")


def speech_body(max_chars: int) -> dict:
    """The validated request body, as the client sent it; BadRequest (400) otherwise."""
    try:
        body = request.get_json(force=True)
    except (BadRequest, RecursionError):
        raise BadRequest("Invalid JSON body.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    text = body.get("input")
    if "input" not in body or text is None:
        raise BadRequest("'input' is required.")
    if not isinstance(text, str):
        raise BadRequest("'input' must be a string.")
    if not text.strip():
        raise BadRequest("'input' must not be empty.")
    if len(text) > max_chars:
        raise BadRequest(f"'input' is {len(text)} characters long; the maximum is {max_chars}.")

    def short_string(value):
        return isinstance(value, str) and 0 < len(value) <= 100

    _check(body, "model", short_string, "must be a model id (a non-empty string).")
    _check(
        body, "voice", lambda v: isinstance(v, str) and 0 < len(v) <= 200, "must be a voice id (a non-empty string)."
    )
    formats = ", ".join(AUDIO_FORMATS)
    _check(body, "response_format", lambda v: v in AUDIO_FORMATS, f"must be one of {formats}.")
    _check(body, "download_format", lambda v: v in AUDIO_FORMATS, f"must be one of {formats}.", nullable=True)
    _check(
        body,
        "speed",
        lambda v: _is_number(v) and MIN_SPEED <= v <= MAX_SPEED,
        f"must be a number from {MIN_SPEED} to {MAX_SPEED}.",
    )
    for flag in ("stream", "return_download_link"):
        _check(body, flag, lambda v: isinstance(v, bool), "must be true or false.")
    _check(body, "lang_code", short_string, "must be a language code (a string).", nullable=True)
    _check(body, "volume_multiplier", _is_number, "must be a number.", nullable=True)
    _check(body, "normalization_options", lambda v: isinstance(v, dict), "must be an object.", nullable=True)
    _check(body, "instructions", lambda v: isinstance(v, str), "must be a string.", nullable=True)
    return body


@bp.post("/audio/speech")
def speech():
    try:
        body = speech_body(current_app.config["MAX_INPUT_CHARS"])
    except BadRequest:
        confirm()
        raise
    throttle = current_app.extensions["throttle"]
    user_id = g.caller.user_id
    if not throttle.acquire_stream(user_id):
        confirm()
        return api_error(
            429,
            f"Too many concurrent speech streams for this account (at most "
            f"{throttle.streams_per_account}). Retry when one has finished.",
            {"Retry-After": "1"},
        )
    slot = _StreamSlot(throttle, user_id)
    try:
        response = _speak(body, slot)
    except BaseException:
        slot.release()
        raise
    if response.status_code == 200:
        # Given back when the audio has all been relayed (see _relay), or when the client has gone.
        response.call_on_close(slot.release)
    else:
        slot.release()
    return response


class _StreamSlot:
    """One of an account's concurrent-stream slots, given back once however the stream ends."""

    def __init__(self, throttle, user_id: int):
        self._throttle, self._user_id, self._held = throttle, user_id, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._throttle.release_stream(self._user_id)


def _speak(body: dict, slot: _StreamSlot):
    """Charge, open the upstream, and answer with its audio stream or a refunded error."""
    started = time.monotonic()
    try:
        request_id, audio = _charge_and_open(body)
    except billing.InsufficientCredits as short:
        return api_error(
            402,
            f"Insufficient credits: this request costs {short.cost} credits and your balance is "
            f"{short.balance}. Top up your balance.",
        )
    if isinstance(audio, UpstreamError):
        billing.refund_speech(request_id, audio.detail, upstream_status=audio.status, duration_ms=_ms_since(started))
        db.session.commit()
        return api_error(502, f"{audio.detail} Any charge for this request was refunded.", {"X-Request-Id": request_id})

    response = current_app.response_class(
        stream_with_context(_relay(audio, request_id, started, slot)),
        status=200,
        content_type=audio.content_type,
    )
    response.headers["X-Request-Id"] = request_id
    response.headers["Cache-Control"] = "no-store"
    # Asks nginx-style proxies not to buffer the stream.
    response.headers["X-Accel-Buffering"] = "no"
    # Closes the upstream connection even when the body is never iterated.
    response.call_on_close(audio.close)
    return response


def _charge_and_open(body: dict) -> tuple[str, SpeechStream | UpstreamError]:
    """Commit the charge and open the upstream: the charged request's id, and its audio or why there is none.

    When the balance last seen with the key covers the cost, this thread asks the upstream at once,
    and another confirms the key (unless this request already looked it up) and writes the charge
    beside it, so the database adds nothing to the time to first byte. Either way the key has been
    confirmed and the charge committed before this returns, so no audio is relayed to a revoked key
    or uncharged; if the confirmation or the debit fails (KeyRefused, InsufficientCredits), the
    upstream stream is closed unread.
    """
    fields = {
        "characters": len(body["input"]),
        "model": body.get("model", DEFAULT_MODEL),
        "voice": body.get("voice", DEFAULT_VOICE),
        "response_format": body.get("response_format", DEFAULT_FORMAT),
    }
    if not g.caller.unlimited and g.caller.balance < fields["characters"]:
        # Looked up again before refusing: the balance seen may be older than a top-up.
        return _commit(_charge(confirm(), fields)), _open(body)
    charging = current_app.extensions["charge_writers"].submit(
        _charge_beside,
        current_app._get_current_object(),
        g.key_digest,
        g.caller if g.confirmed else None,
        fields,
    )
    audio = _open(body)
    try:
        g.caller, request_id = charging.result()
    except BaseException:
        if isinstance(audio, SpeechStream):
            audio.close()
        raise
    g.confirmed = True
    return request_id, audio


def _charge(caller: keys.Caller, fields: dict):
    return partial(billing.charge_speech, caller.user_id, caller.key_id, unlimited=caller.unlimited, **fields)


def _charge_beside(app, key_digest: str, confirmed: keys.Caller | None, fields: dict) -> tuple[keys.Caller, str]:
    # A session of its own: the request's session belongs to the request's thread.
    with app.app_context():
        caller = confirmed or look_up(key_digest)
        return caller, _commit(_charge(caller, fields))


def _commit(charge) -> str:
    try:
        request_id = charge()
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return request_id


def _open(body: dict) -> SpeechStream | UpstreamError:
    try:
        return current_app.extensions["upstream"].open_speech(body, current_app.config["STREAM_CHUNK_BYTES"])
    except UpstreamError as failure:
        return failure


class UpstreamBrokeOff(Exception):
    """Raised inside the body so the server aborts the response instead of ending it cleanly."""


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _settle(settle, request_id: str, *args, **details) -> None:
    try:
        settle(request_id, *args, **details)
        db.session.commit()
    except SQLAlchemyError:
        # The request stays `charged`; the settle command refunds or keeps it later.
        db.session.rollback()
        current_app.logger.exception("could not settle speech request %s", request_id)


def _relay(audio: SpeechStream, request_id: str, started: float, slot: _StreamSlot):
    """Yield the audio chunk by chunk as it arrives, then settle the charge."""
    first_byte_ms = _ms_since(started)
    sent = len(audio.first_chunk)

    def outcome(**extra) -> dict:
        return {
            "upstream_status": audio.status,
            "bytes_sent": sent,
            "first_byte_ms": first_byte_ms,
            "duration_ms": _ms_since(started),
            **extra,
        }

    try:
        yield audio.first_chunk
        for chunk in audio.rest:
            if chunk:
                sent += len(chunk)
                yield chunk
    except GeneratorExit:
        # The client hung up: what it received was synthesised for it, so the charge stands.
        _settle(billing.mark_delivered, request_id, **outcome(error="client disconnected"))
        raise
    except requests.RequestException as exc:
        reason = "Upstream stalled mid-stream." if timed_out(exc) else "Upstream broke off mid-stream."
        _settle(billing.refund_speech, request_id, reason, **outcome())
        raise UpstreamBrokeOff(f"speech request {request_id}: upstream broke off after {sent} bytes") from exc
    _settle(billing.mark_delivered, request_id, **outcome())
    # Given back before the server writes the body's end, so a client that reads to the end
    # and starts its next stream at once finds the slot free.
    slot.release()


def _catalog(path: str, params: dict | None = None):
    try:
        return jsonify(current_app.extensions["upstream"].catalog(path, params))
    except UpstreamError as failure:
        return api_error(502, failure.detail)


@bp.get("/models")
def models():
    return _catalog("models")


@bp.get("/audio/voices")
def voices():
    # Kokoro-FastAPI lists voices as objects, or as plain ids with ?legacy=true.
    legacy = request.args.get("legacy", "").lower() == "true"
    return _catalog("audio/voices", {"legacy": "true"} if legacy else None)


@bp.get("/balance")
def balance():
    caller = confirm()
    return jsonify(balance=caller.balance, unlimited=caller.unlimited)
