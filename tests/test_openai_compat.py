"""What clients written for OpenAI's speech API send and read, answered as OpenAI would.

OpenAI's voice and model names, voice objects, Kokoro blends, 400 (never a retried 502)
for what the upstream cannot serve, OpenAI-shaped errors with stable codes, the credits
headers, server-sent events, and a catalog clients can list voices from.
"""

import base64
import json

import pytest
import requests

from app import catalog
from app.catalog import OPENAI_VOICES
from app.extensions import db
from tests import factories
from tests.fake_upstream import KOKORO_VOICES, FakeUpstream
from tests.servers import serve
from tests.test_paid_audio import in_chunks, pcm_of

SPEECH = "/v1/audio/speech"
HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}


@pytest.fixture
def upstream():
    return FakeUpstream([b"ID3\x04audio-", b"bytes"])


@pytest.fixture
def gateway(make_app, upstream):
    """The app, in front of `upstream` served over real HTTP."""
    apps = []

    def start(**overrides):
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", **overrides)
        apps.append(app)
        return app

    with serve(upstream) as upstream_url:
        yield start


@pytest.fixture
def app(gateway):
    return gateway()


def speak(client, customer, **fields):
    return client.post(SPEECH, json={**HELLO, **fields}, headers=customer.headers)


def assert_nothing_charged(app, customer, upstream, balance=1000):
    assert factories.balance(app, customer.team_id) == balance
    assert factories.speech_requests(app, customer.team_id) == []
    assert upstream.received == []


# OpenAI's names


@pytest.mark.parametrize("name", sorted(OPENAI_VOICES))
def test_every_openai_voice_is_spoken_by_a_kokoro_voice(client, customer, upstream, name):
    response = speak(client, customer, voice=name)
    assert response.status_code == 200
    assert upstream.received[-1]["voice"] == OPENAI_VOICES[name] and OPENAI_VOICES[name] in KOKORO_VOICES
    # The usage record keeps the name the client asked for.
    [speech] = factories.speech_requests(client.application, customer.team_id)
    assert speech.voice == name


@pytest.mark.parametrize(
    "model", ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15"]
)
def test_openai_models_and_their_dated_snapshots_are_sent_as_kokoro(client, customer, upstream, model):
    assert speak(client, customer, model=model).status_code == 200
    assert upstream.received[-1]["model"] == "kokoro"


def test_a_model_the_upstream_lists_is_sent_as_it_is(client, customer, upstream):
    assert speak(client, customer, model="kokoro").status_code == 200
    assert upstream.received[-1]["model"] == "kokoro"


def test_the_operator_can_choose_other_voices_and_models_for_openais_names(gateway, customer, upstream):
    client = gateway(VOICE_ALIASES="alloy=bf_emma, marin=af_bella", MODEL_ALIASES="tts-1-hd=tts-1-hd").test_client()
    assert speak(client, customer, voice="alloy", model="tts-1-hd").status_code == 200
    assert (upstream.received[-1]["voice"], upstream.received[-1]["model"]) == ("bf_emma", "tts-1-hd")
    assert speak(client, customer, voice="marin").status_code == 200
    assert upstream.received[-1]["voice"] == "af_bella"
    # The other names keep their defaults.
    assert speak(client, customer, voice="echo").status_code == 200
    assert upstream.received[-1]["voice"] == "am_echo"


def test_a_voice_can_be_an_object_with_an_id(client, customer, upstream):
    assert speak(client, customer, voice={"id": "coral"}).status_code == 200
    assert upstream.received[-1]["voice"] == "af_river"


@pytest.mark.parametrize(
    "voice,sent",
    [
        ("af_bella(2)+af_sky(1)", "af_bella(2)+af_sky(1)"),
        ("af_bella + af_sky", "af_bella+af_sky"),
        ("af_bella-af_sky", "af_bella-af_sky"),
        ("af_bella(0.7)+am_adam(0.3)", "af_bella(0.7)+am_adam(0.3)"),
        ("af_bella(0.5)+af_sky(1.0)", "af_bella(0.5)+af_sky(1)"),
        ("alloy(2)+echo", "af_alloy(2)+am_echo"),
    ],
)
def test_weighted_blends_and_subtraction_go_upstream_with_kokoro_ids(client, customer, upstream, voice, sent):
    assert speak(client, customer, voice=voice).status_code == 200
    assert upstream.received[-1]["voice"] == sent


