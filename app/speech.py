"""A metered speech request, from the checked order to the settled books.

`serve` takes a request whose key is already confirmed (app/api.py) through its
steps, in this order:

1. `read_order`: the body is checked; only known, valid fields are sent upstream,
   so nothing a client sends can make the upstream break off after audio has gone out.
2. `check_names`: OpenAI's voice and model names become Kokoro's (app/catalog.py), and
   each is checked against the upstream's cached catalog: 400 before anything is charged;
   then `check_key_allows`: 403 for a voice or model the key may not ask for (app/keys.py).
3. `admit`: what the charge will decide is checked first (402 for a balance short of the
   cost or a key's spending limit that does not cover it, 429 for an account at its stream
   cap), so a request that cannot be charged never takes a place in the wait for a speech server.
4. `reserve`: a place on the least busy speech server (app/upstream.py), waiting a
   bounded time when all are full, behind at most the account's share of the wait (429
   beyond it); 503 with nothing charged when none frees up.
5. `charge`: one committed transaction records the request, debits it, counts it against
   its key's limit and counts the account's open streams (402, 429), naming this gateway
   process (app/liveness.py);
   nothing upstream starts before it.
6. `open_upstream`: the synthesis starts; a failure before any audio is refunded in
   full and answered 502, or 400 when the upstream refused the request itself.
7. `Relay`: audio goes out chunk by chunk as it arrives, metered (app/audio_meter.py),
   with progress written at least every STREAM_HEARTBEAT_SECONDS of time and of audio,
   so a crash can refund at most that much audio that went out; as plain bytes, or as
   server-sent events (`sse_events`) when the client asks.
8. Settlement: delivered; or, when the upstream breaks off or the stream outlives
   MAX_STREAM_SECONDS, refunded for the audio not delivered; a client that hangs up, or
   takes nothing for CLIENT_IDLE_SECONDS, keeps its charge. `flask speech settle`
   refunds only requests whose gateway process is gone, never a paused reader's.
"""

import base64
import contextlib
import functools
import itertools
import json
import math
import re
import socket
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import requests
from flask import current_app, stream_with_context
from sqlalchemy.exc import SQLAlchemyError

from app import audio_meter, billing, captions, catalog, config, keys, metering, metrics, services
from app.errors import ApiError
from app.extensions import db
from app.models import utcnow
from app.places import AccountQueueFull, Busy, Slot
from app.upstream import NO_SUCH_ROUTE, SpeechStream, UpstreamError, timed_out

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
DEFAULT_MODEL = "kokoro"
DEFAULT_VOICE = "af_heart"
DEFAULT_FORMAT = "mp3"
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# "audio": the audio bytes as they are made; "sse": server-sent events carrying them in base64.
STREAM_FORMATS = ("audio", "sse")
MAX_VOLUME = 10.0
# Kokoro-FastAPI's text normalisation switches, all booleans.
NORMALIZATION_OPTIONS = (
    "normalize",
    "unit_normalization",
    "url_normalization",
    "email_normalization",
    "optional_pluralization_normalization",
    "phone_normalization",
    "replace_remaining_symbols",
)
# Text may hold tabs and line breaks; no other control character, and no lone surrogate
# (half of a UTF-16 pair, which no encoder can write and which breaks the synthesis).
_BAD_IN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# Voice ids, blends such as "af_bella(2)+af_sky(1)" or "af_bella-af_sky".
_VOICE = re.compile(r"[A-Za-z0-9_+\-(). ]{1,200}")
_MODEL = re.compile(r"[A-Za-z0-9_.:\-/]{1,100}")
_LANG_CODE = re.compile(r"[A-Za-z]{1,3}(-[A-Za-z0-9]{1,8})?")


@dataclass(frozen=True)
class Order:
    """A checked speech request: what is charged, and the exact payload sent upstream."""

    text: str
    model: str
    voice: str
    response_format: str
    speed: float
    payload: dict
    # "audio", "sse", or for word timings also "lines" (Kokoro-FastAPI's streamed captions) and
    # "json" (one JSON answer with the audio in base64).
    stream_format: str = "audio"
    # Word timings asked for (app/captions.py), and subtitles made from them ("srt", "vtt").
    timestamps: bool = False
    subtitles: str | None = None
    # False when the captioned route was asked for its audio without the words ("return_timestamps": false).
    with_words: bool = True


