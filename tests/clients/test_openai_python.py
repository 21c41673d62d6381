"""openai-python, unchanged: the calls its README and API reference show for speech.

Shapes from openai/openai-python, src/openai/resources/audio/speech.py: `create(input,
model, voice, instructions, response_format, speed, stream_format)`; `voice` may be a
string or `{"id": …}`; `with_streaming_response` streams the body. The SDK retries 5xx
twice, so only a 400 keeps a mistake from being charged three times.
"""

import base64
import json

import openai
import pytest
from openai import OpenAI

from tests import factories
from tests.clients.audio import seconds_of
from tests.clients.conftest import charged_once

TEXT = "Hello from kokoro-pay, through the official Python client."


def sdk(base_url, secret):
    return OpenAI(base_url=base_url, api_key=secret)


def test_create_answers_mp3_by_default(gateway, customer):
    app, base_url = gateway
    response = sdk(base_url, customer.secret).audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    assert seconds_of(response.content, "mp3") > 1.0
    charged_once(app, customer, TEXT)


def test_with_streaming_response_writes_a_wav_file(gateway, customer, tmp_path):
    app, base_url = gateway
    with sdk(base_url, customer.secret).audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="coral", input=TEXT, response_format="wav"
    ) as response:
        assert response.headers["x-credits-charged"] == str(len(TEXT))
        response.stream_to_file(tmp_path / "speech.wav")
    assert seconds_of((tmp_path / "speech.wav").read_bytes(), "wav") > 1.0
    charged_once(app, customer, TEXT)


def test_instructions_and_a_voice_object(gateway, customer):
    app, base_url = gateway
    response = sdk(base_url, customer.secret).audio.speech.create(
        model="gpt-4o-mini-tts-2025-03-20",
        voice={"id": "af_heart"},
        input=TEXT,
        instructions="Speak in a cheerful and positive tone.",
        response_format="opus",
        speed=1.25,
    )
    assert seconds_of(response.content, "opus") > 0.8
    charged_once(app, customer, TEXT)


def test_stream_format_sse_carries_the_audio_in_events(gateway, customer):
    app, base_url = gateway
    response = sdk(base_url, customer.secret).audio.speech.create(
        model="gpt-4o-mini-tts", voice="nova", input=TEXT, response_format="pcm", stream_format="sse"
    )
    events = [json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(event["audio"]) for event in events if event["type"] == "speech.audio.delta")
    assert seconds_of(audio, "pcm") > 1.0
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["input_tokens"] == len(TEXT)
    charged_once(app, customer, TEXT)


def test_mistakes_raise_the_sdks_own_errors_and_are_never_retried_into_charges(gateway, customer):
    app, base_url = gateway
    client = sdk(base_url, customer.secret)
    with pytest.raises(openai.BadRequestError) as unknown_voice:
        client.audio.speech.create(model="tts-1", voice="af_nobody", input=TEXT)
    assert (unknown_voice.value.code, unknown_voice.value.param) == ("invalid_request_error", "voice")
    assert "af_nobody" in unknown_voice.value.body["message"]
    with pytest.raises(openai.BadRequestError) as unknown_model:
        client.audio.speech.create(model="tts-9", voice="alloy", input=TEXT)
    assert (unknown_model.value.code, unknown_model.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.AuthenticationError) as bad_key:
        sdk(base_url, "kp_live_nope").audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
    assert bad_key.value.code == "invalid_api_key"
    assert factories.speech_requests(app, customer.team_id) == []
    assert factories.balance(app, customer.team_id) == 10_000
