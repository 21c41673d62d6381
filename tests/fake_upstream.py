"""A stand-in Kokoro server (a WSGI app) whose behaviour each test sets."""

import base64
import json
import re
import threading
import time

# What Kokoro-FastAPI answers (api/src/routers/openai_compatible.py): its four model names,
# and the Kokoro v1.0 voices as {"id", "name"} objects (plain ids with ?legacy=true).
MODELS = {
    "object": "list",
    "data": [
        {"id": model, "object": "model", "created": 1686935002, "owned_by": "kokoro"}
        for model in ("tts-1", "tts-1-hd", "kokoro", "gpt-4o-mini-tts")
    ],
}
KOKORO_VOICES = (
    "af_alloy af_aoede af_bella af_heart af_jessica af_kore af_nicole af_nova af_river af_sarah af_sky "
    "am_adam am_echo am_eric am_fenrir am_liam am_michael am_onyx am_puck am_santa "
    "bf_alice bf_emma bf_isabella bf_lily bm_daniel bm_fable bm_george bm_lewis "
    "ef_dora em_alex em_santa ff_siwis hf_alpha hf_beta hm_omega hm_psi if_sara im_nicola "
    "jf_alpha jf_gongitsune jf_nezumi jf_tebukuro jm_kumo pf_dora pm_alex pm_santa "
    "zf_xiaobei zf_xiaoni zf_xiaoxiao zf_xiaoyi zm_yunjian zm_yunxi zm_yunxia zm_yunyang"
).split()
VOICES = {"voices": [{"id": voice, "name": voice} for voice in KOKORO_VOICES]}
LEGACY_VOICES = {"voices": list(KOKORO_VOICES)}


def stub_catalog(mock, base_url: str) -> None:
    """Register Kokoro-FastAPI's catalog answers on a `responses` mock (speech requests check names in it)."""
    mock.get(f"{base_url}/models", json=MODELS)
    mock.get(f"{base_url}/audio/voices", json=VOICES)


CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "opus": "audio/opus",
    "flac": "audio/flac",
    "aac": "audio/aac",
    "pcm": "audio/pcm",
}


