"""The speech servers: faults before audio are refunded; several servers, least busy first, a bounded
wait when all are full, failing ones taken out."""

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
import responses
from urllib3.exceptions import NameResolutionError

from app import api, places, speech
from app import upstream as upstream_client
from tests import factories
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import Failing, FakeUpstream, Silent, stub_catalog
from tests.servers import gunicorn, serve, wait_for
from tests.test_key_controls import control
from tests.test_metrics import TOKEN, sample, scrape

SPEECH = "/v1/audio/speech"
HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}
STREAMING_TEXT = len(HELLO["input"])


def states(app, customer):
    return [row.state for row in factories.speech_requests(app, customer.team_id)]


COST = len(HELLO["input"])
AUDIO = b"ID3\x04audio-bytes"


def _open(url, customer):
    """A speech stream whose headers (so its first audio bytes) have arrived."""
    return requests.post(f"{url}{SPEECH}", json=HELLO, headers=customer.headers, stream=True, timeout=30)


def _speak(url, customer):
    return requests.post(f"{url}{SPEECH}", json=HELLO, headers=customer.headers, timeout=30)


@contextlib.contextmanager
def one_place(make_app, **settings):
    """One speech server that takes one stream at a time and holds each after its first chunk until `held` is
    set, the app in front of it (a request waits up to 20 s for the place): (app, its places, the server, held)."""
    held = threading.Event()
    only = FakeUpstream(gate=held)
    with serve(only) as url:
        app = make_app(UPSTREAM_URL=f"{url}/v1", UPSTREAM_MAX_STREAMS=1, UPSTREAM_QUEUE_SECONDS=20, **settings)
        yield app, app.extensions["upstream"].upstreams, only, held


def test_each_request_goes_to_the_least_busy_server(make_app):
    held = threading.Event()
    first, second = FakeUpstream(gate=held), FakeUpstream()
    with serve(first) as a, serve(second) as b:
        app = make_app(UPSTREAM_URL=f"{a}/v1,{b}/v1")
        customer = factories.customer(app, balance=1000)
        with serve(app) as url:
            long_one = _open(url, customer)
            assert len(first.received) == 1
            # While the first server streams, every short request goes to the idle one.
            assert [_speak(url, customer).content for _ in range(4)] == [AUDIO] * 4
            assert (len(first.received), len(second.received)) == (1, 4)
            held.set()
            assert long_one.content == AUDIO
            # Both idle again: the first listed is the least busy one too.
            assert _speak(url, customer).status_code == 200
            assert (len(first.received), len(second.received)) == (2, 4)


def test_when_every_server_is_full_the_rest_are_refused_in_time_with_nothing_charged(make_app):
    held = threading.Event()
    first, second = FakeUpstream(gate=held), FakeUpstream(gate=held)
    with serve(first) as a, serve(second) as b:
        app = make_app(UPSTREAM_URL=f"{a}/v1,{b}/v1", UPSTREAM_MAX_STREAMS=1, UPSTREAM_QUEUE_SECONDS=0.5)
        customer = factories.customer(app, balance=1000)
        with serve(app) as url:
            streams = [_open(url, customer), _open(url, customer)]
            assert (len(first.received), len(second.received)) == (1, 1)
            with ThreadPoolExecutor(2) as pool:
                refused = list(pool.map(lambda _: _speak(url, customer), range(2)))
            for response in refused:
                assert response.status_code == 503
                assert response.headers["Retry-After"] == "1"
                # Spelled as the API reference spells it: HTTP reads any case, a client's log shows what was sent.
                assert "Retry-After" in list(response.headers)
                body = response.json()
                assert body["detail"] == "Every speech server is busy. Nothing was charged; retry shortly."
                assert body["error"]["code"] == "server_busy"
            assert factories.balance(app, customer.team_id) == 1000 - 2 * COST
            assert len(factories.speech_requests(app, customer.team_id)) == 2
            held.set()
            assert [stream.content for stream in streams] == [AUDIO, AUDIO]
            # The places are free again.
            assert _speak(url, customer).status_code == 200
    factories.assert_books_balance(app, customer.team_id)