def test_instructions_are_accepted_and_not_sent(client, customer, upstream):
    response = speak(client, customer, voice="marin", instructions="Speak in a cheerful and positive tone.")
    assert response.status_code == 200 and "instructions" not in upstream.received[-1]


# A client's mistake is a 400 with nothing charged, never a 502 an SDK retries


@pytest.mark.parametrize(
    "fields,param,words",
    [
        ({"voice": "af_nobody"}, "voice", "Voice 'af_nobody' is not available"),
        ({"voice": "af_bella+af_nobody"}, "voice", "Voice 'af_nobody' is not available"),
        ({"voice": "af_bella(2)+"}, "voice", "is not a voice id"),
        ({"voice": "+af_bella"}, "voice", "is not a voice id"),
        ({"voice": "af_bella(x)"}, "voice", "is not a voice id"),
        ({"voice": "af_bella(0)"}, "voice", "must not all be zero"),
        ({"model": "gpt-9"}, "model", "Model 'gpt-9' is not available; use one of gpt-4o-mini-tts, kokoro"),
        ({"model": "tts-2-2025-01-01"}, "model", "Model 'tts-2-2025-01-01' is not available"),
    ],
)
def test_unknown_voices_and_models_are_400_before_anything_is_charged(client, customer, upstream, fields, param, words):
    response = speak(client, customer, **fields)
    assert response.status_code == 400
    body = response.get_json()
    assert words in body["detail"] and body["detail"] == body["error"]["message"]
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    # OpenAI's code for a model it does not have, which SDKs and clients branch on.
    assert body["error"]["code"] == ("model_not_found" if param == "model" else "invalid_request_error")
    assert len(body["detail"]) < 200
    assert_nothing_charged(client.application, customer, upstream)


VOICES_8 = "+".join(["af_bella", "af_sky", "af_heart", "af_nova", "am_adam", "am_echo", "bf_emma", "bm_fable"])


@pytest.mark.parametrize(
    "voice,detail",
    [
        ("af_bella(2)+", "'voice' 'af_bella(2)+' is not a voice id or a weighted voice such as af_bella(2)."),
        ("+af_bella", "'voice' '+af_bella' is not a voice id or a weighted voice such as af_bella(2)."),
        ("af_bella(x)", "'voice' 'af_bella(x)' is not a voice id or a weighted voice such as af_bella(2)."),
        ("af_bella(0)", "'voice' the weights of a blend must not all be zero."),
        ("af_bella(0)+af_sky(0)", "'voice' the weights of a blend must not all be zero."),
        (VOICES_8 + "+am_onyx", "'voice' a blend may join at most 8 voices."),
    ],
)
def test_a_malformed_blend_is_told_exactly_what_is_wrong(client, customer, upstream, voice, detail):
    response = speak(client, customer, voice=voice)
    assert response.status_code == 400 and response.get_json()["detail"] == detail
    assert_nothing_charged(client.application, customer, upstream)


def test_an_unknown_voice_is_answered_with_where_to_find_the_known_ones(client, customer, upstream):
    response = speak(client, customer, voice="af_nobody")
    assert response.get_json()["detail"] == (
        "Voice 'af_nobody' is not available. See GET /v1/audio/voices for the 54 voices, "
        "such as af_alloy, af_aoede, af_bella, or use an OpenAI name such as alloy."
    )


def test_a_blend_of_eight_voices_is_spoken(client, customer, upstream):
    assert speak(client, customer, voice=VOICES_8).status_code == 200
    assert upstream.received[0]["voice"] == VOICES_8


def test_an_unknown_openai_alias_target_is_named_in_the_message(gateway, customer, upstream):
    client = gateway(VOICE_ALIASES="alloy=af_gone").test_client()
    response = speak(client, customer, voice="alloy")
    assert response.status_code == 400
    assert "Voice 'alloy' (spoken by 'af_gone') is not available" in response.get_json()["detail"]
    assert_nothing_charged(client.application, customer, upstream)