def _is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # Integers of any size compare exactly; only floats can be NaN or infinite.
    return isinstance(value, int) or math.isfinite(value)


def _field(body: dict, name: str, valid, message: str, default=None, nullable: bool = False):
    if name not in body or (nullable and body[name] is None):
        return default
    value = body[name]
    if not valid(value):
        raise ApiError(400, f"'{name}' {message}", param=name)
    return value


def _clean_text(value: str, name: str) -> str:
    bad = _BAD_IN_TEXT.search(value)
    if bad:
        kind = "a lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
        raise ApiError(
            400,
            f"'{name}' contains {kind} (U+{ord(bad.group()):04X}) at position {bad.start()}; remove it.",
            param=name,
        )
    return value


def read_order(body, max_chars: int) -> Order:
    """The order in a decoded JSON body; ApiError(400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    text = body.get("input")
    if text is None:
        raise ApiError(400, "'input' is required.", param="input")
    if not isinstance(text, str):
        raise ApiError(400, "'input' must be a string.", param="input")
    if not text.strip():
        raise ApiError(400, "'input' must not be empty.", param="input")
    if len(text) > max_chars:
        raise ApiError(400, f"'input' is {len(text)} characters long; the maximum is {max_chars}.", param="input")
    _clean_text(text, "input")

    def matches(pattern):
        return lambda value: isinstance(value, str) and pattern.fullmatch(value) is not None

    model = _field(body, "model", matches(_MODEL), "must be a model id (a non-empty string).", DEFAULT_MODEL)
    # OpenAI's API also takes a voice as an object, {"id": "…"}.
    if isinstance(body.get("voice"), dict) and set(body["voice"]) == {"id"}:
        body = {**body, "voice": body["voice"]["id"]}
    voice = _field(
        body,
        "voice",
        matches(_VOICE),
        'must be a voice id, a blend such as af_bella(2)+af_sky(1), or {"id": …}.',
        DEFAULT_VOICE,
    )
    formats = ", ".join(FORMATS)
    response_format = _field(
        body, "response_format", lambda v: v in FORMATS, f"must be one of {formats}.", DEFAULT_FORMAT
    )
    speed = _field(
        body,
        "speed",
        lambda v: _is_number(v) and MIN_SPEED <= v <= MAX_SPEED,
        f"must be a number from {MIN_SPEED} to {MAX_SPEED}.",
        1.0,
    )
    payload = {"model": model, "input": text, "voice": voice, "response_format": response_format, "speed": speed}
    optional = {
        "stream": _field(body, "stream", lambda v: isinstance(v, bool), "must be true or false."),
        "download_format": _field(
            body, "download_format", lambda v: v in FORMATS, f"must be one of {formats}.", nullable=True
        ),
        "lang_code": _field(
            body, "lang_code", matches(_LANG_CODE), "must be a language code such as 'a' or 'en-us'.", nullable=True
        ),
        "volume_multiplier": _field(
            body,
            "volume_multiplier",
            lambda v: _is_number(v) and 0 <= v <= MAX_VOLUME,
            f"must be a number from 0 to {MAX_VOLUME}.",
            nullable=True,
        ),
        "normalization_options": _field(
            body,
            "normalization_options",
            lambda v: (
                isinstance(v, dict)
                and all(key in NORMALIZATION_OPTIONS and isinstance(flag, bool) for key, flag in v.items())
            ),
            f"must be an object of true/false switches among {', '.join(NORMALIZATION_OPTIONS)}.",
            nullable=True,
        ),
    }
    payload.update((name, value) for name, value in optional.items() if value is not None)
    # Accepted for OpenAI compatibility; the upstream has no use for them, so they are not sent.
    _field(body, "instructions", lambda v: isinstance(v, str), "must be a string.", nullable=True)
    _field(body, "return_download_link", lambda v: isinstance(v, bool), "must be true or false.")
    stream_format = _field(
        body, "stream_format", lambda v: v in STREAM_FORMATS, "must be 'audio' or 'sse'.", "audio", nullable=True
    )
    subtitles = _field(
        body, "subtitles", lambda v: v in captions.SUBTITLE_FORMATS, "must be 'srt' or 'vtt'.", nullable=True
    )
    timestamps = (
        _field(body, "return_timestamps", lambda v: isinstance(v, bool), "must be true or false.", nullable=True)
        or subtitles is not None
    )
    if timestamps and stream_format == "audio":
        # Audio and timings together need a container: one JSON answer.
        stream_format = "json"
    return Order(text, model, voice, response_format, float(speed), payload, stream_format, timestamps, subtitles)


def read_captioned_order(body, max_chars: int) -> Order:
    """The order in a body sent to Kokoro-FastAPI's captioned route: its fields, and its defaults
    (`stream` and `return_timestamps` true); ApiError(400) naming the field otherwise."""
    order = read_order(body, max_chars)
    streamed = body.get("stream") is not False
    if streamed and order.subtitles:
        raise ApiError(400, "'subtitles' needs \"stream\": false on this route.", param="subtitles")
    return replace(
        order,
        timestamps=True,
        stream_format="lines" if streamed else "json",
        with_words=body.get("return_timestamps") is not False,
    )


def check_names(order: Order) -> Order:
    """`order` with OpenAI's voice and model names turned into the upstream's, each checked.

    The check is against the upstream's catalog (cached); ApiError(400) for a voice or
    model it does not have, before anything is charged. When the catalog cannot be read
    the names go upstream unchecked, and the upstream's own refusal is answered 400.
    """
    names = config.current().names
    known = upstream_catalog()
    try:
        voice = catalog.resolve_voice(order.voice, names, known)
    except catalog.UnknownName as unknown:
        raise ApiError(400, str(unknown), param="voice") from None
    try:
        model = catalog.resolve_model(order.model, names, known)
    except catalog.UnknownName as unknown:
        raise ApiError(400, str(unknown), param="model", code="model_not_found") from None
    return replace(order, payload={**order.payload, "voice": voice, "model": model})


def check_key_allows(key: keys.Caller | None, order: Order) -> None:
    """403 for a voice or model the request's key may not ask for (names as resolved), before any charge."""
    if key is None:
        return
    names = config.current().names
    refused = keys.refused_voice(key.allowed_voices, order.payload["voice"], names)
    if refused is not None:
        raise ApiError(
            403,
            f"This key may not use the voice '{refused}'; it may use {', '.join(keys.listed(key.allowed_voices))}.",
            param="voice",
            code="voice_not_allowed",
        )
    if not keys.model_allowed(key.allowed_models, order.payload["model"], names):
        raise ApiError(
            403,
            f"This key may not use the model '{order.model}'; it may use {', '.join(keys.listed(key.allowed_models))}.",
            param="model",
            code="model_not_allowed",
        )


