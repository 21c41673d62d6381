"""A Kokoro TTS server with Kokoro-FastAPI's OpenAI-style routes, on the CPU.

Run as its own process (`gunicorn 'engine.server:create_app()'`), never inside the
gateway's workers: the model takes about half a gigabyte.
"""

import base64
import contextlib
import heapq
import itertools
import json
import logging
import re
import select
import socket
import threading
from dataclasses import dataclass

import numpy as np
from flask import Flask, Response, jsonify, request, stream_with_context
from werkzeug.exceptions import HTTPException

from engine import assets, captions
from engine.audio import CONTENT_TYPES, SAMPLE_RATE, Encoder, time_stretch

log = logging.getLogger(__name__)

MODELS = ["tts-1", "tts-1-hd", "kokoro", "gpt-4o-mini-tts"]
CREATED = 1686935002
FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
# The first letter of a voice id names its language (Kokoro's lang_code), here as espeak-ng codes.
LANGUAGES = {
    "a": "en-us",
    "b": "en-gb",
    "e": "es",
    "f": "fr-fr",
    "h": "hi",
    "i": "it",
    "j": "ja",
    "p": "pt-br",
    "z": "cmn",
}
# Sentences end at . ! ? (and their CJK forms) followed by space or the end.
# The speeds kokoro-onnx itself accepts; beyond them the audio is time-stretched.
MODEL_SPEEDS = (0.5, 2.0)
VOICE_PART = re.compile(r"(?P<name>[A-Za-z0-9_]+)(?:\((?P<weight>\d+(?:\.\d+)?)\))?")
SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
MAX_SENTENCE = 400
# Clauses end at , ; : and dashes (and their CJK forms) followed by space.
CLAUSE_END = re.compile(r"(?<=[,;:—–，；：、])\s+|\s+(?=[—–]\s)")
# A first sentence longer than this is spoken from its first clause on its own.
FIRST_PIECE = 60
FIRST_CLAUSE_MIN = 16
# The silence kept after the last sound of a request (seconds, at the speed the model spoke).
END_SILENCE = 0.05


class Turns:
    """The model's turns, one at a time: a request still waiting for its first audio goes
    before requests already streaming, and otherwise turns go in the order they were asked
    for. So a short request that arrives while a long one streams waits for one piece of
    it, not for all of it (a plain lock lets the thread that just let go take it again).
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._queue: list[tuple[int, int]] = []
        self._tickets = itertools.count()
        self._busy = False

    @contextlib.contextmanager
    def turn(self, first: bool):
        entry = (0 if first else 1, next(self._tickets))
        with self._changed:
            heapq.heappush(self._queue, entry)
            while self._busy or self._queue[0] != entry:
                self._changed.wait()
            heapq.heappop(self._queue)
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()


class Synthesizer:
    """The loaded model and voices; one synthesis at a time per process, in turns."""

    def __init__(self, model_path: str, voices_path: str, turns: Turns | None = None):
        from kokoro_onnx import Kokoro

        self._kokoro = Kokoro(model_path, voices_path)
        self.voices = sorted(self._kokoro.get_voices())
        self.turns = turns or Turns()
        # espeak-ng is not thread-safe; it has a lock of its own, so phonemising a new request
        # never waits for the model, nor makes it lose its place in the model's turns.
        self._phonemizer = threading.Lock()

    def style(self, voice: str) -> np.ndarray:
        """A voice id, or a blend as Kokoro-FastAPI takes it, as a style array.

        "af_bella(2)+af_sky(1)" weighs the voices 2:1; "af_bella-af_sky" takes af_sky's
        share away. Weights (1 when not given) are divided by their sum.
        """
        parts = blend(voice)
        missing = [name for _, name, _ in parts if name not in self.voices]
        if missing:
            raise ValueError(f"Voice '{missing[0]}' not found.")
        total = sum(weight for _, _, weight in parts)
        return sum(
            (-1 if sign == "-" else 1) * (weight / total) * self._kokoro.get_voice_style(name)
            for sign, name, weight in parts
        )

    def phonemes(self, text: str, lang: str) -> str:
        """Kokoro's phonemes for `text`; "" when none of them is one the model can say.

        Every piece of a text is phonemised before its first audio byte is sent, so a
        piece that cannot be spoken (private-use characters, digits of a script espeak-ng
        does not read, a lone surrogate) is known before the stream starts, not halfway.
        """
        with self._phonemizer:
            try:
                phonemes = " ".join(self._kokoro.tokenizer.phonemize(text, lang).split())
            except (UnicodeError, ValueError, RuntimeError):
                return ""
        return phonemes if self._kokoro.tokenizer.tokenize(phonemes) else ""

    def plan(self, piece: str, offset: int, lang: str) -> captions.Plan | None:
        """How to speak `piece` (at code point `offset` of the input) so each word's phonemes are known."""
        whole = self.phonemes(piece, lang)
        if not whole:
            return None
        piece_words = captions.words(piece, offset)
        return captions.plan(piece_words, whole, [self.phonemes(word.text, lang) for word in piece_words])

    def speak(self, phonemes: str, style: np.ndarray, speed: float, lang: str, first: bool = True, last: bool = False):
        """One piece's audio at `speed` (0.25–4.0), when each phoneme is spoken (kokoro-onnx's timings,
        before any time stretch) and how much longer the stretch made the audio.

        The model speaks 0.5–2.0, time-stretching does the rest. `first`: no audio of this
        request has gone out yet (its turn comes sooner). `last`: no piece follows, so the
        pause after its final mark is cut to END_SILENCE (a pause separates sentences; after
        the last one it is only dead air).
        """
        model_speed = min(max(speed, MODEL_SPEEDS[0]), MODEL_SPEEDS[1])
        with self.turns.turn(first):
            samples, _, timings = self._kokoro.create_timed(
                phonemes, style, speed=model_speed, lang=lang, is_phonemes=True
            )
        if last:
            # Cut before the stretch, so that stretched audio is the model's own at another tempo.
            samples = samples[: captions.end_of_speech(samples, END_SILENCE)]
        stretched = time_stretch(samples, speed / model_speed)
        return stretched, timings, len(stretched) / len(samples) if len(samples) else 1.0