def test_requests_wait_for_a_free_place_uncharged_and_are_then_served(make_app):
    held = threading.Event()
    first, second = FakeUpstream(gate=held), FakeUpstream(gate=held)
    with serve(first) as a, serve(second) as b:
        app = make_app(UPSTREAM_URL=f"{a}/v1,{b}/v1", UPSTREAM_MAX_STREAMS=1, UPSTREAM_QUEUE_SECONDS=20)
        upstreams = app.extensions["upstream"].upstreams
        customer = factories.customer(app, balance=1000)
        with serve(app) as url:
            streams = [_open(url, customer), _open(url, customer)]
            with ThreadPoolExecutor(2) as pool:
                waiting = [pool.submit(_speak, url, customer) for _ in range(2)]
                wait_for(lambda: upstreams.waiting == 2)
                # Two at once on the two servers; the other two wait, and have not been charged.
                assert factories.balance(app, customer.team_id) == 1000 - 2 * COST
                held.set()
                assert [future.result().content for future in waiting] == [AUDIO, AUDIO]
            assert [stream.content for stream in streams] == [AUDIO, AUDIO]
    # Which server each waiting request got depends on which place was given back first.
    assert len(first.received) + len(second.received) == 4
    assert factories.balance(app, customer.team_id) == 1000 - 4 * COST
    factories.assert_books_balance(app, customer.team_id)


def test_a_full_queue_refuses_at_once(make_app):
    held = threading.Event()
    only = FakeUpstream(gate=held)
    with serve(only) as a:
        app = make_app(UPSTREAM_URL=f"{a}/v1", UPSTREAM_MAX_STREAMS=1, UPSTREAM_QUEUE=0, UPSTREAM_QUEUE_SECONDS=30)
        customer = factories.customer(app, balance=1000)
        with serve(app) as url:
            stream = _open(url, customer)
            started = time.monotonic()
            assert _speak(url, customer).status_code == 503
            assert time.monotonic() - started < 5
            held.set()
            assert stream.content == AUDIO
    assert factories.balance(app, customer.team_id) == 1000 - COST


@pytest.mark.parametrize("down", ["refusing connections", "answering 500"])
def test_a_failing_server_is_taken_out_and_probed_back_in(make_app, freeze, down):
    sickly, healthy = Failing(), FakeUpstream()
    # Out for 5 s after a failure, on a clock that moves only when told: the five requests below
    # fit in that however loaded the machine.
    advance = freeze(places)
    with serve(sickly) as s, serve(healthy) as h:
        first = "http://127.0.0.1:9" if down == "refusing connections" else s
        app = make_app(UPSTREAM_URL=f"{first}/v1,{h}/v1", UPSTREAM_RETRY_SECONDS=5)
        customer = factories.customer(app, balance=1000)
        client = app.test_client()
        # The first request meets the failure and is served by the other server, charged once.
        for _ in range(5):
            response = client.post(SPEECH, json=HELLO, headers=customer.headers)
            assert response.status_code == 200 and response.data == AUDIO
        assert len(healthy.received) == 5
        # The catalog came from the server in service too.
        assert client.get("/v1/models", headers=customer.headers).status_code == 200
        if down == "answering 500":
            assert sickly.attempts == 1
            sickly.healed = True
            # Once its time out is up, the next request tries it again, and it is back in service.
            advance(5.1)
            for _ in range(3):
                assert client.post(SPEECH, json=HELLO, headers=customer.headers).status_code == 200
                if sickly.received:
                    break
            assert len(sickly.received) == 1
        charged = len(factories.speech_requests(app, customer.team_id))
        assert factories.balance(app, customer.team_id) == 1000 - charged * COST
        assert [row.state for row in factories.speech_requests(app, customer.team_id)] == ["delivered"] * charged
    factories.assert_books_balance(app, customer.team_id)


def server_timing(response) -> dict[str, float]:
    """The durations a response's Server-Timing header names, in milliseconds."""
    parts = (part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(","))
    return {name: float(duration) for name, duration in parts}


def test_every_api_answer_says_where_its_time_went(make_app):
    with serve(FakeUpstream()) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        customer = factories.customer(app, balance=1000)
        client = app.test_client()
        spoken = client.post(SPEECH, json=HELLO, headers=customer.headers)
        timings = server_timing(spoken)
        assert set(timings) == {"gateway", "queue", "upstream"}
        assert all(value >= 0 for value in timings.values())
        for response in (
            client.get("/v1/balance", headers=customer.headers),
            client.get("/v1/balance"),
            client.post(SPEECH, data="{", headers=customer.headers),
        ):
            [(name, duration)] = server_timing(response).items()
            assert name == "gateway" and duration >= 0


