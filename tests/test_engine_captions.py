"""Word timings from the embedded engine: Kokoro-FastAPI's captioned route, the model's own durations."""

import base64
import io
import json

import numpy as np
import pytest
import soundfile

from bench import captions as accuracy
from engine import assets, captions
from engine.server import create_app

pytestmark = pytest.mark.engine
TEXT = "Dr. Smith paid $5.20 on 3/4. Then, after a pause, he left!"


@pytest.fixture
def engine(synthesizer):
    return create_app(synthesizer).test_client()


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768


def check_words(timestamps: list[dict], text: str) -> None:
    """Every word of `text` once, in order, its span pointing at it, times never going back."""
    assert [(w["char_start"], w["char_end"]) for w in timestamps] == [
        (word.start, word.end) for word in captions.words(text, 0)
    ]
    assert all(text[w["char_start"] : w["char_end"]] == w["word"] for w in timestamps)
    previous_end = 0.0
    for word in timestamps:
        assert previous_end <= word["start_time"] <= word["end_time"], timestamps
        previous_end = word["end_time"]


def test_captioned_speech_answers_kokoro_fastapis_shape_in_one_json(engine):
    response = engine.post(
        "/dev/captioned_speech",
        json={"input": TEXT, "voice": "af_heart", "response_format": "wav", "stream": False},
    )
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    body = response.get_json()
    assert set(body) == {"audio", "audio_format", "timestamps"} and body["audio_format"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(body["audio"])))
    seconds = len(samples) / rate
    words = body["timestamps"]
    check_words(words, TEXT)
    assert [w["word"] for w in words][:4] == ["Dr.", "Smith", "paid", "$5.20"]
    # The last word ends with the audio (the model's own silence after it apart).
    assert seconds - 0.5 < words[-1]["end_time"] <= seconds


def test_streamed_captions_come_a_line_per_piece_with_their_audio(engine):
    response = engine.post(
        "/dev/captioned_speech", json={"input": TEXT, "voice": "am_adam", "response_format": "pcm", "speed": 1.3}
    )
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.data.decode().splitlines()]
    assert len(lines) >= 2
    audio, words = b"", []
    for line in lines:
        audio += base64.b64decode(line["audio"])
        # A word's timing never comes after the audio it describes.
        assert all(w["start_time"] <= len(audio) / 2 / 24000 for w in line["timestamps"])
        words += line["timestamps"]
    check_words(words, TEXT)
    assert abs(words[-1]["end_time"] - len(audio) / 2 / 24000) < 0.5


def test_timings_follow_a_time_stretch_beyond_the_models_speeds(engine):
    def last_end(speed):
        response = engine.post(
            "/dev/captioned_speech",
            json={"input": "One, two, three.", "response_format": "pcm", "speed": speed, "stream": False},
        )
        body = response.get_json()
        seconds = len(base64.b64decode(body["audio"])) / 2 / 24000
        return body["timestamps"][-1]["end_time"], seconds

    slow_end, slow_seconds = last_end(0.25)
    fast_end, fast_seconds = last_end(1.0)
    assert slow_seconds > 2.5 * fast_seconds
    assert slow_end > 2.5 * fast_end and slow_end <= slow_seconds


def test_the_engine_says_it_has_the_captioned_route(engine):
    assert "/dev/captioned_speech" in engine.get("/openapi.json").get_json()["paths"]


def test_captioned_speech_refuses_what_speech_refuses(engine):
    assert engine.post("/dev/captioned_speech", json={"voice": "af_heart"}).status_code == 422
    refused = engine.post("/dev/captioned_speech", json={"input": "Hi.", "voice": "zz_nobody"})
    assert refused.status_code == 400


def test_the_timed_copy_of_the_model_makes_the_same_audio(synthesizer):
    """Only an output was added: fed the same tokens, both graphs give the same samples."""
    import onnxruntime

    cache = assets.cache_dir()
    tokens = np.array([[0, *synthesizer._kokoro.tokenizer.tokenize("həlˈoʊ wˈɜːld."), 0]], dtype=np.int64)
    inputs = {
        "tokens": tokens,
        "style": synthesizer.style("af_heart")[tokens.shape[1] - 3],
        "speed": np.ones(1, np.float32),
    }
    original = onnxruntime.InferenceSession(str(cache / assets.MODEL_NAME)).run(["audio"], inputs)[0]
    audio, durations = onnxruntime.InferenceSession(str(cache / assets.TIMED_MODEL_NAME)).run(
        ["audio", "duration"], inputs
    )
    assert np.array_equal(original, audio)
    # One duration per token, the pads included, and the audio is 600 samples a frame.
    assert len(durations) == tokens.shape[1] and len(audio) == 600 * int(durations.sum())


def test_the_accuracy_checks_hold_on_a_few_sentences(synthesizer):
    """bench/captions.py's checks, on three of its sentences (the README's figures are its whole run)."""
    figures = accuracy.run(accuracy.SENTENCES[:3], accuracy.VOICES[:1], accuracy.SPEEDS[:1], synthesizer)
    assert figures["every_word_once_in_order"] == figures["monotonic"] == figures["requests"] == 3
    assert figures["tail_ms"]["within_100"] == 3
    assert figures["pauses"] >= 2 and figures["pause_within_50ms"] == figures["pauses"]