def blend(voice: str) -> list[tuple[str, str, float]]:
    """(sign, name, weight) for each voice in a blend; ValueError for a malformed one."""
    pieces = re.split(r"([+-])", voice.replace(" ", ""))
    parts = []
    for index in range(0, len(pieces), 2):
        match = VOICE_PART.fullmatch(pieces[index])
        if match is None:
            raise ValueError(f"Voice '{voice}' is not a voice or a blend such as af_bella(2)+af_sky(1).")
        weight = float(match["weight"]) if match["weight"] else 1.0
        parts.append(("+" if index == 0 else pieces[index - 1], match["name"], weight))
    if sum(weight for _, _, weight in parts) <= 0:
        raise ValueError(f"Voice '{voice}' has no weight.")
    return parts


def sentences(text: str) -> list[str]:
    """Split text at sentence ends; a run longer than MAX_SENTENCE is cut at clause marks, else at spaces."""
    pieces = []
    for sentence in SENTENCE_END.split(text.strip()):
        while len(sentence) > MAX_SENTENCE:
            clauses = [match.end() for match in CLAUSE_END.finditer(sentence, 0, MAX_SENTENCE)]
            cut = clauses[-1] if clauses else sentence.rfind(" ", 0, MAX_SENTENCE)
            cut = cut if cut > 0 else MAX_SENTENCE
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence.strip():
            pieces.append(sentence)
    return pieces


def pieces(text: str) -> list[str]:
    """The pieces a text is spoken in: sentences, the first one cut after its first clause.

    The first audio waits for the first piece only, so a long first sentence is spoken in
    two: up to its first clause mark (a comma, semicolon, colon or dash after at least
    FIRST_CLAUSE_MIN characters), then the rest. Later pieces are whole sentences, so
    their phrasing is the model's own.
    """
    spoken = sentences(text)
    if spoken and len(spoken[0]) > FIRST_PIECE:
        first = CLAUSE_END.search(spoken[0], FIRST_CLAUSE_MIN)
        if first and first.end() < len(spoken[0]):
            spoken[0:1] = [spoken[0][: first.end()].strip(), spoken[0][first.end() :].strip()]
    return spoken