def check_timestamps() -> None:
    """400 before any charge when the speech servers cannot give word timings.

    When that cannot be known now (the servers are out of reach), the request goes on, and
    the servers' own answer decides (refunded).
    """
    if services.upstream().has_captions() is False:
        raise _no_timestamps("Nothing was charged.")


def _no_timestamps(charge: str) -> ApiError:
    return ApiError(
        400,
        f"The speech server behind this API cannot give word timings. {charge} "
        "Ask for the audio alone: POST /v1/audio/speech without 'return_timestamps' and 'subtitles'.",
        param="return_timestamps",
        code="timestamps_unsupported",
    )


def upstream_catalog() -> catalog.Catalog | None:
    """The upstream's voices and models (cached by app/upstream.py); None when it cannot say."""
    upstream = services.upstream()
    try:
        return catalog.Catalog.from_documents(upstream.catalog("models"), upstream.catalog("audio/voices"))
    except UpstreamError as failure:
        current_app.logger.warning("upstream catalog unavailable, names go unchecked: %s", failure.detail)
        return None


class Payer(NamedTuple):
    """Who pays for a speech request: the team, the member it is recorded under (who made the key, or
    who asked in the dashboard's playground), the key it came with (None from the playground), the
    balance as this request found it, whether the team is unlimited, and the key's controls as
    its lookup found them (None from the playground)."""

    team_id: int
    user_id: int
    key_id: int | None
    balance: int
    unlimited: bool
    key: keys.Caller | None = None


