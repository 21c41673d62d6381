"""A stand-in Kokoro server (a WSGI app) whose behaviour each test sets."""

import json
import threading

MODELS = {
    "object": "list",
    "data": [{"id": "kokoro", "object": "model", "created": 1686935002, "owned_by": "kokoro"}],
}
VOICES = {"voices": ["af_bella", "af_heart", "af_sky", "am_adam"]}
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

    def __init__(self, chunks=(b"ID3\x04audio-", b"bytes"), *, gate=None, break_after=None, endless=False):
        self.chunks = list(chunks)
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
            return self._json(start_response, "200 OK", VOICES)
        if path == "/v1/audio/speech" and environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length))
            self.received.append(body)
            if body.get("voice") == "af_nicole":
                return self._json(start_response, "400 Bad Request", {"detail": "Voice 'af_nicole' is not available"})
            content_type = CONTENT_TYPES[body.get("response_format", "mp3")]
            start_response("200 OK", [("Content-Type", content_type)])
            return self._stream()
        return self._json(start_response, "404 Not Found", {"detail": "Not Found"})

    def _stream(self):
        try:
            for index, chunk in enumerate(self.chunks):
                if self.break_after is not None and index == self.break_after:
                    raise ConnectionAbortedError("fake upstream breaks off")
                yield chunk
                if index == 0 and self.gate is not None:
                    self.gate.wait(timeout=30)
            while self.endless:
                yield self.chunks[-1]
            self.finished.set()
        finally:
            self.stream_closed.set()

    @staticmethod
    def _json(start_response, status, document):
        body = json.dumps(document).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
