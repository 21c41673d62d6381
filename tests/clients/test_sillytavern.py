"""SillyTavern's "OpenAI Compatible" TTS provider (SillyTavern/SillyTavern).

The browser posts to SillyTavern's server, which sends `POST <provider_endpoint>` with
Node's fetch, `Content-Type` and `Authorization: Bearer <key>`, and
`{input, response_format: "mp3", voice, speed, model}`; the provider's defaults are model
"tts-1" and the voices alloy, echo, fable, onyx, nova, shimmer
(public/scripts/extensions/tts/openai-compatible.js, src/endpoints/openai.js). The
request is replayed by tests/clients/node/sillytavern.mjs.
"""

import json

import pytest

from tests.clients.audio import seconds_of
from tests.clients.conftest import charged_once, node

TEXT = "*waves* Hello there, traveller."


@pytest.mark.parametrize("voice", ["alloy", "echo", "fable", "onyx", "nova", "shimmer"])
def test_the_default_model_and_voices(gateway, customer, tmp_path, voice):
    app, base_url = gateway
    fields = {"input": TEXT, "response_format": "mp3", "voice": voice, "speed": 1, "model": "tts-1"}
    out = tmp_path / "speech.mp3"
    answer = node("sillytavern.mjs", f"{base_url}/audio/speech", customer.secret, json.dumps(fields), str(out))
    assert answer["ok"], answer
    assert answer["contentType"] == "audio/mpeg"
    assert seconds_of(out.read_bytes(), "mp3") > 0.5
    charged_once(app, customer, TEXT)
