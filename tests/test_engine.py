"""The embedded Kokoro engine on its own: shapes, formats, errors, sentence-by-sentence streaming."""

import io
import threading

import av
import pytest
import requests
import soundfile

from engine.server import create_app, sentences
from tests.servers import serve

pytestmark = pytest.mark.engine
TEXT = "Hello from kokoro-pay. This is the embedded engine, speaking on the CPU."


@pytest.fixture
def engine(synthesizer):
    return create_app(synthesizer).test_client()


def duration(data: bytes, response_format: str) -> float:
    if response_format == "pcm":
        return len(data) / 2 / 24000
    if response_format == "aac":
        return decoded(data, "aac")[0] / 24000
    samples, rate = soundfile.read(io.BytesIO(data))
    return len(samples) / rate


def decoded(data: bytes, container: str) -> tuple[int, str]:
    """Samples and codec of `data`, decoded by FFmpeg as the container it claims to be."""
    with av.open(io.BytesIO(data), format={"aac": "aac"}.get(container, container)) as media:
        stream = media.streams.audio[0]
        samples = sum(frame.samples for frame in media.decode(stream))
        return samples, stream.codec_context.name


def test_models_and_voices_in_kokoro_fastapis_shapes(engine):
    models = engine.get("/v1/models").get_json()
    assert models["object"] == "list"
    assert [model["id"] for model in models["data"]] == ["tts-1", "tts-1-hd", "kokoro", "gpt-4o-mini-tts"]
    assert all(model["object"] == "model" and model["owned_by"] == "kokoro" for model in models["data"])
    voices = engine.get("/v1/audio/voices").get_json()["voices"]
    assert len(voices) == 54 and {"id": "af_sky", "name": "af_sky"} in voices
    legacy = engine.get("/v1/audio/voices?legacy=true").get_json()["voices"]
    assert {"af_sky", "af_bella", "am_adam", "bf_emma"} <= set(legacy)


@pytest.mark.parametrize(
    "response_format,content_type",
    [
        ("mp3", "audio/mpeg"),
        ("wav", "audio/wav"),
        ("opus", "audio/opus"),
        ("flac", "audio/flac"),
        ("pcm", "audio/pcm"),
        ("aac", "audio/aac"),
    ],
)
def test_every_format_is_real_decodable_speech(engine, response_format, content_type):
    response = engine.post(
        "/v1/audio/speech", json={"input": TEXT, "voice": "af_sky", "response_format": response_format}
    )
    assert response.status_code == 200 and response.headers["Content-Type"] == content_type
    seconds = duration(response.data, response_format)
    assert 2.5 < seconds < 10, seconds


def test_speed_and_voice_blends_are_honoured(engine):
    def seconds(**fields):
        response = engine.post("/v1/audio/speech", json={"input": TEXT, "response_format": "wav", **fields})
        assert response.status_code == 200
        return duration(response.data, "wav")

    normal = seconds(voice="af_sky")
    assert seconds(voice="af_sky", speed=2.0) < normal * 0.7
    assert seconds(voice="af_sky+af_bella") > 1.0
    assert seconds(voice="af_bella(2)+af_sky(1)") > 1.0 and seconds(voice="af_bella(3)-af_sky(1)") > 1.0


@pytest.mark.parametrize("speed", [0.25, 0.4, 2.5, 4.0])
def test_speeds_beyond_the_models_range_are_time_stretched(engine, speed):
    # The model speaks 0.5 to 2.0; the rest of OpenAI's range is stretched at the same pitch.
    def seconds(value):
        response = engine.post(
            "/v1/audio/speech",
            json={"input": "Hello from kokoro-pay.", "voice": "af_sky", "response_format": "pcm", "speed": value},
        )
        assert response.status_code == 200
        return duration(response.data, "pcm")

    edge = 0.5 if speed < 0.5 else 2.0
    assert seconds(speed) == pytest.approx(seconds(edge) * edge / speed, rel=0.05)