@dataclass(frozen=True)
class Arrival:
    """How a speech request arrived: when (time.monotonic()), under which ids, and over which socket.

    `request_id` is the id it is logged under, used as its id in the usage list unless the
    client sent one of its own (`client_request_id`, kept beside it). `client` is the client's
    socket where the server gives it (gunicorn and Werkzeug do), for the write timeout and
    the hang-up watch; None elsewhere.
    """

    received: float
    request_id: str | None = None
    client_request_id: str | None = None
    client: socket.socket | None = None

    @classmethod
    def of(cls, environ: dict, received: float, request_id=None, client_request_id=None) -> "Arrival":
        """The arrival of the WSGI request whose `environ` this is."""
        client = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        return cls(received, request_id, client_request_id, client)


def serve(payer: Payer, order: Order, arrival: Arrival):
    """Charge `order` to `payer`, start the synthesis and answer with its audio stream.

    Raises ApiError for 400 (a name the upstream does not have), 402, 429 and 503 (every
    speech server busy; nothing written), and for 400/502 after the upstream refused or
    failed (refunded in full).
    """
    order = check_names(order)
    check_key_allows(payer.key, order)
    if order.timestamps:
        check_timestamps()
    admit(payer, order)
    slot = reserve(payer.team_id, lambda: admit_to_wait(payer))
    try:
        paid = charge(payer, order, arrival)
        started = time.monotonic()
        audio = open_upstream(paid.request_id, order, started, slot)
    except BaseException:
        slot.release()
        raise
    received = arrival.received
    relay = Relay(paid.request_id, order, audio, started, arrival.client)
    if order.stream_format == "json":
        response = current_app.response_class(
            json.dumps(captioned_answer(relay, order)), status=200, content_type="application/json"
        )
    else:
        if order.stream_format == "sse":
            body, content_type = sse_events(relay, order), "text/event-stream"
        elif order.stream_format == "lines":
            body, content_type = caption_lines(relay, order), "application/json"
        else:
            body, content_type = relay.chunks(), audio.content_type
        response = current_app.response_class(stream_with_context(body), status=200, content_type=content_type)
    # What this request cost and what was left right after it was charged (as GET /v1/balance says).
    response.headers["X-Credits-Charged"] = str(paid.credits)
    response.headers["X-Credits-Remaining"] = str(paid.balance)
    # The gateway's own time before the upstream call (its wait for a free server apart),
    # and the upstream's time to its first audio bytes.
    own = (started - received) * 1000 - slot.waited * 1000
    metrics.GATEWAY.observe(own / 1000)
    metrics.FIRST_BYTE.observe(started - received + audio.first_byte_ms / 1000)
    response.headers["Server-Timing"] = (
        f"gateway;dur={own:.2f}, queue;dur={slot.waited * 1000:.2f}, upstream;dur={audio.first_byte_ms:.2f}"
    )
    response.headers["Cache-Control"] = "no-store"
    # Asks nginx-style proxies not to buffer the stream.
    response.headers["X-Accel-Buffering"] = "no"
    # Closes the upstream connection (and frees its server's place) even when the body is never iterated.
    response.call_on_close(audio.close)
    response.call_on_close(_limit_client_writes(arrival.client, relay.idle_seconds))
    return response


def admit(payer: Payer, order: Order) -> None:
    """402 at once for a request its charge would refuse, before it takes a place on a speech server.

    The charge decides again, atomically (a balance can change meanwhile); this and
    `admit_to_wait` only keep a client that cannot pay from holding a place in the wait that a
    paying one needs.
    """
    cost = 0 if payer.unlimited else len(order.text)
    if payer.balance < cost:
        raise _insufficient(cost, payer.balance)
    key = payer.key
    if key is not None and key.spend_limit is not None:
        spent = keys.use_now(key)
        if spent + cost > key.spend_limit:
            raise _key_limit(keys.KeyLimitReached(key.spend_limit, spent, cost, keys.limit_resets_at(key)))
    db.session.rollback()


def admit_to_wait(payer: Payer) -> None:
    """429 for an account at its stream cap, before its request waits for a speech server (with a
    place free, the charge refuses it just the same, atomically, and the place is given back)."""
    limit = config.current().max_streams_per_account
    try:
        if metering.streams_in_flight(payer.team_id) >= limit:
            raise _too_many_streams(limit)
    finally:
        db.session.rollback()


