"""The /v1 contract: every status code and error body of the reference, and the refunds."""

import json

import pytest
import requests
import responses
from responses import matchers

from app.models import SpeechRequest
from tests import factories
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import KOKORO_VOICES, MODELS, stub_catalog

SPEECH = "/v1/audio/speech"
VOICE_SHAPE = "'voice' must be a voice id, a blend such as af_bella(2)+af_sky(1), or {\"id\": …}."
HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky", "response_format": "mp3"}


@pytest.fixture
def upstream():
    """The upstream, stubbed: its catalog answers as Kokoro-FastAPI's does; each test stubs its speech."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        stub_catalog(mock, STUB_UPSTREAM)
        yield mock


def error(status_detail: str, code: str, param=None, kind: str = "invalid_request_error") -> dict:
    """An error body: our contract's `detail` and OpenAI's `error` object, saying the same."""
    return {"detail": status_detail, "error": {"message": status_detail, "type": kind, "param": param, "code": code}}


def catalog_calls(upstream, path: str) -> int:
    return sum(call.request.url.split("?")[0].endswith(path) for call in upstream.calls)


def stub_audio(upstream, body=b"ID3fake-mp3", content_type="audio/mpeg", status=200):
    upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=body, status=status, content_type=content_type)


def post_speech(client, customer, body=HELLO, **kwargs):
    return client.post(SPEECH, json=body, headers=customer.headers, **kwargs)


def assert_untouched(app, customer):
    assert factories.balance(app, customer.team_id) == 1000
    assert factories.speech_requests(app, customer.team_id) == []


# 200: the audio, charged one credit per character


def test_speech_streams_audio_and_charges_one_credit_per_character(app, client, customer, upstream):
    stub_audio(upstream, body=b"ID3" + b"\xff" * 5000)
    response = post_speech(client, customer)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.data == b"ID3" + b"\xff" * 5000
    assert factories.balance(app, customer.team_id) == 1000 - len(HELLO["input"])
    [speech] = factories.speech_requests(app, customer.team_id)
    assert response.headers["X-Request-Id"] == speech.id
    assert (speech.state, speech.characters, speech.credits) == ("delivered", 22, 22)
    assert (speech.upstream_status, speech.bytes_sent, speech.api_key_id) == (200, 5003, customer.key_id)
    assert (speech.model, speech.voice, speech.response_format) == ("kokoro", "af_sky", "mp3")
    assert speech.duration_ms is not None and speech.first_byte_ms is not None
    factories.assert_books_balance(app, customer.team_id)


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_paid_audio_is_never_kept_by_a_cache_nor_held_back_by_a_proxy(client, customer, upstream, stream_format):
    """Each answer is one customer's paid audio: no proxy or browser cache may keep it or replay it,
    and an nginx in front (whatever its own buffering setting) passes each piece on as it comes."""
    stub_audio(upstream)
    response = post_speech(client, customer, body={**HELLO, "stream_format": stream_format})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Accel-Buffering"] == "no"
    # HTTP reads header names in any case, but a client's log and `curl -i` show them as sent:
    # spelled as the API reference spells them.
    sent = {name for name, _ in response.headers.items()}
    assert {"Cache-Control", "X-Accel-Buffering", "X-Credits-Charged", "X-Credits-Remaining", "Server-Timing"} <= sent


def test_the_clients_fields_are_passed_through_upstream(client, customer, upstream):
    body = {
        **HELLO,
        "response_format": "wav",
        "speed": 1.5,
        "stream": True,
        "lang_code": "a",
        "normalization_options": {"normalize": False},
        "volume_multiplier": 0.8,
        "download_format": "mp3",
    }
    upstream.post(
        f"{STUB_UPSTREAM}/audio/speech",
        body=b"RIFF",
        content_type="audio/wav",
        match=[matchers.json_params_matcher(body)],
    )
    response = post_speech(client, customer, body)
    assert response.status_code == 200 and response.headers["Content-Type"] == "audio/wav"


@pytest.mark.parametrize(
    "field", ["download_format", "lang_code", "volume_multiplier", "normalization_options", "instructions"]
)
def test_an_optional_field_sent_as_null_is_left_out(client, customer, upstream, field):
    stub_audio(upstream)
    assert post_speech(client, customer, {**HELLO, field: None}).status_code == 200
    assert field not in json.loads(upstream.calls[-1].request.body)


@pytest.mark.parametrize("field", ["return_timestamps", "subtitles"])
def test_word_timings_or_subtitles_sent_as_null_are_not_asked_for(client, customer, upstream, field):
    stub_audio(upstream)
    response = post_speech(client, customer, {**HELLO, field: None})
    assert response.status_code == 200 and response.headers["Content-Type"] == "audio/mpeg"
    assert response.data == b"ID3fake-mp3"


@pytest.mark.parametrize(
    "field, value",
    [
        # OpenAI's range of speeds, 0.25 to 4.0, both ends included.
        ("speed", 0.25),
        ("speed", 4.0),
        ("speed", 4),
        # Kokoro's volume, silent to ten times as loud, both ends included.
        ("volume_multiplier", 0),
        ("volume_multiplier", 10.0),
    ],
)
def test_the_ends_of_each_numeric_range_are_accepted(client, customer, upstream, field, value):
    stub_audio(upstream)
    response = post_speech(client, customer, {**HELLO, field: value})
    assert response.status_code == 200
    assert json.loads(upstream.calls[-1].request.body)[field] == value


def test_stream_format_sent_as_null_streams_plain_audio(client, customer, upstream):
    stub_audio(upstream)
    response = post_speech(client, customer, {**HELLO, "stream_format": None})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/mpeg"


def test_the_upstream_key_is_sent_when_configured(make_app, customer, upstream):
    app = make_app(UPSTREAM_API_KEY="upstream-secret")
    upstream.post(
        f"{STUB_UPSTREAM}/audio/speech",
        body=b"ID3",
        content_type="audio/mpeg",
        match=[matchers.header_matcher({"Authorization": "Bearer upstream-secret"})],
    )
    assert app.test_client().post(SPEECH, json=HELLO, headers=customer.headers).status_code == 200


def test_characters_are_unicode_code_points(app, client, customer, upstream):
    stub_audio(upstream)
    text = "日本語🙂e\u0301"  # 3 CJK, one emoji, e + combining accent
    assert post_speech(client, customer, {**HELLO, "input": text}).status_code == 200
    assert factories.balance(app, customer.team_id) == 1000 - 6


def test_unlimited_accounts_get_audio_for_free_and_their_usage_is_recorded(app, client, upstream):
    rich = factories.customer(app, unlimited=True)
    stub_audio(upstream)
    assert post_speech(client, rich).status_code == 200
    assert factories.balance(app, rich.team_id) == 0
    [speech] = factories.speech_requests(app, rich.team_id)
    assert (speech.characters, speech.credits, speech.state) == (22, 0, "delivered")


# 401: missing, malformed, unknown or revoked key


@pytest.mark.parametrize(
    "path,method", [(SPEECH, "post"), ("/v1/balance", "get"), ("/v1/models", "get"), ("/v1/audio/voices", "get")]
)
@pytest.mark.parametrize(
    "authorization,detail",
    [
        (None, "Missing API key"),
        ("kp_live_abc", "Malformed Authorization header"),
        ("Basic dXNlcjpwYXNz", "Malformed Authorization header"),
        ("Bearer ", "Missing API key"),
        ("Bearer kp_live_not-a-real-key", "Invalid API key."),
        ("Bearer sk-openai-key", "Invalid API key."),
    ],
)
def test_every_endpoint_needs_a_valid_key(app, client, customer, path, method, authorization, detail):
    headers = {"Authorization": authorization} if authorization else {}
    response = getattr(client, method)(path, headers=headers, json=HELLO)
    assert response.status_code == 401
    assert response.get_json()["detail"].startswith(detail)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_untouched(app, customer)


def test_a_revoked_key_gets_401_at_once(app, client, customer, runner):
    assert client.get("/v1/balance", headers=customer.headers).status_code == 200
    assert runner.invoke(args=["keys", "revoke", str(customer.key_id)]).exit_code == 0
    response = post_speech(client, customer)
    assert response.status_code == 401
    assert response.get_json() == error("This API key has been revoked.", "invalid_api_key")
    assert_untouched(app, customer)


@pytest.mark.parametrize(
    "body,overrides",
    [
        ({"voice": "af_sky"}, {}),
        (HELLO, {"RATE_LIMIT_PER_KEY": "1/minute"}),
        (HELLO, {"MAX_STREAMS_PER_ACCOUNT": 0}),
    ],
    ids=["bad body", "rate limited", "no stream slot"],
)
def test_a_key_revoked_since_its_last_use_gets_401_before_any_other_error(make_app, body, overrides):
    app = make_app(**overrides)
    customer = factories.customer(app, balance=1000)
    client = app.test_client()
    assert client.get("/v1/balance", headers=customer.headers).status_code == 200
    assert app.test_cli_runner().invoke(args=["keys", "revoke", str(customer.key_id)]).exit_code == 0
    response = client.post(SPEECH, json=body, headers=customer.headers)
    assert response.status_code == 401
    assert response.get_json() == error("This API key has been revoked.", "invalid_api_key")
    assert_untouched(app, customer)


def test_the_bearer_scheme_is_case_insensitive(client, customer):
    response = client.get("/v1/balance", headers={"Authorization": f"bearer {customer.secret}"})
    assert response.status_code == 200


# 400: the body, and nothing is charged


@pytest.mark.parametrize(
    "raw,detail",
    [
        (b"{not json", "Invalid JSON body."),
        (b"", "Invalid JSON body."),
        (b"\xff\xfe", "Invalid JSON body."),
        (b"[" * 100_000, "Invalid JSON body."),
        (b'["input"]', "The request body must be a JSON object."),
        (b"null", "The request body must be a JSON object."),
        (b'"Hello"', "The request body must be a JSON object."),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(app, client, customer, raw, detail):
    response = client.post(SPEECH, data=raw, headers={**customer.headers, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.get_json() == error(detail, "invalid_json" if "JSON body" in detail else "invalid_request_error")
    assert_untouched(app, customer)


NORMALIZATION_SHAPE = (
    "'normalization_options' must be an object of true/false switches among normalize, unit_normalization, "
    "url_normalization, email_normalization, optional_pluralization_normalization, phone_normalization, "
    "replace_remaining_symbols."
)


@pytest.mark.parametrize(
    "change,detail",
    [
        ({"input": None}, "'input' is required."),
        ({"input": ""}, "'input' must not be empty."),
        ({"input": " \n\t "}, "'input' must not be empty."),
        ({"input": 42}, "'input' must be a string."),
        ({"input": ["Hello"]}, "'input' must be a string."),
        ({"input": "x" * 4097}, "'input' is 4097 characters long; the maximum is 4096."),
        ({"voice": 7}, VOICE_SHAPE),
        ({"voice": ""}, VOICE_SHAPE),
        ({"voice": None}, VOICE_SHAPE),
        ({"voice": {"name": "af_sky"}}, VOICE_SHAPE),
        ({"model": ["kokoro"]}, "'model' must be a model id (a non-empty string)."),
        ({"response_format": "ogg"}, "'response_format' must be one of mp3, opus, aac, flac, wav, pcm."),
        ({"response_format": 3}, "'response_format' must be one of mp3, opus, aac, flac, wav, pcm."),
        ({"speed": "fast"}, "'speed' must be a number from 0.25 to 4.0."),
        ({"speed": True}, "'speed' must be a number from 0.25 to 4.0."),
        ({"speed": 4.5}, "'speed' must be a number from 0.25 to 4.0."),
        ({"speed": 0.1}, "'speed' must be a number from 0.25 to 4.0."),
        ({"download_format": "ogg"}, "'download_format' must be one of mp3, opus, aac, flac, wav, pcm."),
        ({"stream": "yes"}, "'stream' must be true or false."),
        ({"stream_format": "ogg"}, "'stream_format' must be 'audio' or 'sse'."),
        ({"volume_multiplier": 10.5}, "'volume_multiplier' must be a number from 0 to 10.0."),
        ({"volume_multiplier": -1}, "'volume_multiplier' must be a number from 0 to 10.0."),
        ({"lang_code": "english please"}, "'lang_code' must be a language code such as 'a' or 'en-us'."),
        ({"normalization_options": {"shout": True}}, NORMALIZATION_SHAPE),
        ({"normalization_options": {"normalize": "yes"}}, NORMALIZATION_SHAPE),
        ({"instructions": 5}, "'instructions' must be a string."),
        ({"return_download_link": "yes"}, "'return_download_link' must be true or false."),
    ],
)
def test_invalid_fields_are_400_and_charge_nothing(app, client, customer, change, detail):
    body = {**HELLO, **change}
    response = post_speech(client, customer, body)
    assert response.status_code == 400
    assert response.get_json() == error(detail, "invalid_request_error", param=next(iter(change)))
    assert_untouched(app, customer)


def test_missing_input_is_400(app, client, customer):
    response = post_speech(client, customer, {"model": "kokoro", "voice": "af_sky"})
    assert response.get_json() == error("'input' is required.", "invalid_request_error", "input")
    assert response.status_code == 400
    assert_untouched(app, customer)


def test_non_finite_speed_is_refused(app, client, customer):
    raw = json.dumps({**HELLO, "speed": float("nan")}).encode()
    response = client.post(SPEECH, data=raw, headers={**customer.headers, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert_untouched(app, customer)


def test_the_maximum_input_is_configurable_and_inclusive(make_app, customer, upstream):
    app = make_app(MAX_INPUT_CHARS=10)
    stub_audio(upstream)
    client = app.test_client()
    assert client.post(SPEECH, json={**HELLO, "input": "x" * 10}, headers=customer.headers).status_code == 200
    assert client.post(SPEECH, json={**HELLO, "input": "x" * 11}, headers=customer.headers).status_code == 400


def test_a_body_without_json_content_type_is_still_read(client, customer, upstream):
    stub_audio(upstream)
    response = client.post(
        SPEECH,
        data=json.dumps(HELLO),
        headers={**customer.headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200


# 402: not enough credits, nothing written


def test_a_short_balance_is_402_and_writes_nothing(app, client, upstream):
    poor = factories.customer(app, balance=21)
    stub_audio(upstream)
    response = post_speech(client, poor)
    assert response.status_code == 402
    assert response.get_json() == error(
        "Insufficient credits: this request costs 22 credits and your balance is 21. Top up your balance.",
        "insufficient_quota",
        kind="insufficient_quota",
    )
    assert factories.balance(app, poor.team_id) == 21
    assert factories.speech_requests(app, poor.team_id) == []
    assert catalog_calls(upstream, "/audio/speech") == 0


def test_credits_granted_since_the_keys_last_use_count_at_once(app, client, upstream, runner):
    customer = factories.customer(app, balance=10)
    stub_audio(upstream)
    assert post_speech(client, customer).status_code == 402
    assert catalog_calls(upstream, "/audio/speech") == 0
    grant = ["credits", "grant", customer.email, "100", "--reason", "top-up"]
    assert runner.invoke(args=grant).exit_code == 0
    assert post_speech(client, customer).status_code == 200
    assert factories.balance(app, customer.team_id) == 110 - len(HELLO["input"])


def test_a_key_revoked_after_a_402_is_refused_whatever_it_was_granted_since(app, client, upstream, runner):
    customer = factories.customer(app, balance=10)
    stub_audio(upstream)
    assert post_speech(client, customer).status_code == 402
    assert runner.invoke(args=["credits", "grant", customer.email, "100", "--reason", "top-up"]).exit_code == 0
    assert runner.invoke(args=["keys", "revoke", str(customer.key_id)]).exit_code == 0
    response = post_speech(client, customer)
    assert response.status_code == 401
    assert response.get_json() == error("This API key has been revoked.", "invalid_api_key")
    assert factories.balance(app, customer.team_id) == 110
    assert factories.speech_requests(app, customer.team_id) == [] and catalog_calls(upstream, "/audio/speech") == 0


def test_an_account_taken_off_unlimited_is_charged_at_once(app, client, upstream, runner):
    customer = factories.customer(app, balance=100, unlimited=True)
    stub_audio(upstream)
    assert post_speech(client, customer).status_code == 200
    assert factories.balance(app, customer.team_id) == 100
    assert runner.invoke(args=["users", "unlimited", customer.email, "--off"]).exit_code == 0
    assert post_speech(client, customer).status_code == 200
    assert factories.balance(app, customer.team_id) == 100 - len(HELLO["input"])


def test_an_exact_balance_is_enough(app, client, upstream):
    exact = factories.customer(app, balance=22)
    stub_audio(upstream)
    assert post_speech(client, exact).status_code == 200
    assert factories.balance(app, exact.team_id) == 0


# 502: upstream failures before audio, refunded


def assert_refunded_502(app, customer, response, detail_part):
    assert response.status_code == 502
    detail = response.get_json()["detail"]
    assert detail_part in detail and detail.endswith("Any charge for this request was refunded.")
    assert factories.balance(app, customer.team_id) == 1000
    [speech] = factories.speech_requests(app, customer.team_id)
    assert speech.state == "refunded"
    assert [kind for kind, _, _ in factories.ledger(app, customer.team_id)] == ["grant", "debit", "refund"]
    factories.assert_books_balance(app, customer.team_id)
    return speech


def test_upstream_refused_is_502_and_refunded(app, client, customer, upstream):
    upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=requests.ConnectionError("refused"))
    speech = assert_refunded_502(app, customer, post_speech(client, customer), "could not be reached")
    assert speech.upstream_status is None


def test_a_really_refused_connection_is_502_and_refunded(app, client, customer):
    # No stub: nothing listens on the configured upstream port.
    assert_refunded_502(app, customer, post_speech(client, customer), "could not be reached")


def test_upstream_timeout_is_502_and_refunded(app, client, customer, upstream):
    upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=requests.ReadTimeout("slow"))
    assert_refunded_502(app, customer, post_speech(client, customer), "did not answer in time")


def test_upstream_500_is_502_and_refunded(app, client, customer, upstream):
    upstream.post(f"{STUB_UPSTREAM}/audio/speech", status=500, json={"detail": "CUDA out of memory"})
    speech = assert_refunded_502(
        app, customer, post_speech(client, customer), "Upstream synthesis error: CUDA out of memory"
    )
    assert speech.upstream_status == 500


def assert_refunded_400(app, customer, response, reason):
    """The upstream blamed the request: 400 (SDKs do not retry it), refunded, its reason on one line."""
    assert response.status_code == 400
    detail = f"The speech server refused this request: {reason} The charge was refunded."
    assert response.get_json() == error(detail, "invalid_request_error")
    assert factories.balance(app, customer.team_id) == 1000
    [speech] = factories.speech_requests(app, customer.team_id)
    assert speech.state == "refunded" and response.headers["X-Request-Id"] == speech.id
    [*_, (kind, _, note)] = factories.ledger_notes(app, customer.team_id)
    assert kind == "refund" and "\n" not in note and len(note) <= 200
    factories.assert_books_balance(app, customer.team_id)
    return note


def test_an_upstream_4xx_is_a_400_with_its_reason_on_one_line_and_refunded(app, client, customer, upstream):
    # Kokoro-FastAPI's refusal of a voice its catalog listed a minute ago: the whole voice list follows.
    refusal = f"Voice 'af_nicole' not found. Available voices: {', '.join(KOKORO_VOICES)}"
    upstream.post(
        f"{STUB_UPSTREAM}/audio/speech",
        status=400,
        json={"detail": {"error": "validation_error", "message": refusal, "type": "invalid_request_error"}},
    )
    note = assert_refunded_400(
        app, customer, post_speech(client, customer, {**HELLO, "voice": "af_nicole"}), "Voice 'af_nicole' not found."
    )
    assert "af_nicole" in note and "zm_yunyang" not in note


def test_an_upstream_refusal_of_one_long_unbroken_word_is_cut_short_too(app, client, customer, upstream):
    # A reason with no space to cut at (a blob, a long path) is cut at the limit, not passed on whole.
    upstream.post(f"{STUB_UPSTREAM}/audio/speech", status=400, json={"detail": "x" * 2000})
    assert_refunded_400(app, customer, post_speech(client, customer), "x" * 160 + " …")


def test_an_upstream_422_validation_list_is_a_readable_400(app, client, customer, upstream):
    upstream.post(
        f"{STUB_UPSTREAM}/audio/speech",
        status=422,
        json={"detail": [{"type": "missing", "loc": ["body", "input"], "msg": "Field required"}]},
    )
    assert_refunded_400(app, customer, post_speech(client, customer), "'input': Field required.")


def test_upstream_html_error_page_is_502_and_refunded(app, client, customer, upstream):
    upstream.post(
        f"{STUB_UPSTREAM}/audio/speech", status=503, body="<html>Bad gateway</html>", content_type="text/html"
    )
    assert_refunded_502(app, customer, post_speech(client, customer), "upstream answered 503")


def test_a_2xx_answer_that_is_not_audio_is_502_and_refunded(app, client, customer, upstream):
    stub_audio(upstream, body=b'{"error": "oops"}', content_type="application/json")
    assert_refunded_502(app, customer, post_speech(client, customer), "answered without audio")


def test_an_empty_audio_answer_is_502_and_refunded(app, client, customer, upstream):
    stub_audio(upstream, body=b"")
    assert_refunded_502(app, customer, post_speech(client, customer), "sent no audio")


# Free endpoints


def test_models_are_relayed_in_the_upstreams_shape_and_cached(client, customer, upstream):
    for _ in range(3):
        response = client.get("/v1/models", headers=customer.headers)
        assert response.status_code == 200 and response.get_json() == MODELS
    assert catalog_calls(upstream, "/models") == 1


def test_voices_are_relayed_and_refetched_after_the_ttl(make_app, customer, upstream):
    client = make_app(UPSTREAM_CATALOG_TTL=0).test_client()
    for _ in range(2):
        voices = client.get("/v1/audio/voices", headers=customer.headers).get_json()["voices"]
        assert [voice["id"] for voice in voices[: len(KOKORO_VOICES)]] == KOKORO_VOICES
    assert catalog_calls(upstream, "/audio/voices") == 2


def test_legacy_voices_are_the_same_catalog_as_plain_ids(client, customer, upstream):
    upstream.replace(
        responses.GET, f"{STUB_UPSTREAM}/audio/voices", json={"voices": [{"id": "af_sky", "name": "af_sky"}]}
    )
    # af_sky is also OpenAI's shimmer.
    legacy = {"voices": ["af_sky", "shimmer"]}
    assert client.get("/v1/audio/voices?legacy=true", headers=customer.headers).get_json() == legacy
    assert client.get("/v1/audio/voices", headers=customer.headers).get_json()["voices"][0]["id"] == "af_sky"
    # One document serves both shapes: the upstream is asked once.
    assert catalog_calls(upstream, "/audio/voices") == 1


@pytest.mark.parametrize("path", ["/v1/models", "/v1/audio/voices"])
def test_catalogs_are_502_when_the_upstream_is_down(client, customer, upstream, path):
    upstream.replace(responses.GET, f"{STUB_UPSTREAM}/{path[4:]}", body=requests.ConnectionError("refused"))
    response = client.get(path, headers=customer.headers)
    assert response.status_code == 502
    assert response.get_json() == error(
        "The speech server could not be reached.", "upstream_error", kind="server_error"
    )


def test_catalogs_are_502_on_an_upstream_error_or_garbage(client, customer, upstream):
    upstream.replace(responses.GET, f"{STUB_UPSTREAM}/models", status=500, json={"detail": "boom"})
    upstream.replace(responses.GET, f"{STUB_UPSTREAM}/audio/voices", body="not json", content_type="application/json")
    expected = error("Upstream error: boom.", "upstream_error", kind="server_error")
    assert client.get("/v1/models", headers=customer.headers).get_json() == expected
    response = client.get("/v1/audio/voices", headers=customer.headers)
    assert response.status_code == 502 and "invalid JSON" in response.get_json()["detail"]


def test_free_endpoints_charge_nothing(app, client, customer, upstream):
    for path in ("/v1/models", "/v1/audio/voices", "/v1/balance"):
        assert client.get(path, headers=customer.headers).status_code == 200
    assert_untouched(app, customer)


# A key with no controls: no limit, no expiry; it has spent nothing.
FREE_KEY = {"spend_limit": None, "spend_period": None, "spent": 0, "limit_resets_at": None, "expires_at": None}


def test_balance(app, client, customer):
    answer = client.get("/v1/balance", headers=customer.headers).get_json()
    assert answer == {"balance": 1000, "unlimited": False, "key": FREE_KEY}
    rich = factories.customer(app, balance=5, unlimited=True)
    assert client.get("/v1/balance", headers=rich.headers).get_json() == {
        "balance": 5,
        "unlimited": True,
        "key": FREE_KEY,
    }


def test_using_a_key_records_its_last_use(app, client, customer):
    assert client.get("/v1/balance", headers=customer.headers).status_code == 200
    with app.app_context():
        from app.extensions import db
        from app.models import ApiKey

        assert db.session.get(ApiKey, customer.key_id).last_used_at is not None


# Every error under /v1 is JSON


def test_unknown_paths_are_json_404(client):
    response = client.get("/v1/nope")
    assert response.status_code == 404 and response.is_json and "detail" in response.get_json()


def test_wrong_method_is_json_405(client, customer):
    response = client.get(SPEECH, headers=customer.headers)
    assert response.status_code == 405 and response.is_json and "detail" in response.get_json()
    assert "POST" in response.headers["Allow"]


def test_a_too_large_body_is_json_413_and_charges_nothing(make_app, customer):
    client = make_app(MAX_CONTENT_LENGTH=1024).test_client()
    response = client.post(SPEECH, json={**HELLO, "input": "x" * 2000}, headers=customer.headers)
    assert response.status_code == 413 and response.is_json and "detail" in response.get_json()
    assert factories.balance(client.application, customer.team_id) == 1000


def fails_inside(app, customer, monkeypatch, target: str):
    """A speech request while `target` raises an error of the gateway's own: answered 500, JSON, no trace."""

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(target, explode)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = app.test_client().post(SPEECH, json=HELLO, headers=customer.headers)
    assert response.status_code == 500
    assert response.get_json() == error("Internal server error.", "server_error", kind="server_error")
    assert b"secret internals" not in response.data and b"Traceback" not in response.data
    return response


def test_an_unexpected_error_is_json_500_without_a_trace(app, customer, monkeypatch):
    fails_inside(app, customer, monkeypatch, "app.metering.charge_speech")
    assert factories.balance(app, customer.team_id) == 1000


def test_a_gateway_error_after_the_charge_is_refunded_at_once(app, customer, upstream, monkeypatch):
    # Charged, then the gateway itself fails before any audio: no waiting for `flask speech settle`.
    fails_inside(app, customer, monkeypatch, "app.upstream.Upstream.open_speech")
    [speech] = factories.speech_requests(app, customer.team_id)
    assert (speech.state, speech.credits_refunded) == ("refunded", speech.credits)
    assert speech.error == "The gateway failed before any audio was sent."
    assert factories.balance(app, customer.team_id) == 1000


def test_speech_request_rows_are_kept_per_request(app, client, customer, upstream):
    stub_audio(upstream)
    for _ in range(3):
        assert post_speech(client, customer).status_code == 200
    rows = factories.speech_requests(app, customer.team_id)
    assert len({row.id for row in rows}) == 3 and all(isinstance(row, SpeechRequest) for row in rows)