def test_blend_weights_change_the_voice(synthesizer):
    import numpy as np

    bella, sky = synthesizer.style("af_bella"), synthesizer.style("af_sky")
    assert np.allclose(synthesizer.style("af_bella(3)+af_sky(1)"), 0.75 * bella + 0.25 * sky)
    assert np.allclose(synthesizer.style("af_bella(3)-af_sky(1)"), 0.75 * bella - 0.25 * sky)
    assert np.allclose(synthesizer.style("af_bella+af_sky"), (bella + sky) / 2)


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"input": "Hi", "voice": "af_nobody"}, 400, "Voice 'af_nobody' not found."),
        ({"input": "Hi", "voice": "af_sky+"}, 400, "is not a voice or a blend"),
        ({"input": "Hi", "voice": "af_sky", "model": "gpt-9"}, 400, "Unsupported model: gpt-9"),
        ({"input": "Hi", "voice": "af_sky", "response_format": "ogg"}, 422, "Input should be 'mp3'"),
        ({"input": "   ", "voice": "af_sky"}, 422, "Input text is empty"),
        ({"voice": "af_sky"}, 422, "Field required"),
        ({"input": "Hi", "voice": "af_sky", "speed": 9}, 422, "0.25 to 4.0"),
    ],
)
def test_errors_are_detail_bodies(engine, body, status, message):
    response = engine.post("/v1/audio/speech", json=body)
    assert response.status_code == status
    assert message in str(response.get_json()["detail"])


def test_text_is_split_into_sentences_and_long_runs_at_spaces():
    assert sentences("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    pieces = sentences("word " * 300)
    assert all(len(piece) <= 400 for piece in pieces) and " ".join(pieces).split() == ["word"] * 300


def test_audio_streams_before_the_whole_text_is_synthesised(synthesizer):
    finished = []
    original = synthesizer.speak

    def counting(*args, **kwargs):
        spoken = original(*args, **kwargs)
        finished.append(len(spoken[0]))
        return spoken

    synthesizer.speak = counting
    text = " ".join(f"This is sentence number {n}, spoken on its own." for n in range(1, 7))
    try:
        with serve(create_app(synthesizer)) as url:
            with requests.post(
                f"{url}/v1/audio/speech",
                json={"input": text, "voice": "af_sky", "response_format": "pcm"},
                stream=True,
                timeout=60,
            ) as response:
                chunks = response.iter_content(chunk_size=None)
                first = next(chunks)
                done_at_first_byte = len(finished)
                rest = b"".join(chunks)
    finally:
        del synthesizer.speak
    assert len(first) > 0
    assert done_at_first_byte < 6, "the first audio waited for the whole text"
    assert len(finished) == 6 and len(first) + len(rest) == 2 * sum(finished)


def test_concurrent_requests_are_served_one_synthesis_at_a_time(synthesizer):
    app = create_app(synthesizer)
    results = []

    def speak():
        response = app.test_client().post(
            "/v1/audio/speech", json={"input": "Hello.", "voice": "af_sky", "response_format": "wav"}
        )
        results.append((response.status_code, duration(response.data, "wav")))

    threads = [threading.Thread(target=speak) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in results] == [200] * 3 and all(seconds > 0.3 for _, seconds in results)


def test_a_new_request_is_phonemised_while_the_model_speaks_another(synthesizer):
    # Phonemising used to take a model turn: a new request then waited for one piece of a
    # long request to phonemise, and could lose its place to the long one's next piece.
    speaking, done = threading.Event(), threading.Event()

    def long_piece():
        with synthesizer.turns.turn(first=False):
            speaking.set()
            done.wait(30)

    phonemised = []
    holder = threading.Thread(target=long_piece)
    worker = threading.Thread(target=lambda: phonemised.append(synthesizer.phonemes("Hello.", "en-us")))
    holder.start()
    try:
        assert speaking.wait(5)
        worker.start()
        worker.join(5)
        assert phonemised and phonemised[0], "phonemising waited for the model's turn"
    finally:
        done.set()
        holder.join()
        if worker.is_alive():
            worker.join()


def test_a_short_request_is_not_stuck_behind_a_long_one(synthesizer):
    spoken = []
    original = synthesizer.speak

    def recording(phonemes, *args, **kwargs):
        made = original(phonemes, *args, **kwargs)
        spoken.append(phonemes)
        return made

    synthesizer.speak = recording
    long_text = " ".join(f"This is sentence number {n}, one of many in a long request." for n in range(1, 9))
    try:
        with serve(create_app(synthesizer)) as url:
            speech = f"{url}/v1/audio/speech"
            with requests.post(
                speech, json={"input": long_text, "voice": "af_sky", "response_format": "pcm"}, stream=True, timeout=120
            ) as long_one:
                long_chunks = long_one.iter_content(chunk_size=None)
                next(long_chunks)
                before = len(spoken)
                with requests.post(
                    speech, json={"input": "Hello.", "voice": "af_bella", "response_format": "pcm"}, stream=True
                ) as short:
                    short.raw.read(1)
                    # The long request finished at most the piece it was speaking, then the short one had its turn.
                    assert len(spoken) - before <= 2 and len(spoken) < 9
                rest = b"".join(long_chunks)
    finally:
        del synthesizer.speak
    assert len(rest) > 0 and len(spoken) == 9