def _error(status: int, message: str, error: str = "validation_error", kind: str = "invalid_request_error"):
    return jsonify(detail={"error": error, "message": message, "type": kind}), status


def _field_error(field: str, message: str, value):
    """FastAPI's 422 body for a request field that fails validation."""
    return jsonify(detail=[{"type": "value_error", "loc": ["body", field], "msg": message, "input": value}]), 422


def client_gone(environ: dict) -> bool:
    """True once this request's client has closed its connection (end of stream or reset on its socket).

    Peeks without taking anything; False when the server gives no socket or it cannot tell
    (a TLS socket, which cannot peek).
    """
    client = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if client is None:
        return False
    try:
        waiting, _, _ = select.select([client], [], [], 0)
        return bool(waiting) and client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, ValueError):
        return False
    except OSError:
        return True


@dataclass(frozen=True)
class Request:
    """A checked synthesis request."""

    text: str
    parts: list[str]
    style: np.ndarray
    lang: str
    speed: float
    volume: float
    response_format: str

    def louder(self, samples: np.ndarray) -> np.ndarray:
        return samples * self.volume if self.volume != 1.0 else samples


def made(synthesizer: Synthesizer, order: Request, spoken: list, environ: dict):
    """(audio bytes, timed words) for each piece of `spoken` as the encoder gives them out.

    A piece is its phonemes, or a captions.Plan when its words are to be timed; a piece whose
    audio the encoder still holds gives its words to the next. Before each piece but the
    first, a client that has gone ends it: the model's next turn goes to a request that has one.
    """
    encoder, done, pending = Encoder(order.response_format), 0, []
    for index, piece in enumerate(spoken):
        if index and client_gone(environ):
            log.info("client gone after %d of %d pieces; the rest is not synthesised", index, len(spoken))
            return
        timed = isinstance(piece, captions.Plan)
        samples, timings, scale = synthesizer.speak(
            piece.phonemes if timed else piece,
            order.style,
            order.speed,
            order.lang,
            first=index == 0,
            last=index == len(spoken) - 1,
        )
        if timed:
            pending += captions.place(piece, timings, samples, done / SAMPLE_RATE, scale)
        done += len(samples)
        chunk = encoder.feed(order.louder(samples))
        if chunk:
            yield chunk, pending
            pending = []
    yield encoder.close(), pending


def _audio_headers(order: Request) -> dict:
    return {
        "Content-Disposition": f"attachment; filename=speech.{order.response_format}",
        "X-Accel-Buffering": "no",
        "Cache-Control": "no-cache",
    }