def test_an_alias_entry_is_split_at_its_first_equals_sign_so_a_second_one_shows_as_an_unknown_voice(
    gateway, customer, upstream
):
    """`alloy=af_bella=bf_emma` gives alloy the voice 'af_bella=bf_emma', which no server has: the operator's slip
    is a 400 that names it, not alloy quietly speaking its default voice."""
    client = gateway(VOICE_ALIASES="alloy=af_bella=bf_emma").test_client()
    response = speak(client, customer, voice="alloy")
    assert response.status_code == 400
    assert "Voice 'alloy' (spoken by 'af_bella=bf_emma') is not available" in response.get_json()["detail"]
    assert_nothing_charged(client.application, customer, upstream)


def test_without_a_catalog_the_names_go_upstream_and_its_refusal_is_a_refunded_400(make_app, customer):
    class NoCatalog(FakeUpstream):
        def __call__(self, environ, start_response):
            if environ["REQUEST_METHOD"] == "GET":
                return self._json(start_response, "404 Not Found", {"detail": "Not Found"})
            return super().__call__(environ, start_response)

    upstream = NoCatalog()
    with serve(upstream) as url:
        client = make_app(UPSTREAM_URL=f"{url}/v1").test_client()
        assert speak(client, customer, voice="alloy").status_code == 200
        assert upstream.received[-1]["voice"] == "af_alloy"
        response = speak(client, customer, voice="af_nicole")
    assert response.status_code == 400
    assert response.get_json()["detail"] == (
        "The speech server refused this request: Voice 'af_nicole' not found. The charge was refunded."
    )
    assert factories.balance(client.application, customer.team_id) == 1000 - len(HELLO["input"])
    notes = [note for kind, _, note in factories.ledger_notes(client.application, customer.team_id)]
    assert notes[-1] == "Upstream synthesis error: Voice 'af_nicole' not found."


def test_a_failed_catalog_is_not_asked_again_by_every_request(make_app, customer):
    class Counting(FakeUpstream):
        catalog_asks = 0

        def __call__(self, environ, start_response):
            if environ["REQUEST_METHOD"] == "GET":
                Counting.catalog_asks += 1
                return self._json(start_response, "503 Service Unavailable", {"detail": "warming up"})
            return super().__call__(environ, start_response)

    with serve(Counting()) as url:
        client = make_app(UPSTREAM_URL=f"{url}/v1").test_client()
        assert [speak(client, customer).status_code for _ in range(5)] == [200] * 5
    # One try at the models, then nothing more for the next few seconds.
    assert Counting.catalog_asks == 1


def test_an_sdk_that_retries_5xx_is_charged_nothing_for_a_bad_voice(client, customer, upstream):
    # The openai SDKs retry 5xx twice: a 502 cost three charges and three refunds. A 400 is not retried.
    for _ in range(3):
        assert speak(client, customer, voice="nobody").status_code == 400
    assert factories.ledger(client.application, customer.team_id) == [("grant", 1000, 1000)]


# OpenAI-shaped errors with stable codes


def test_every_error_carries_an_openai_error_object_with_a_stable_code(gateway, customer, upstream):
    app = gateway(MAX_CONTENT_LENGTH=1024, RATE_LIMIT_PER_KEY="2/minute")
    client = app.test_client()
    poor = factories.customer(app, balance=1)
    answers = {
        "invalid_api_key": client.post(SPEECH, json=HELLO, headers={"Authorization": "Bearer kp_live_nope"}),
        "insufficient_quota": speak(client, poor),
        "request_too_large": speak(client, customer, input="x" * 2000),
        "invalid_json": client.post(
            SPEECH, data=b"{", headers={**customer.headers, "Content-Type": "application/json"}
        ),
        "rate_limit_exceeded": speak(client, customer),
        "not_found": client.get("/v1/nope", headers=customer.headers),
    }
    statuses = {code: response.status_code for code, response in answers.items()}
    assert statuses == {
        "invalid_api_key": 401,
        "insufficient_quota": 402,
        "request_too_large": 413,
        "invalid_json": 400,
        "rate_limit_exceeded": 429,
        "not_found": 404,
    }
    for code, response in answers.items():
        body = response.get_json()
        assert body["error"]["code"] == code and body["error"]["message"] == body["detail"]
    assert int(answers["rate_limit_exceeded"].headers["Retry-After"]) >= 1