def test_the_wait_for_a_free_server_is_told_apart_from_the_gateways_own_time(make_app):
    held = threading.Event()
    with serve(FakeUpstream(gate=held)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", UPSTREAM_MAX_STREAMS=1, METRICS_TOKEN=TOKEN)
        upstreams = app.extensions["upstream"].upstreams
        customer = factories.customer(app, balance=1000)
        before = scrape(app.test_client())
        first = app.test_client().post(SPEECH, json=HELLO, headers=customer.headers, buffered=False)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(app.test_client().post, SPEECH, json=HELLO, headers=customer.headers, buffered=True)
            wait_for(lambda: upstreams.waiting == 1)
            # The wait being measured: a second, well over what the gateway's own work takes even on a
            # loaded machine (about 0.5 s seen with four test workers on two cores), so the two are told apart.
            time.sleep(1.0)
            held.set()
            assert first.get_data() == AUDIO
            second = waiting.result()
        after = scrape(app.test_client())
    assert second.data == AUDIO
    timings = server_timing(second)
    # The queue is the wait; the gateway's own time leaves it out, in the header and in the metric.
    assert timings["queue"] >= 1000 and 0 <= timings["gateway"] < 1000

    def grown(name):  # the metrics are the process's: what these two requests added
        return sample(after, name) - sample(before, name)

    assert grown("kokoro_speech_gateway_seconds_count") == 2
    assert 0 <= grown("kokoro_speech_gateway_seconds_sum") < 1.0
    # The time to first byte is all three: the gateway's own, the wait, the upstream's.
    told = sum(sum(server_timing(response).values()) for response in (first, second))
    assert grown("kokoro_speech_first_byte_seconds_sum") == pytest.approx(told / 1000, abs=1e-4)


def test_each_timing_is_told_once_and_in_its_own_unit(make_app, monkeypatch):
    """The header and the metrics, to the hundredth of a millisecond: each module's monotonic clock is
    injected, so the request arrives at 1000 s, the gateway is ready to call the speech server at 1000.25 s
    having waited no time for a place, and the server's first audio comes exactly half a second after it
    was asked."""
    monkeypatch.setattr(api, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    monkeypatch.setattr(speech, "time", SimpleNamespace(monotonic=lambda: 1000.25))
    monkeypatch.setattr(places, "time", SimpleNamespace(monotonic=lambda: 3000.0))
    server_clock = [5000.0]
    monkeypatch.setattr(upstream_client, "time", SimpleNamespace(monotonic=lambda: server_clock[0]))
    fake = FakeUpstream()

    def half_a_second_to_the_first_audio(environ, start_response):
        if environ["PATH_INFO"] == "/v1/audio/speech":
            server_clock[0] += 0.5
        return fake(environ, start_response)

    with serve(half_a_second_to_the_first_audio) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", METRICS_TOKEN=TOKEN)
        customer = factories.customer(app, balance=1000)
        before = scrape(app.test_client())
        spoken = app.test_client().post(SPEECH, json=HELLO, headers=customer.headers)
        after = scrape(app.test_client())
    assert spoken.data == AUDIO
    assert spoken.headers["Server-Timing"] == "gateway;dur=250.00, queue;dur=0.00, upstream;dur=500.00"
    # In seconds: the gateway's own quarter of a second, and the first byte three quarters after arrival.
    assert sample(after, "kokoro_speech_gateway_seconds_sum") - sample(
        before, "kokoro_speech_gateway_seconds_sum"
    ) == pytest.approx(0.25, abs=1e-9)
    assert sample(after, "kokoro_speech_first_byte_seconds_sum") - sample(
        before, "kokoro_speech_first_byte_seconds_sum"
    ) == pytest.approx(0.75, abs=1e-9)


# Faults before audio


@pytest.mark.parametrize(
    "fault,detail",
    [
        (
            requests.ConnectionError(NameResolutionError("tts-gpu.internal", None, "Name or service not known")),
            "could not be reached",
        ),
        (requests.ConnectTimeout("connect timed out"), "could not be reached"),
    ],
)
def test_dns_failure_and_connect_timeout_are_refunded_502(app, client, customer, fault, detail):
    with responses.RequestsMock() as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=fault)
        response = client.post("/v1/audio/speech", json=HELLO, headers=customer.headers)
    assert response.status_code == 502 and detail in response.get_json()["detail"]
    assert factories.balance(app, customer.team_id) == 1000 and states(app, customer) == ["refunded"]


def test_a_single_thread_worker_is_free_again_after_each_fault(app, database_uri):
    customer = factories.customer(app, balance=1000)
    upstream = Silent(voice="af_bella")
    with serve(upstream) as upstream_url:
        env = {
            "DATABASE_URL": database_uri,
            "UPSTREAM_URL": f"{upstream_url}/v1",
            "SECRET_KEY": "fault-test",
            "UPSTREAM_READ_TIMEOUT": "0.5",
        }
        with gunicorn("wsgi:app", env, workers=1, threads=1) as (url, _):

            def speak(voice):
                return requests.post(
                    f"{url}/v1/audio/speech", json={**HELLO, "voice": voice}, headers=customer.headers, timeout=10
                )

            # A stalled stream (502) and a request the upstream refuses (400), each refunded.
            for voice, status in (("af_bella", 502), ("af_nicole", 400), ("af_bella", 502), ("af_nicole", 400)):
                assert speak(voice).status_code == status
                assert speak("af_sky").status_code == 200
            upstream.release.set()
    rows = factories.speech_requests(app, customer.team_id)
    assert sorted(row.state for row in rows) == ["delivered"] * 4 + ["refunded"] * 4
    assert factories.balance(app, customer.team_id) == 1000 - 4 * STREAMING_TEXT
    factories.assert_books_balance(app, customer.team_id)


# The wait for a speech server is for requests that can be charged, each account its share.


def test_a_client_with_no_credits_gets_402_at_once_and_a_paying_one_behind_it_is_served(make_app):
    with one_place(make_app, UPSTREAM_QUEUE=4) as (app, upstreams, only, held):
        payer, broke, other = (factories.customer(app, balance=balance) for balance in (1000, 0, 1000))
        with serve(app) as url:
            stream = _open(url, payer)
            with ThreadPoolExecutor(5) as pool:
                started = time.monotonic()
                squatters = list(pool.map(lambda _: _speak(url, broke), range(4)))
                # Refused before the wait, not when they would have reached its front.
                assert time.monotonic() - started < 5 and upstreams.waiting == 0
                assert [response.status_code for response in squatters] == [402] * 4
                assert squatters[0].json()["detail"] == (
                    f"Insufficient credits: this request costs {COST} credits and your balance is 0. "
                    "Top up your balance."
                )
                served = pool.submit(_speak, url, other)
                wait_for(lambda: upstreams.waiting == 1)
                held.set()
                assert served.result().status_code == 200 and served.result().content == AUDIO
            assert stream.content == AUDIO
    assert len(only.received) == 2
    assert factories.speech_requests(app, broke.team_id) == []
    assert factories.balance(app, broke.team_id) == 0


def test_a_key_at_its_spending_limit_gets_402_at_once_instead_of_a_place_in_the_wait(make_app):
    with one_place(make_app, UPSTREAM_QUEUE=4) as (app, upstreams, only, held):
        payer, limited = factories.customer(app, balance=1000), factories.customer(app, balance=1000)
        # One credit short of this request's cost, whatever the balance.
        control(app, limited.key_id, spend_limit=COST - 1, spend_period="lifetime")
        with serve(app) as url:
            stream = _open(url, payer)
            started = time.monotonic()
            refused = _speak(url, limited)
            # Refused before the wait, not when it would have reached its front.
            assert time.monotonic() - started < 5 and upstreams.waiting == 0
            held.set()
            assert stream.content == AUDIO
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "key_limit_reached"
    assert len(only.received) == 1 and factories.speech_requests(app, limited.team_id) == []


def answer_after_the_wait(app, upstreams, held, customer, meanwhile):
    """The answer to a request of `customer` that waits for the one place while a stream of its own holds it:
    `meanwhile()` runs once it waits, then the stream ends and frees the place."""
    with serve(app) as url:
        stream = _open(url, customer)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_speak, url, customer)
            wait_for(lambda: upstreams.waiting == 1)
            meanwhile()
            held.set()
            answer = waiting.result()
        assert stream.content == AUDIO
    return answer