class FakeUpstream:
    """Streams `chunks` (chunked encoding) for each speech request.

    gate: when set to a threading.Event, the stream pauses after the first chunk until it is set.
    break_after: raise after this many chunks, so the connection ends without its final chunk.
    endless: keep sending the last chunk until the reader goes away.
    """

    def __init__(
        self,
        chunks=(b"ID3\x04audio-", b"bytes"),
        *,
        gate=None,
        break_after=None,
        endless=False,
        captions="ours",
    ):
        """captions: "ours" (the embedded engine's captioned route: each word says where it is in
        the input), "kokoro-fastapi" (its own: word and times only), or None (an upstream
        without the route, as Kokoro-FastAPI before it had one)."""
        self.chunks = list(chunks)
        self.captions = captions
        self.gate = gate
        self.break_after = break_after
        self.endless = endless
        self.received = []
        self.finished = threading.Event()
        self.stream_closed = threading.Event()

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/v1/models":
            return self._json(start_response, "200 OK", MODELS)
        if path == "/v1/audio/voices":
            legacy = "legacy=true" in environ.get("QUERY_STRING", "")
            return self._json(start_response, "200 OK", LEGACY_VOICES if legacy else VOICES)
        if path == "/openapi.json" and self.captions:
            paths = {"/v1/audio/speech": {}, "/dev/captioned_speech": {}}
            return self._json(start_response, "200 OK", {"openapi": "3.1.0", "paths": paths})
        if path == "/dev/captioned_speech" and environ["REQUEST_METHOD"] == "POST" and self.captions:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length))
            self.received.append({**body, "path": path})
            start_response("200 OK", [("Content-Type", "application/json")])
            return self._captioned(body)
        if path == "/v1/audio/speech" and environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length))
            self.received.append(body)
            if body.get("voice") == "af_nicole":
                # Listed, but refused when asked for: the catalog was out of date.
                refusal = {
                    "error": "validation_error",
                    "message": f"Voice 'af_nicole' not found. Available voices: {', '.join(KOKORO_VOICES)}",
                    "type": "invalid_request_error",
                }
                return self._json(start_response, "400 Bad Request", {"detail": refusal})
            content_type = CONTENT_TYPES[body.get("response_format", "mp3")]
            start_response("200 OK", [("Content-Type", content_type)])
            return self._stream()
        return self._json(start_response, "404 Not Found", {"detail": "Not Found"})

    def _stream(self):
        return self._send(self.chunks)

    def _send(self, chunks):
        try:
            for index, chunk in enumerate(chunks):
                if self.break_after is not None and index == self.break_after:
                    raise ConnectionAbortedError("fake upstream breaks off")
                yield chunk
                if index == 0 and self.gate is not None:
                    self.gate.wait(timeout=30)
            while self.endless:
                yield chunks[-1]
            self.finished.set()
        finally:
            self.stream_closed.set()

    def _captioned(self, body):
        """One JSON line per chunk: its audio in base64 and the words it holds. The words are dealt
        out over the chunks in order; a chunk of PCM lasts its bytes / 48,000 seconds, any other 0.1 s."""
        found = list(re.finditer(r"\S+", body["input"]))
        content_type = CONTENT_TYPES[body.get("response_format", "mp3")]
        timed = self._timed_chunks(body)
        lines, start = [], 0.0
        for index, (chunk, seconds) in enumerate(timed):
            mine = [m for k, m in enumerate(found) if k * len(timed) // len(found) == index]
            words = []
            for k, match in enumerate(mine):
                word = {
                    "word": match.group(),
                    "start_time": round(start + seconds * k / len(mine), 3),
                    "end_time": round(start + seconds * (k + 1) / len(mine), 3),
                }
                if self.captions == "ours":
                    word.update(char_start=match.start(), char_end=match.end())
                words.append(word)
            start += seconds
            line = {"audio": base64.b64encode(chunk).decode(), "audio_format": content_type, "timestamps": words}
            lines.append(json.dumps(line).encode() + b"\n")
        return self._send(lines)

    def _timed_chunks(self, body) -> list[tuple[bytes, float]]:
        """The chunks of audio for `body`, each with how long it plays."""
        pcm = body.get("response_format") == "pcm"
        return [(chunk, len(chunk) / 48000 if pcm else 0.1) for chunk in self.chunks]

    @staticmethod
    def _json(start_response, status, document):
        body = json.dumps(document).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


class Failing(FakeUpstream):
    """Answers 500 (before any audio) to every `every`-th speech request, until `healed`."""

    def __init__(self, every: int = 1):
        super().__init__([b"ID3", b"audio"])
        self.every = every
        self.healed = False
        self.attempts = 0
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/v1/audio/speech" and not self.healed:
            with self._lock:
                self.attempts += 1
                broken = self.attempts % self.every == 0
            if broken:
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                return self._json(start_response, "500 Internal Server Error", {"detail": "CUDA out of memory"})
        return super().__call__(environ, start_response)


class Silent(FakeUpstream):
    """Sends its 200 and headers, then nothing until `release` is set; only for `voice`, when given."""

    def __init__(self, voice: str | None = None):
        super().__init__()
        self.voice = voice
        self.release = threading.Event()

    def _stream(self):
        if self.voice is None or self.received[-1].get("voice") == self.voice:
            yield b""
            self.release.wait(10)
            if self.voice is None:
                yield b"too late"
            return
        yield from super()._stream()


class Paced(FakeUpstream):
    """Sends `chunks` one every `interval` seconds."""

    def __init__(self, chunks, interval: float):
        super().__init__(chunks)
        self.interval = interval

    def _stream(self):
        for chunk in self.chunks:
            yield chunk
            # A sleep on purpose: a server that really takes its time, for the gateway's real timers.
            time.sleep(self.interval)
        self.finished.set()


class KokoroStandIn(FakeUpstream):
    """Kokoro-FastAPI's answers without its model: a tone as long as the text would be, really encoded;
    its captioned route as Kokoro-FastAPI's (words and times, no place in the input)."""

    def __init__(self):
        super().__init__(captions="kokoro-fastapi")

    def _stream(self):
        for chunk, _ in self._timed_chunks(self.received[-1]):
            yield chunk

    def _timed_chunks(self, body):
        import numpy as np

        from engine.audio import Encoder

        seconds = max(0.5, len(body["input"]) / 15 / float(body.get("speed", 1.0)))
        t = np.arange(int(24000 * seconds)) / 24000
        tone = (0.2 * np.sin(2 * np.pi * 220 * t)).astype("float32")
        encoder = Encoder(body.get("response_format", "mp3"))
        timed = []
        for piece in np.array_split(tone, 4):
            chunk = encoder.feed(piece)
            if chunk:
                timed.append((chunk, len(piece) / 24000))
        tail = encoder.close()
        if tail:
            timed.append((tail, 0.0))
        return timed


class Counting(FakeUpstream):
    """Counts its speech streams open at once (`open`) and the most ever open at once (`most`):
    a Kokoro server sized for a number of streams, which tells whether the gateways kept to it.
    Each stream is held `hold` seconds after its first chunk, or until `gate` is set."""

    def __init__(self, hold: float = 0.0, gate: threading.Event | None = None):
        super().__init__(gate=gate)
        self.hold = hold
        self.open = 0
        self.most = 0
        self._lock = threading.Lock()

    def _stream(self):
        with self._lock:
            self.open += 1
            self.most = max(self.most, self.open)
        try:
            yield self.chunks[0]
            if self.gate is not None:
                self.gate.wait(timeout=30)
            time.sleep(self.hold)
            yield from self.chunks[1:]
        finally:
            with self._lock:
                self.open -= 1
