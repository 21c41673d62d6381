"""A stand-in Kokoro server for benchmarks: Kokoro-FastAPI's routes, audio of a size set by the
input, paced like a fast GPU server. Serve with gunicorn: `gunicorn bench.standin:app`.

Settings (environment): STANDIN_TTFB_MS (latency to the first byte, default 50),
STANDIN_BITRATE_KBPS (default 128), STANDIN_SPEED (seconds of audio made per second, default 20),
STANDIN_CHARS_PER_SECOND (speech rate, default 15). A request may ask for an exact size with the
input text "standin_bytes=N" (the gateway sends only the fields it knows upstream).

`GET /stats` says how many speech streams this process has open now and the most it had open at
once (`{"open": …, "most": …}`): run with one worker, that is the server's.
"""

import json
import os
import re
import threading
import time

TTFB = float(os.environ.get("STANDIN_TTFB_MS", "50")) / 1000
BYTES_PER_SECOND = int(os.environ.get("STANDIN_BITRATE_KBPS", "128")) * 1000 // 8
SPEED = float(os.environ.get("STANDIN_SPEED", "20"))
CHARS_PER_SECOND = float(os.environ.get("STANDIN_CHARS_PER_SECOND", "15"))
CHUNK_AUDIO_SECONDS = 0.25
# Real MPEG-2 Layer III frame headers (24 kHz mono, 128 kbit/s: 384 bytes, 576 samples a frame) before
# silent frame bodies, so the gateway meters the stream as it would Kokoro-FastAPI's MP3.
FRAME = b"\xff\xf3\xc4\xc0" + bytes(380)
CHUNK = FRAME * max(1, int(BYTES_PER_SECOND * CHUNK_AUDIO_SECONDS) // len(FRAME))
MODELS = {
    "object": "list",
    "data": [
        {"id": name, "object": "model", "created": 1686935002, "owned_by": "kokoro"}
        for name in ("tts-1", "tts-1-hd", "kokoro", "gpt-4o-mini-tts")
    ],
}
VOICES = {"voices": [{"id": name, "name": name} for name in ("af_bella", "af_heart", "af_sky", "am_adam")]}


def _json(start_response, status, document):
    body = json.dumps(document).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


_streams = {"open": 0, "most": 0}
_counting = threading.Lock()


def _audio(total: int):
    with _counting:
        _streams["open"] += 1
        _streams["most"] = max(_streams["most"], _streams["open"])
    try:
        time.sleep(TTFB)
        pause = CHUNK_AUDIO_SECONDS / SPEED
        sent = 0
        while sent < total:
            piece = CHUNK if total - sent >= len(CHUNK) else CHUNK[: total - sent]
            yield piece
            sent += len(piece)
            if sent < total and pause:
                time.sleep(pause)
    finally:
        with _counting:
            _streams["open"] -= 1


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/v1/models":
        return _json(start_response, "200 OK", MODELS)
    if path == "/v1/audio/voices":
        return _json(start_response, "200 OK", VOICES)
    if path == "/stats":
        with _counting:
            return _json(start_response, "200 OK", dict(_streams))
    if path == "/v1/audio/speech" and environ["REQUEST_METHOD"] == "POST":
        body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        exact = re.fullmatch(r"standin_bytes=(\d+)", body["input"])
        total = int(exact.group(1)) if exact else int(len(body["input"]) / CHARS_PER_SECOND * BYTES_PER_SECOND)
        start_response("200 OK", [("Content-Type", "audio/mpeg")])
        return _audio(max(total, 1))
    return _json(start_response, "404 Not Found", {"detail": "Not Found"})