def test_a_balance_spent_while_a_request_waits_is_refused_402_with_the_balance_as_it_is_then(make_app):
    """A request is let into the wait on the balance it arrived with; its charge, when a place frees up, decides
    again on the balance then, and says so (nothing else written, the speech server never asked)."""
    with one_place(make_app) as (app, upstreams, only, held):
        customer = factories.customer(app, balance=2 * COST)
        # Meanwhile a request through another gateway spends all but 5 credits of what is left.
        refused = answer_after_the_wait(
            app, upstreams, held, customer, lambda: factories.charged(app, customer.team_id, characters=COST - 5)
        )
    assert refused.status_code == 402
    assert refused.json()["detail"] == (
        f"Insufficient credits: this request costs {COST} credits and your balance is 5. Top up your balance."
    )
    assert len(only.received) == 1 and len(factories.speech_requests(app, customer.team_id)) == 2
    assert factories.balance(app, customer.team_id) == 5
    factories.assert_books_balance(app, customer.team_id)


def test_a_stream_cap_reached_while_a_request_waits_is_refused_429_when_its_place_frees_up(make_app):
    """Likewise the account's stream cap: checked before the wait, and again by the charge, atomically."""
    with one_place(make_app, MAX_STREAMS_PER_ACCOUNT=2) as (app, upstreams, only, held):
        customer = factories.customer(app, balance=1000)
        # Meanwhile two streams through another gateway take the account's places: when the first stream ends,
        # they still fill them.
        refused = answer_after_the_wait(
            app, upstreams, held, customer, lambda: factories.charged(app, customer.team_id, count=2, characters=COST)
        )
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["detail"] == (
        "Too many concurrent speech streams for this account (at most 2). Retry when one has finished."
    )
    assert len(only.received) == 1 and factories.balance(app, customer.team_id) == 1000 - 3 * COST


