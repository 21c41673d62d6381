"""The official `openai` package, unchanged, against the running app."""

import openai
import pytest
from openai import OpenAI

from app import keys
from app.extensions import db
from app.models import ApiKey
from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.servers import serve

AUDIO = [b"ID3\x04\x00", b"\xff\xfb" * 2000, b"tail"]


@pytest.fixture
def running(make_app):
    upstream = FakeUpstream(AUDIO)
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        with serve(app) as url:
            yield app, f"{url}/v1", upstream


def client_for(base_url, secret):
    return OpenAI(base_url=base_url, api_key=secret, max_retries=0)


def test_the_reference_streaming_snippet_writes_the_audio_file(running, tmp_path):
    app, base_url, upstream = running
    customer = factories.customer(app, balance=1000)
    client = client_for(base_url, customer.secret)
    with client.audio.speech.with_streaming_response.create(
        model="kokoro",
        voice="af_sky",
        input="Hello from kokoro-pay.",
    ) as response:
        response.stream_to_file(tmp_path / "speech.mp3")
    assert (tmp_path / "speech.mp3").read_bytes() == b"".join(AUDIO)
    assert upstream.received[-1]["voice"] == "af_sky" and upstream.received[-1]["model"] == "kokoro"
    assert "kokoro" in [model.id for model in client.models.list().data]
    assert factories.balance(app, customer.team_id) == 1000 - 22


def test_a_bad_key_is_an_authentication_error(running):
    _, base_url, _ = running
    with pytest.raises(openai.AuthenticationError) as error:
        client_for(base_url, "kp_live_wrong").audio.speech.create(model="kokoro", voice="af_sky", input="Hi")
    assert error.value.status_code == 401
    # The SDK reads the body's "error" object: its code, its message.
    assert (error.value.code, error.value.body["message"]) == ("invalid_api_key", "Invalid API key.")


def test_a_short_balance_is_a_402_status_error(running):
    app, base_url, _ = running
    customer = factories.customer(app, balance=1)
    with pytest.raises(openai.APIStatusError) as error:
        client_for(base_url, customer.secret).audio.speech.create(model="kokoro", voice="af_sky", input="Hi")
    assert (error.value.status_code, error.value.code) == (402, "insufficient_quota")
    assert "Insufficient credits" in error.value.body["message"]


def test_a_keys_controls_reach_the_sdk_as_their_own_errors_and_are_not_retried(running):
    """With the SDK's default retries on: a 402 or 403 is raised at once, with its own code."""
    app, base_url, upstream = running
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        key = db.session.get(ApiKey, customer.key_id)
        keys.set_controls(key, keys.read_controls(spend_limit=5, spend_period="day", allowed_voices="alloy"))
        db.session.commit()
    client = OpenAI(base_url=base_url, api_key=customer.secret)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.audio.speech.create(model="kokoro", voice="af_sky", input="Hi")
    assert (refused.value.code, refused.value.body["param"]) == ("voice_not_allowed", "voice")
    with pytest.raises(openai.APIStatusError) as limited:
        client.audio.speech.create(model="kokoro", voice="alloy", input="Hello there")
    assert (limited.value.status_code, limited.value.code) == (402, "key_limit_reached")
    assert limited.value.response.headers["X-Key-Limit-Reset"].endswith("T00:00:00Z")
    assert upstream.received == []
    assert factories.balance(app, customer.team_id) == 1000


def test_an_empty_input_is_a_bad_request_error(running):
    app, base_url, _ = running
    customer = factories.customer(app, balance=10)
    with pytest.raises(openai.BadRequestError) as error:
        client_for(base_url, customer.secret).audio.speech.create(model="kokoro", voice="af_sky", input="")
    assert (error.value.code, error.value.param) == ("invalid_request_error", "input")
    assert error.value.body["message"] == "'input' must not be empty."


def test_a_voice_the_upstream_refuses_is_a_bad_request_error_and_refunded(running):
    app, base_url, _ = running
    customer = factories.customer(app, balance=10)
    with pytest.raises(openai.BadRequestError) as error:
        client_for(base_url, customer.secret).audio.speech.create(model="kokoro", voice="af_nicole", input="Hi")
    assert error.value.status_code == 400
    assert "Voice 'af_nicole' not found." in error.value.body["message"]
    assert factories.balance(app, customer.team_id) == 10
