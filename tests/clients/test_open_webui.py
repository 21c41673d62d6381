"""Open WebUI's OpenAI TTS engine (open-webui/open-webui, backend/open_webui/routers/audio.py).

It lists models with a keyless `GET {base}/audio/models` (falling back to `GET {base}/models`)
and voices with a keyless `GET {base}/audio/voices`, reading `voice["id"]` and `voice["name"]`,
and silently offers OpenAI's six voices when either fails. It speaks with
`POST {base}/audio/speech`, headers Content-Type and Authorization only, the browser's
`{"input", "voice"}` plus `"model"` from its settings, and shows a failure's
`error["message"]` to the user.
"""

import requests

from tests.clients.audio import seconds_of
from tests.clients.conftest import charged_once

TEXT = "Hello from kokoro-pay, read aloud in Open WebUI."


def open_webui_speaks(base_url: str, key: str, voice: str) -> requests.Response:
    """The request its backend sends: the browser's input and voice, the model from its settings."""
    return requests.post(
        f"{base_url}/audio/speech",
        json={"input": TEXT, "voice": voice, "model": "tts-1"},
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_keyless_catalog_then_speech(gateway, customer):
    app, base_url = gateway
    models = requests.get(f"{base_url}/audio/models", timeout=10)
    assert models.status_code == 200
    model_ids = [model["id"] for model in models.json().get("models", [])]
    assert "tts-1" in model_ids
    voices = requests.get(f"{base_url}/audio/voices", timeout=10)
    assert voices.status_code == 200
    available = {voice["id"]: voice["name"] for voice in voices.json().get("voices", [])}
    assert {"af_heart", "alloy", "echo", "fable", "onyx", "nova", "shimmer"} <= set(available)

    response = open_webui_speaks(base_url, customer.secret, "af_heart")
    assert response.status_code == 200
    assert seconds_of(response.content, "mp3") > 1.0
    charged_once(app, customer, TEXT)


def test_a_failure_has_the_message_open_webui_shows(gateway, customer):
    _, base_url = gateway
    response = open_webui_speaks(base_url, customer.secret, "af_nobody")
    assert response.status_code == 400
    res = response.json()
    assert "error" in res and res["error"].get("message", "").startswith("Voice 'af_nobody' is not available")