def test_a_key_limit_spent_while_a_request_waits_is_refused_402_when_its_place_frees_up(make_app):
    """Likewise the key's spending limit: what the key spent meanwhile counts at the charge."""
    with one_place(make_app) as (app, upstreams, only, held):
        customer = factories.customer(app, balance=1000)
        # Room for two requests and 4 credits more.
        control(app, customer.key_id, spend_limit=2 * COST + 4, spend_period="lifetime")
        # Meanwhile a request through another gateway, with the same key (the team's first), spends 5 credits:
        # the limit no longer covers this request.
        refused = answer_after_the_wait(
            app, upstreams, held, customer, lambda: factories.charged(app, customer.team_id, characters=5)
        )
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "key_limit_reached"
    assert refused.json()["detail"] == (
        f"This key's spending limit is reached: it may spend {2 * COST + 4} credits in all, has spent {COST + 5} and "
        f"this request costs {COST}. Raise the key's limit to go on."
    )
    assert len(only.received) == 1 and factories.balance(app, customer.team_id) == 1000 - COST - 5


def test_an_account_at_its_stream_cap_is_refused_before_the_wait(make_app):
    held = threading.Event()
    with serve(FakeUpstream(gate=held)) as a:
        app = make_app(UPSTREAM_URL=f"{a}/v1", UPSTREAM_MAX_STREAMS=1, UPSTREAM_QUEUE=4, MAX_STREAMS_PER_ACCOUNT=1)
        upstreams = app.extensions["upstream"].upstreams
        customer = factories.customer(app, balance=1000)
        with serve(app) as url:
            stream = _open(url, customer)
            refused = _speak(url, customer)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
            assert refused.json()["detail"] == (
                "Too many concurrent speech streams for this account (at most 1). Retry when one has finished."
            )
            assert upstreams.waiting == 0
            held.set()
            assert stream.content == AUDIO
    assert factories.balance(app, customer.team_id) == 1000 - COST


def test_one_account_holds_at_most_its_share_of_the_wait_and_others_still_get_in(make_app):
    held = threading.Event()
    with serve(FakeUpstream(gate=held)) as a:
        # A wait of 4 places: a quarter of it, one place, per account.
        app = make_app(UPSTREAM_URL=f"{a}/v1", UPSTREAM_MAX_STREAMS=1, UPSTREAM_QUEUE=4, UPSTREAM_QUEUE_SECONDS=20)
        upstreams = app.extensions["upstream"].upstreams
        greedy, other = factories.customer(app, balance=1000), factories.customer(app, balance=1000)
        with serve(app) as url:
            stream = _open(url, greedy)
            with ThreadPoolExecutor(3) as pool:
                waiting = pool.submit(_speak, url, greedy)
                wait_for(lambda: upstreams.waiting == 1)
                crowding = _speak(url, greedy)
                assert crowding.status_code == 429
                assert crowding.json()["error"]["code"] == "too_many_waiting"
                assert crowding.json()["detail"] == (
                    "This account already has 1 requests waiting for a speech server; nothing was charged. "
                    "Retry when one has started."
                )
                assert crowding.headers["Retry-After"] == "20" and "Retry-After" in list(crowding.headers)
                behind = pool.submit(_speak, url, other)
                wait_for(lambda: upstreams.waiting == 2)
                held.set()
                assert waiting.result().status_code == 200 and behind.result().status_code == 200
            assert stream.content == AUDIO
    assert factories.balance(app, greedy.team_id) == 1000 - 2 * COST
    assert factories.balance(app, other.team_id) == 1000 - COST