def _insufficient(cost: int, balance: int) -> ApiError:
    return ApiError(
        402,
        f"Insufficient credits: this request costs {cost} credits and your balance is {balance}. Top up your balance.",
    )


def _key_limit(reached: keys.KeyLimitReached) -> ApiError:
    """402 for a request the key's spending limit does not cover, saying when the limit starts again."""
    spent = f"has spent {reached.spent} and this request costs {reached.cost}"
    if reached.resets_at is None:
        detail = (
            f"This key's spending limit is reached: it may spend {reached.limit} credits in all, {spent}. "
            "Raise the key's limit to go on."
        )
        return ApiError(402, detail, code="key_limit_reached")
    resets = keys.moment(reached.resets_at)
    detail = (
        f"This key's spending limit is reached: it may spend {reached.limit} credits until {resets}, {spent}. "
        f"The limit resets at {resets}."
    )
    wait = max(1, math.ceil((reached.resets_at - utcnow()).total_seconds()))
    return ApiError(402, detail, {"X-Key-Limit-Reset": resets, "Retry-After": str(wait)}, code="key_limit_reached")


def _too_many_streams(limit: int) -> ApiError:
    return ApiError(
        429,
        f"Too many concurrent speech streams for this account (at most {limit}). Retry when one has finished.",
        {"Retry-After": "1"},
        code="too_many_streams",
    )


def reserve(account: int, before_waiting=None) -> Slot:
    """A place on the least busy speech server, before anything is charged; 503 when all stay full,
    429 when `account` already has its share of the wait. `before_waiting` runs when all are
    full, before the request waits."""
    try:
        return services.upstream().reserve(account, before_waiting)
    except AccountQueueFull as full:
        raise ApiError(
            429,
            f"This account already has {full.limit} requests waiting for a speech server; "
            "nothing was charged. Retry when one has started.",
            {"Retry-After": str(full.retry_after)},
            code="too_many_waiting",
        ) from None
    except Busy as busy:
        raise ApiError(
            503,
            "Every speech server is busy. Nothing was charged; retry shortly.",
            {"Retry-After": str(busy.retry_after)},
            code="server_busy",
        ) from None


def charge(payer: Payer, order: Order, arrival: Arrival) -> metering.Charge:
    """Record and debit the request in one committed transaction."""
    settings = config.current()
    try:
        paid = metering.charge_speech(
            payer.team_id,
            payer.user_id,
            payer.key_id,
            unlimited=payer.unlimited,
            characters=len(order.text),
            model=order.model,
            voice=order.voice,
            response_format=order.response_format,
            speed=order.speed,
            max_streams=settings.max_streams_per_account,
            # The id this request is logged under (app/api.py) is its id in the usage list too.
            request_id=None if arrival.client_request_id else arrival.request_id,
            client_request_id=arrival.client_request_id,
            process_id=services.lease().process_id(),
        )
        db.session.commit()
    except billing.InsufficientCredits as short:
        db.session.rollback()
        raise _insufficient(short.cost, short.balance) from None
    except keys.KeyLimitReached as reached:
        db.session.rollback()
        raise _key_limit(reached) from None
    except metering.TooManyStreams as busy:
        db.session.rollback()
        raise _too_many_streams(busy.limit) from None
    except BaseException:
        db.session.rollback()
        raise
    metrics.CREDITS_CHARGED.inc(paid.credits)
    return paid


