"""The metered `/v1` API: bearer keys, JSON errors, streamed speech."""

import math
import time

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


def _unauthorized(detail: str):
    return api_error(401, detail, {"WWW-Authenticate": "Bearer"})


@bp.before_request
def authenticate():
    scheme, _, secret = request.headers.get("Authorization", "").strip().partition(" ")
    secret = secret.strip()
    if not scheme or (scheme.lower() == "bearer" and not secret):
        return _unauthorized(f"Missing API key. {BEARER_HINT}")
    if scheme.lower() != "bearer":
        return _unauthorized(f"Malformed Authorization header. {BEARER_HINT}")
    found = keys.find(secret)
    if found is None:
        return _unauthorized("Invalid API key.")
    key, user = found
    if key.revoked:
        return _unauthorized("This API key has been revoked.")
    g.api_key, g.user = key, user
    if keys.touch(key, current_app.config["KEY_LAST_USED_RESOLUTION"]):
        db.session.commit()
    retry_after = current_app.extensions["throttle"].api_request(key.id, user.id)
    if retry_after is not None:
        return api_error(429, f"Rate limit reached. Retry in {retry_after} seconds.", {"Retry-After": str(retry_after)})


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
    body = speech_body(current_app.config["MAX_INPUT_CHARS"])
    throttle = current_app.extensions["throttle"]
    user_id = g.user.id
    if not throttle.acquire_stream(user_id):
        return api_error(
            429,
            f"Too many concurrent speech streams for this account (at most "
            f"{throttle.streams_per_account}). Retry when one has finished.",
            {"Retry-After": "1"},
        )
    try:
        response = _speak(body)
    except BaseException:
        throttle.release_stream(user_id)
        raise
    if response.status_code == 200:
        # The slot is held until the audio has been sent or the client has gone.
        response.call_on_close(lambda: throttle.release_stream(user_id))
    else:
        throttle.release_stream(user_id)
    return response


def _speak(body: dict):
    """Charge, open the upstream, and answer with its audio stream or a refunded error."""
    characters = len(body["input"])
    upstream = current_app.extensions["upstream"]
    chunk_size = current_app.config["STREAM_CHUNK_BYTES"]
    started = time.monotonic()
    # When the balance read with the key already covers the cost, synthesis starts while the charge
    # is written. No audio leaves before the charge has committed; if the debit then loses a race,
    # the upstream stream is closed unread.
    opening = upstream.open_speech_soon(body, chunk_size) if g.user.unlimited or g.user.balance >= characters else None
    try:
        try:
            charge = billing.charge_speech(
                g.user,
                g.api_key,
                characters=characters,
                model=body.get("model", DEFAULT_MODEL),
                voice=body.get("voice", DEFAULT_VOICE),
                response_format=body.get("response_format", DEFAULT_FORMAT),
            )
            request_id = charge.id
            # Commit the charge, releasing the database connection, before any audio is relayed.
            db.session.commit()
        except BaseException:
            if opening is not None:
                upstream.discard(opening)
            raise
    except billing.InsufficientCredits as short:
        db.session.rollback()
        return api_error(
            402,
            f"Insufficient credits: this request costs {short.cost} credits and your balance is "
            f"{short.balance}. Top up your balance.",
        )

    try:
        audio = opening.result() if opening is not None else upstream.open_speech(body, chunk_size)
    except UpstreamError as failure:
        billing.refund_speech(
            request_id, failure.detail, upstream_status=failure.status, duration_ms=_ms_since(started)
        )
        db.session.commit()
        return api_error(
            502, f"{failure.detail} Any charge for this request was refunded.", {"X-Request-Id": request_id}
        )

    response = current_app.response_class(
        stream_with_context(_relay(audio, request_id, started)),
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


def _relay(audio: SpeechStream, request_id: str, started: float):
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
    return jsonify(balance=g.user.balance, unlimited=g.user.unlimited)
