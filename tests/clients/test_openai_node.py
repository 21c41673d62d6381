"""openai-node (npm `openai`, pinned in tests/clients/node/package.json), run with Node.js.

`client.audio.speech.create({model, voice, input, response_format})` resolves to a fetch
Response (openai/openai-node, src/resources/audio/speech.ts); errors are APIError
subclasses carrying the body's `error.code`, `error.param` and `error.message`.
"""

import json

import pytest

from tests import factories
from tests.clients.audio import seconds_of
from tests.clients.conftest import charged_once, node

TEXT = "Hello from kokoro-pay, through the official Node client."


@pytest.mark.parametrize("response_format", ["mp3", "pcm"])
def test_create_and_read_the_body(gateway, customer, tmp_path, response_format):
    app, base_url = gateway
    out = tmp_path / f"speech.{response_format}"
    request = {"model": "tts-1", "voice": "echo", "input": TEXT, "response_format": response_format}
    answer = node("openai_node.mjs", base_url, customer.secret, json.dumps(request), str(out))
    assert answer["ok"] and answer["status"] == 200 and answer["charged"] == str(len(TEXT))
    assert seconds_of(out.read_bytes(), response_format) > 1.0
    charged_once(app, customer, TEXT)


def test_a_mistake_is_a_bad_request_error_with_code_and_message(gateway, customer, tmp_path):
    app, base_url = gateway
    request = {"model": "tts-1", "voice": "af_nobody", "input": TEXT}
    answer = node("openai_node.mjs", base_url, customer.secret, json.dumps(request), str(tmp_path / "x"))
    assert answer["name"] == "BadRequestError" and answer["status"] == 400
    assert (answer["code"], answer["param"], answer["type"]) == (
        "invalid_request_error",
        "voice",
        "invalid_request_error",
    )
    assert "Voice 'af_nobody' is not available" in answer["message"]
    assert factories.speech_requests(app, customer.team_id) == []