def open_upstream(request_id: str, order: Order, started: float, slot: Slot) -> SpeechStream:
    """The upstream's audio stream, its first bytes arrived; ApiError (refunded) otherwise.

    An upstream that refuses the request itself (400, 422) means the client asked for
    something it cannot serve: 400, so SDKs do not retry. Anything else is a 502.
    """
    try:
        upstream = services.upstream()
        if order.timestamps:
            # The captioned route, streamed; how the client gets it is the gateway's business.
            payload = {**order.payload, "stream": True, "return_timestamps": True}
            return upstream.open_speech(payload, config.current().stream_chunk_bytes, slot, captioned=True)
        return upstream.open_speech(order.payload, config.current().stream_chunk_bytes, slot)
    except UpstreamError as failure:
        _settle_refund(request_id, failure.detail, audio_ms=0, upstream_status=failure.status, duration_ms=_ms(started))
        # The answer carries the request's id, as every /v1 answer does (security_headers in app/__init__.py).
        if order.timestamps and failure.status in NO_SUCH_ROUTE:
            raise _no_timestamps("The charge was refunded.") from None
        if failure.blames_request:
            raise ApiError(
                400, f"The speech server refused this request: {failure.reason} The charge was refunded."
            ) from None
        raise ApiError(502, f"{failure.detail} Any charge for this request was refunded.") from None
    except BaseException:
        _settle_refund(request_id, "The gateway failed before any audio was sent.", audio_ms=0)
        raise


def sse_events(relay: "Relay", order: Order):
    """The relayed audio as OpenAI's speech events: `speech.audio.delta`s, then `speech.audio.done`.

    With word timings, a `speech.audio.timestamps` event goes in the same write as the delta
    holding the words' audio, just before it; with subtitles, `speech.audio.subtitles` comes
    before `speech.audio.done`. A stream that breaks off ends with an `error` event instead
    (settled as any break is).
    """
    said = []
    with contextlib.closing(relay.pieces()) as pieces:
        try:
            for audio, words in pieces:
                events = b""
                if words:
                    said += words
                    events += _event({"type": "speech.audio.timestamps", "words": words})
                if audio:
                    events += _event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")})
                yield events
        except StreamAborted as aborted:
            error = {"message": aborted.reason, "type": "server_error", "param": None, "code": "upstream_error"}
            yield _event({"type": "error", "error": error})
            return
    if order.subtitles:
        text = captions.subtitles(said, order.subtitles)
        yield _event({"type": "speech.audio.subtitles", "format": order.subtitles, "text": text})
    characters = len(order.text)
    usage = {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters}
    yield _event({"type": "speech.audio.done", "usage": usage})


def caption_lines(relay: "Relay", order: Order):
    """Kokoro-FastAPI's streamed captions: a JSON object per line, each a piece of audio in base64
    with the words it holds. A stream that breaks off is aborted, as plain audio is."""
    with contextlib.closing(relay.pieces()) as pieces:
        for audio, words in pieces:
            line = {"audio": base64.b64encode(audio).decode("ascii"), "audio_format": relay.audio_format}
            line["timestamps"] = words if order.with_words else None
            yield json.dumps(line, separators=(",", ":")).encode() + b"\n"


def captioned_answer(relay: "Relay", order: Order) -> dict:
    """The whole audio in base64 with every word's timing, in Kokoro-FastAPI's captioned shape.

    Nothing reaches the client before the synthesis is whole: a break on the way is refunded
    in full and answered 502.
    """
    audio, words = [], []
    try:
        for piece, placed in relay.pieces():
            audio.append(piece)
            words += placed
    except StreamAborted as aborted:
        raise ApiError(502, aborted.reason, code="upstream_error") from None
    answer = {
        "audio": base64.b64encode(b"".join(audio)).decode("ascii"),
        "audio_format": relay.audio_format,
        "timestamps": words if order.with_words else None,
    }
    if order.subtitles:
        answer["subtitles"] = captions.subtitles(words, order.subtitles)
    return answer


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class StreamAborted(Exception):
    """Raised inside the body so the server aborts the response instead of ending it cleanly."""

    def __init__(self, request_id: str, reason: str):
        super().__init__(f"speech request {request_id}: {reason}")
        self.reason = reason