def create_app(synthesizer: Synthesizer | None = None, split=pieces) -> Flask:
    """The engine's app; `split` cuts a text into the pieces it is spoken in (see `pieces`)."""
    app = Flask(__name__)
    if synthesizer is None:
        model_path, voices_path = assets.ensure()
        synthesizer = Synthesizer(str(model_path), str(voices_path))
    app.extensions["synthesizer"] = synthesizer

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify(detail=error.description), error.code

    @app.get("/v1/models")
    def models():
        return jsonify(
            object="list",
            data=[{"id": model, "object": "model", "created": CREATED, "owned_by": "kokoro"} for model in MODELS],
        )

    @app.get("/v1/audio/voices")
    def voices():
        if request.args.get("legacy", "").lower() == "true":
            return jsonify(voices=synthesizer.voices)
        return jsonify(voices=[{"id": voice, "name": voice} for voice in synthesizer.voices])

    @app.get("/health")
    def health():
        return jsonify(status="healthy")

    @app.get("/openapi.json")
    def openapi():
        """The routes this engine has, as Kokoro-FastAPI's own document lists them (a gateway reads
        `paths` to know whether word timings can be asked of it)."""
        paths = ["/v1/models", "/v1/audio/voices", "/v1/audio/speech", "/dev/captioned_speech", "/health"]
        return jsonify(
            openapi="3.1.0",
            info={"title": "kokoro-pay engine", "version": "1"},
            paths={path: {} for path in paths},
        )

    def read(body):
        """The checked request, or the error to answer with (Kokoro-FastAPI's 400s and 422s)."""
        if not isinstance(body, dict):
            return _field_error("body", "Input should be a valid JSON object", None)
        text, model = body.get("input"), body.get("model", "kokoro")
        voice, response_format = body.get("voice", "af_heart"), body.get("response_format", "mp3")
        speed = body.get("speed", 1.0)
        if not isinstance(text, str):
            return _field_error("input", "Field required" if text is None else "Input should be a valid string", text)
        if response_format not in FORMATS:
            return _field_error(
                "response_format", "Input should be 'mp3', 'opus', 'aac', 'flac', 'wav' or 'pcm'", response_format
            )
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
            return _field_error("speed", "Input should be a number from 0.25 to 4.0", speed)
        for flag in ("stream", "return_timestamps"):
            if flag in body and not isinstance(body[flag], bool):
                return _field_error(flag, "Input should be a valid boolean", body[flag])
        if model not in MODELS:
            return _error(400, f"Unsupported model: {model}", error="invalid_model")
        if not isinstance(voice, str):
            return _field_error("voice", "Input should be a valid string", voice)
        if response_format not in CONTENT_TYPES:
            return _error(
                400,
                f"Format '{response_format}' is not supported by this engine; use one of {', '.join(CONTENT_TYPES)}",
            )
        parts = split(text)
        if not parts:
            return _field_error("input", "Input text is empty", text)
        try:
            style = synthesizer.style(voice)
        except ValueError as error:
            return _error(400, str(error))
        lang = LANGUAGES.get(body.get("lang_code") or voice[:1], "en-us")
        volume = body.get("volume_multiplier") or 1.0
        return Request(text, parts, style, lang, float(speed), volume, response_format)

    @app.post("/v1/audio/speech")
    def speech():
        order = read(request.get_json(force=True, silent=True))
        if not isinstance(order, Request):
            return order
        # Pieces with nothing to say (a run of symbols, say) are skipped, as a reader would.
        spoken = [phonemes for phonemes in (synthesizer.phonemes(part, order.lang) for part in order.parts) if phonemes]
        if not spoken:
            return _field_error("input", "Input text produces no speech", order.text)

        environ = request.environ

        def stream():
            for chunk, _ in made(synthesizer, order, spoken, environ):
                if chunk:
                    yield chunk

        return Response(
            stream_with_context(stream()),
            content_type=CONTENT_TYPES[order.response_format],
            headers=_audio_headers(order),
        )

    @app.post("/dev/captioned_speech")
    def captioned_speech():
        """Kokoro-FastAPI's captioned speech: the audio in base64 with when each word is spoken.

        Streamed (the default) as one JSON object per line, each with the audio made for a
        piece of the text and the words it holds; with `"stream": false`, one JSON object.
        Each word also says where it is in `input` (`char_start`, `char_end`, code points).
        """
        body = request.get_json(force=True, silent=True)
        order = read(body)
        if not isinstance(order, Request):
            return order
        plans, cursor = [], 0
        for part in order.parts:
            at = order.text.index(part, cursor)
            cursor = at + len(part)
            plan = synthesizer.plan(part, at, order.lang)
            if plan is not None:
                plans.append(plan)
        if not plans:
            return _field_error("input", "Input text produces no speech", order.text)
        wanted = body.get("return_timestamps", True)
        content_type = CONTENT_TYPES[order.response_format]
        environ = request.environ

        def line(audio: bytes, words: list) -> dict:
            return {
                "audio": base64.b64encode(audio).decode("ascii"),
                "audio_format": content_type,
                "timestamps": [word.as_json() for word in words] if wanted else None,
            }

        headers = _audio_headers(order)
        if body.get("stream", True):
            pieces = made(synthesizer, order, plans, environ)
            stream = (json.dumps(line(audio, words), separators=(",", ":")) + "\n" for audio, words in pieces)
            return Response(stream_with_context(stream), content_type="application/json", headers=headers)
        audio, words = b"", []
        for chunk, placed in made(synthesizer, order, plans, environ):
            audio += chunk
            words += placed
        del headers["X-Accel-Buffering"]
        return Response(json.dumps(line(audio, words)), content_type="application/json", headers=headers)

    return app
