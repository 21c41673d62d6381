"""How the embedded engine cuts a text into pieces and shares its one model between requests
(no model needed: the real model's behaviour is in test_engine.py)."""

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import numpy as np
from werkzeug.wsgi import ClosingIterator

from bench.launch import serve
from engine.server import Turns, create_app, pieces, sentences


def test_a_long_first_sentence_is_spoken_from_its_first_clause_on_its_own():
    text = "Kokoro-pay meters speech by the character, and streams it as it is made, sentence by sentence. Then more."
    assert pieces(text) == [
        "Kokoro-pay meters speech by the character,",
        "and streams it as it is made, sentence by sentence.",
        "Then more.",
    ]


def test_short_first_sentences_and_later_sentences_stay_whole():
    assert pieces("Hello from kokoro-pay.") == ["Hello from kokoro-pay."]
    # Short enough to be spoken whole, comma or not.
    assert pieces("Hello, and welcome. Later, a longer sentence, with clauses, stays one piece.") == [
        "Hello, and welcome.",
        "Later, a longer sentence, with clauses, stays one piece.",
    ]
    # A clause mark too near the start is no place to cut; a sentence with none is not cut at all.
    assert pieces("Well, " + "word " * 20 + "end.")[0].startswith("Well, word")
    assert pieces("word " * 20 + "end.") == [("word " * 20 + "end.")]


def test_overly_long_runs_are_cut_at_clause_marks_before_spaces():
    run = ", ".join(["some words here"] * 60) + "."
    cut = sentences(run)
    assert all(len(piece) <= 400 for piece in cut) and all(piece.endswith((",", ".")) for piece in cut)
    assert " ".join(cut) == run
    words = sentences("word " * 300)
    assert all(len(piece) <= 400 for piece in words) and " ".join(words).split() == ["word"] * 300


def _take_turn(turns, first, name, order, held=None, release=None):
    with turns.turn(first):
        order.append(name)
        if held is not None:
            held.set()
            release.wait(5)


def test_a_request_waiting_for_its_first_audio_takes_the_next_turn():
    turns, order = Turns(), []
    held, release = threading.Event(), threading.Event()
    streaming = threading.Thread(target=_take_turn, args=(turns, False, "long, piece 2", order, held, release))
    streaming.start()
    held.wait(5)
    # While the long request synthesises a piece, its next piece and a new request queue up.
    waiting = [
        threading.Thread(target=_take_turn, args=(turns, False, "long, piece 3", order)),
        threading.Thread(target=_take_turn, args=(turns, False, "other, piece 2", order)),
        threading.Thread(target=_take_turn, args=(turns, True, "short, piece 1", order)),
        threading.Thread(target=_take_turn, args=(turns, True, "second short, piece 1", order)),
    ]
    for thread in waiting:
        thread.start()
        _wait_queued(turns, waiting.index(thread) + 1)
    release.set()
    for thread in [streaming, *waiting]:
        thread.join(5)
    assert order == ["long, piece 2", "short, piece 1", "second short, piece 1", "long, piece 3", "other, piece 2"]


def _wait_queued(turns, count):
    """Until `count` requests wait for a turn (each thread's arrival fixes its place in line)."""
    deadline = time.monotonic() + 5
    while len(turns._queue) < count:
        assert time.monotonic() < deadline, "a request never queued"
        time.sleep(0.001)


class _Counted:
    """A stand-in for the model: each piece waits for a go, then is a tenth of a second of silence."""

    voices = ["af_sky"]

    def __init__(self):
        self.go = threading.Semaphore(0)
        self.spoken = 0
        self.asked = threading.Semaphore(0)

    def style(self, voice):
        return None

    def phonemes(self, text, lang):
        return text

    def speak(self, phonemes, style, speed, lang, first=True, last=False):
        self.asked.release()
        assert self.go.acquire(timeout=10), "the test never let this piece be synthesised"
        self.spoken += 1
        return np.zeros(2400, dtype="float32"), [], 1.0


def test_the_engine_stops_before_its_next_piece_once_its_client_has_gone():
    model = _Counted()
    app = _Finished(create_app(model, split=lambda text: text.split("|")))
    with serve(app) as url:
        address = urlsplit(url)
        client = socket.create_connection((address.hostname, address.port))
        body = json.dumps({"input": "|".join(f"piece {n}" for n in range(20)), "response_format": "pcm"}).encode()
        client.sendall(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        model.go.release()
        assert client.recv(64).startswith(b"HTTP/1.1 200")
        # The client leaves while the second piece is being made.
        assert model.asked.acquire(timeout=10) and model.asked.acquire(timeout=10)
        client.close()
        # Every piece may go ahead now: only the one under way when the client left is made.
        for _ in range(19):
            model.go.release()
        assert app.done.wait(10)
    assert model.spoken == 2


class _Finished:
    """Sets `done` when the wrapped app's response has been closed by the server."""

    def __init__(self, app):
        self.app = app
        self.done = threading.Event()

    def __call__(self, environ, start_response):
        return ClosingIterator(self.app(environ, start_response), [self.done.set])