class Relay:
    """The audio of one charged request, relayed as it arrives and settled when it ends."""

    def __init__(self, request_id: str, order: Order, audio: SpeechStream, started: float, client=None):
        """`client`: the client's socket, where the server gives it (gunicorn and Werkzeug do)."""
        settings = config.current()
        self.client = client
        self.client_left = False
        self.request_id = request_id
        self.audio = audio
        self.started = started
        self.first_byte_ms = _ms(started)
        self.meter = audio_meter.for_format(order.response_format)
        self.sent = 0
        self.heartbeat = settings.stream_heartbeat_seconds
        self.deadline = started + settings.max_stream_seconds
        self.idle_seconds = settings.client_idle_seconds
        self.last_beat = time.monotonic()
        # The audio the last progress record covers, and when the last chunk was handed to the client.
        self.recorded_ms = 0
        self.handed_at = None
        # Word timings relayed with the audio (app/captions.py), when the order asked for them,
        # and the audio's type as the server names it in its captioned lines.
        self.words = captions.Words(order.text) if order.timestamps else None
        self.audio_format = "audio/mpeg" if order.response_format == "mp3" else f"audio/{order.response_format}"
        # One JSON answer: nothing goes to the client before the end, so until then nothing
        # counts as delivered, and a break is refunded in full.
        self.hold = order.stream_format == "json"
        self.held: list[bytes] = []

    def audio_ms(self) -> int | None:
        """The audio in what was handed to the client so far; None when it cannot be measured."""
        return int(self.meter.seconds * 1000) if self.meter.understood else None

    def outcome(self, **extra) -> dict:
        return {
            "upstream_status": self.audio.status,
            "bytes_sent": self.sent,
            "audio_ms": self.audio_ms(),
            "first_byte_ms": self.first_byte_ms,
            "duration_ms": _ms(self.started),
            **extra,
        }

    def chunks(self):
        """Yield the audio as it arrives; settle the charge however the stream ends."""
        with contextlib.closing(self.pieces()) as pieces:
            for chunk, _ in pieces:
                yield chunk

    def pieces(self):
        """Yield (audio, words) as they arrive; settle the charge however the stream ends.

        `words` are the timings that came with the audio (empty without timings)."""
        metrics.STREAMS.inc()
        # A client that leaves while the stream waits for the speech server ends that wait at once.
        unwatch = services.hangups().add(self.client, self._left) if self.client else None
        try:
            for chunk, words in self._upstream_pieces():
                now = time.monotonic()
                self._check_deadline(now)
                if self.hold:
                    self.held.append(chunk)
                else:
                    self._count(chunk)
                # Progress is written before the chunk is handed over: what settle sees covers it.
                self._beat(now)
                self.handed_at = time.monotonic()
                yield chunk, words
        except GeneratorExit:
            # The client hung up, or took nothing for CLIENT_IDLE_SECONDS (its socket's writes timed
            # out): what it received was synthesised for it, so the charge stands.
            _settle(metering.mark_delivered, self.request_id, **self.outcome(error=self._why_closed()))
            raise
        except requests.RequestException as exc:
            if self.client_left:
                # The upstream was shut down because the client hung up: the charge stands, as below.
                _settle(metering.mark_delivered, self.request_id, **self.outcome(error="client disconnected"))
                return
            metrics.UPSTREAM_FAILURES.labels("stalled" if timed_out(exc) else "broke_off").inc()
            reason = "Upstream stalled mid-stream." if timed_out(exc) else "Upstream broke off mid-stream."
            if isinstance(exc, captions.NotCaptions):
                # The server broke its side off with a line that says what was wrong with it.
                reason = str(exc)
            _settle_refund(self.request_id, reason, **self.outcome())
            raise StreamAborted(self.request_id, f"{reason} The undelivered part was refunded.") from exc
        finally:
            if unwatch is not None:
                unwatch()
            # The upstream's part is over: its server's place is free before the client sees the end.
            self.audio.close()
            metrics.STREAMS.dec()
        for chunk in self.held:
            self._count(chunk)
        if self.words is not None and not self.sent:
            # Plain audio is checked for its first bytes before the charge stands (app/upstream.py);
            # captioned lines carry it inside: lines without any are a failure like no audio.
            reason = "The speech server sent no audio."
            _settle_refund(self.request_id, reason, **self.outcome())
            raise StreamAborted(self.request_id, f"{reason} The charge was refunded.")
        _settle(metering.mark_delivered, self.request_id, **self.outcome())

    def _count(self, chunk: bytes) -> None:
        self.sent += len(chunk)
        self.meter.feed(chunk)

    def _upstream_pieces(self):
        # The first chunk, then the rest without empty ones.
        chunks = itertools.chain((self.audio.first_chunk,), filter(None, self.audio.rest))
        if self.words is None:
            return ((chunk, ()) for chunk in chunks)
        return self._captioned(captions.lines(chunks))

    def _captioned(self, lines):
        """Each line's audio with its words; the words of a line without audio wait for the next
        (they describe audio still to come); any left at the end go last, when there was audio."""
        waiting, any_audio = [], False
        for line in lines:
            self.audio_format = line.audio_format or self.audio_format
            waiting += self.words.take(line.words)
            if line.audio:
                any_audio = True
                yield line.audio, waiting
                waiting = []
        if waiting and any_audio:
            yield b"", waiting

    def _check_deadline(self, now: float) -> None:
        if now > self.deadline:
            limit = config.current().max_stream_seconds
            reason = f"The stream ran past the longest allowed ({limit:g} s)."
            self.audio.close()
            _settle_refund(self.request_id, reason, **self.outcome())
            raise StreamAborted(self.request_id, f"{reason} The undelivered part was refunded.")

    def _left(self) -> None:
        """The client hung up (app/hangups.py): end the wait for the speech server, from the watching thread."""
        self.client_left = True
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            # urllib3's way to interrupt a read blocked in another thread.
            self.audio.response.raw.shutdown()

    def _why_closed(self) -> str:
        if self.handed_at is not None and time.monotonic() - self.handed_at >= self.idle_seconds:
            return f"client took nothing for {self.idle_seconds:g} s"
        return "client disconnected"

    def _beat(self, now: float) -> None:
        """Record progress once STREAM_HEARTBEAT_SECONDS have passed, or as much audio has gone out unrecorded.

        Audio outpaces the clock when synthesis is faster than real time: counting both keeps
        what a crash could refund of delivered audio to one heartbeat's worth.
        """
        audio_ms = self.audio_ms()
        unrecorded_ms = 0 if audio_ms is None else audio_ms - self.recorded_ms
        if now - self.last_beat < self.heartbeat and unrecorded_ms < self.heartbeat * 1000:
            return
        self.last_beat, self.recorded_ms = now, audio_ms or 0
        try:
            # A stream writes one every heartbeat: the round trips saved are CPU saved.
            _one_statement()
            live = metering.record_progress(self.request_id, self.sent, audio_ms)
            db.session.commit()
        except SQLAlchemyError:
            db.session.rollback()
            current_app.logger.exception("could not record progress of speech request %s", self.request_id)
            return
        if not live:
            # Settled meanwhile (by `flask speech settle`): not one more byte goes out.
            self.audio.close()
            raise StreamAborted(self.request_id, "The request was settled while it streamed.")