def test_too_many_streams_is_a_429_with_its_own_code_and_retry_after(gateway, customer):
    client = gateway(MAX_STREAMS_PER_ACCOUNT=0).test_client()
    response = speak(client, customer)
    # Spelled as RFC 9110 and OpenAI spell it (header names are case-insensitive, but logs and eyes are not).
    assert response.status_code == 429 and ("Retry-After", "1") in response.headers.items()
    assert "(at most 0)" in response.get_json()["detail"]
    assert response.get_json()["error"] == {
        "message": response.get_json()["detail"],
        "type": "requests",
        "param": None,
        "code": "too_many_streams",
    }


def test_a_stream_opened_after_the_early_check_is_still_counted_by_the_charge(gateway, customer, monkeypatch):
    # The account's one stream starts between this request's early check and its charge (a race the
    # early check cannot see): the charge counts again, refuses, and names the limit.
    app = gateway(MAX_STREAMS_PER_ACCOUNT=1)
    with app.app_context():
        factories.charge_speech(customer.team_id, 5)
        db.session.commit()
    before = factories.balance(app, customer.team_id)
    monkeypatch.setattr("app.metering.streams_in_flight", lambda user_id: 0)
    response = speak(app.test_client(), customer)
    assert response.status_code == 429 and response.get_json()["error"]["code"] == "too_many_streams"
    assert "(at most 1)" in response.get_json()["detail"]
    assert factories.balance(app, customer.team_id) == before


def test_a_real_upstream_failure_stays_a_502_upstream_error(make_app, customer):
    client = make_app().test_client()  # nothing listens at the test upstream address
    response = speak(client, customer)
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_error"
    assert response.get_json()["error"]["type"] == "server_error"


# What a request cost and what is left


def test_speech_says_what_it_cost_and_what_is_left_as_the_balance_does(client, customer):
    response = speak(client, customer)
    assert response.status_code == 200
    assert response.headers["X-Credits-Charged"] == str(len(HELLO["input"]))
    balance = client.get("/v1/balance", headers=customer.headers).get_json()["balance"]
    assert response.headers["X-Credits-Remaining"] == str(balance) == str(1000 - len(HELLO["input"]))


def test_an_unlimited_account_is_charged_nothing_and_told_so(app, client):
    rich = factories.customer(app, balance=7, unlimited=True)
    response = speak(client, rich)
    assert (response.headers["X-Credits-Charged"], response.headers["X-Credits-Remaining"]) == ("0", "7")


# Server-sent events


def sse_events(data: bytes) -> list[dict]:
    assert data.endswith(b"\n\n")
    events = []
    for block in data.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ")
        events.append(json.loads(block[len("data: ") :]))
    return events


