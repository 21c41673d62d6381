"""The reference's curl and openai snippets through the gateway to the real engine process."""

import io
import subprocess

import openai
import pytest
import soundfile
from openai import OpenAI

from tests import factories
from tests.servers import serve

pytestmark = pytest.mark.engine
HELLO = "Hello from kokoro-pay."


@pytest.fixture
def gateway(make_app, engine_process):
    app = make_app(UPSTREAM_URL=engine_process, UPSTREAM_READ_TIMEOUT=60)
    with serve(app) as url:
        yield app, url


def seconds_of(data: bytes) -> float:
    samples, rate = soundfile.read(io.BytesIO(data))
    return len(samples) / rate


def test_the_reference_curl_returns_real_speech(gateway, tmp_path):
    app, url = gateway
    customer = factories.customer(app, balance=1000)
    out = tmp_path / "speech.mp3"
    subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            f"{url}/v1/audio/speech",
            "-H",
            f"Authorization: Bearer {customer.secret}",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky", "response_format": "mp3"}',
            "--output",
            str(out),
        ],
        check=True,
        timeout=60,
    )
    assert out.read_bytes()[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3") or out.read_bytes()[0] == 0xFF
    assert 0.8 < seconds_of(out.read_bytes()) < 5
    assert factories.balance(app, customer.team_id) == 1000 - len(HELLO)


def test_the_reference_openai_snippet_and_duration_grows_with_input(gateway, tmp_path):
    app, url = gateway
    customer = factories.customer(app, balance=1000)
    client = OpenAI(base_url=f"{url}/v1", api_key=customer.secret, max_retries=0)
    lengths = {}
    for name, text in [("short", HELLO), ("long", HELLO + " This sentence makes the speech a good deal longer.")]:
        with client.audio.speech.with_streaming_response.create(
            model="kokoro",
            voice="af_sky",
            input=text,
            response_format="wav",
        ) as response:
            response.stream_to_file(tmp_path / f"{name}.wav")
        lengths[name] = seconds_of((tmp_path / f"{name}.wav").read_bytes())
    assert 0.8 < lengths["short"] < lengths["long"] / 1.5
    assert [voice.id for voice in client.models.list().data][:3] == ["tts-1", "tts-1-hd", "kokoro"]


def test_a_voice_the_engine_does_not_have_is_a_400_before_any_charge(gateway):
    app, url = gateway
    customer = factories.customer(app, balance=1000)
    client = OpenAI(base_url=f"{url}/v1", api_key=customer.secret, max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.audio.speech.create(model="kokoro", voice="af_nobody", input=HELLO)
    assert error.value.status_code == 400 and error.value.param == "voice"
    assert "Voice 'af_nobody' is not available" in error.value.body["message"]
    assert factories.balance(app, customer.team_id) == 1000 and factories.speech_requests(app, customer.team_id) == []