def _limit_client_writes(client, seconds: float):
    """Make writes to this request's client time out after `seconds` without progress; returns the undo.

    A client that stops reading blocks the relay in a socket write once the buffers between
    are full; the timeout ends such a write, and the server then closes the response like a
    hang-up (the charge stands, the upstream is closed, the thread is free). The socket is
    the server's own (gunicorn and Werkzeug put it in the environ); where there is none the
    stream is left as it is.
    """
    try:
        before = client.gettimeout()
        client.settimeout(seconds)
    except (AttributeError, OSError):
        return lambda: None

    def undo():
        with contextlib.suppress(OSError):
            client.settimeout(before)

    return undo


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _one_statement() -> None:
    """The transaction starting now (the session holds none) is one statement: committed as it runs, as
    durably, without the round trips of BEGIN and COMMIT. Its connection goes back to the pool
    transactional again (SQLAlchemy resets the isolation level on release)."""
    db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def _settle(settle, request_id: str, *args, **details) -> None:
    try:
        # A delivery is one statement; a refund writes several (the request, the balance, the ledger, the
        # key's use), all or nothing, so it stays one transaction.
        if settle is metering.mark_delivered:
            _one_statement()
        settle(request_id, *args, **details)
        db.session.commit()
    except SQLAlchemyError:
        # The request stays `charged`: this process tries again with each renewal of its lease
        # (app/liveness.py), and should it die first, `flask speech settle` settles it.
        db.session.rollback()
        current_app.logger.exception("could not settle speech request %s", request_id)
        services.lease().retry_later(functools.partial(settle, request_id, *args, **details))


def _settle_refund(request_id: str, reason: str, **details) -> None:
    _settle(metering.refund_speech, request_id, reason, **details)