def test_sse_carries_the_same_audio_byte_for_byte_then_the_usage(gateway, upstream, customer):
    audio = pcm_of(2.0)
    upstream.chunks = in_chunks(audio, 7)
    client = gateway().test_client()
    plain = speak(client, customer, response_format="pcm")
    events_response = speak(client, customer, response_format="pcm", stream_format="sse")
    assert events_response.status_code == 200
    assert events_response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(events_response.data)
    deltas = [event for event in events if event["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2
    assert b"".join(base64.b64decode(event["audio"]) for event in deltas) == plain.data == audio
    characters = len(HELLO["input"])
    assert events[-1] == {
        "type": "speech.audio.done",
        "usage": {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters},
    }
    # stream_format is the gateway's business: the upstream is asked for plain audio.
    assert "stream_format" not in upstream.received[-1]
    assert factories.balance(client.application, customer.team_id) == 1000 - 2 * characters


def test_an_sse_stream_that_breaks_ends_with_an_error_event_and_is_settled(make_app, customer):
    audio = pcm_of(2.0)
    upstream = FakeUpstream(in_chunks(audio, 10), break_after=5)
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", SPEECH_CHARS_PER_SECOND=1.0)
        with serve(app) as url:
            response = requests.post(
                f"{url}{SPEECH}",
                json={**HELLO, "input": "x" * 100, "response_format": "pcm", "stream_format": "sse"},
                headers=customer.headers,
                timeout=10,
            )
    events = sse_events(response.content)
    assert [event["type"] for event in events[:-1]] == ["speech.audio.delta"] * 5
    assert events[-1]["type"] == "error"
    error = events[-1]["error"]
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, "upstream_error")
    assert "broke off" in events[-1]["error"]["message"]
    [speech] = factories.speech_requests(app, customer.team_id)
    # 100 characters at 1 a second: 100 s expected; 1 s delivered keeps 1 credit.
    assert speech.state == "refunded" and speech.audio_ms == 1000
    assert factories.balance(app, customer.team_id) == 1000 - 1
    factories.assert_books_balance(app, customer.team_id)


# The catalog


def test_catalog_documents_in_either_shape_and_with_junk_are_read_safely():
    assert catalog.voice_ids({"voices": [{"id": "af_sky", "name": "af_sky"}, "am_adam", None, 5, {"name": "x"}]}) == [
        "af_sky",
        "am_adam",
    ]
    assert catalog.voice_ids({"voices": ["af_sky"]}) == ["af_sky"]
    assert catalog.voice_ids({}) == [] and catalog.voice_ids(["af_sky"]) == [] and catalog.voice_ids(None) == []
    assert catalog.model_ids({"data": [{"id": "kokoro"}, {"id": 7}, "tts-1", None]}) == ["kokoro"]
    assert catalog.model_ids({}) == [] and catalog.model_ids([{"id": "kokoro"}]) == []


def test_voices_outside_kokoros_naming_are_listed_as_they_are():
    assert catalog.describe("af_sky_two") == {
        "id": "af_sky_two",
        "name": "Sky Two",
        "language": "en-us",
        "gender": "female",
    }
    # Two letters without a name after them are not a Kokoro id either: no language, no speaker.
    for odd in ("custom", "abc_def", "x_y", "af", "bm_"):
        assert catalog.describe(odd) == {"id": odd, "name": odd, "language": None, "gender": None}
    assert catalog.describe("qx_voice") == {"id": "qx_voice", "name": "Voice", "language": None, "gender": None}


def test_voices_list_names_languages_and_speakers_and_openais_names(client, customer):
    voices = client.get("/v1/audio/voices", headers=customer.headers).get_json()["voices"]
    by_id = {voice["id"]: voice for voice in voices}
    assert by_id["af_heart"] == {"id": "af_heart", "name": "Heart", "language": "en-us", "gender": "female"}
    assert by_id["bm_george"] == {"id": "bm_george", "name": "George", "language": "en-gb", "gender": "male"}
    assert by_id["jf_alpha"]["language"] == "ja" and by_id["zm_yunxi"]["language"] == "zh"
    assert by_id["alloy"] == {
        "id": "alloy",
        "name": "Alloy",
        "language": "en-us",
        "gender": "female",
        "voice": "af_alloy",
    }
    assert set(by_id) == set(KOKORO_VOICES) | set(OPENAI_VOICES)
    legacy = client.get("/v1/audio/voices?legacy=true", headers=customer.headers).get_json()["voices"]
    assert legacy == [voice["id"] for voice in voices]


def test_models_list_the_upstreams_and_audio_models_answer_open_webuis_shape(client, customer):
    models = client.get("/v1/models", headers=customer.headers).get_json()
    assert {"kokoro", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= {model["id"] for model in models["data"]}
    audio_models = client.get("/v1/audio/models", headers=customer.headers).get_json()
    assert audio_models == {"models": [{"id": model["id"]} for model in models["data"]]}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/audio/models", "/v1/audio/voices"])
def test_the_catalog_needs_a_key_unless_the_operator_makes_it_public(gateway, customer, path):
    assert gateway().test_client().get(path).status_code == 401
    public = gateway(PUBLIC_CATALOG=True).test_client()
    assert public.get(path).status_code == 200
    assert public.get(path, headers={"Authorization": "Bearer whatever"}).status_code == 200
    # Only the catalog: speech and the balance still need a key.
    assert public.post(SPEECH, json=HELLO).status_code == 401
    assert public.get("/v1/balance").status_code == 401


def test_a_public_catalog_is_rate_limited_per_address(gateway):
    public = gateway(PUBLIC_CATALOG=True, RATE_LIMIT_PER_KEY="2/minute").test_client()
    statuses = [public.get("/v1/models").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
