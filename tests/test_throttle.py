"""Abuse limits: request rates per key, account and IP, streams per account, sign-ins, body size."""

import dataclasses
import socket
import threading

import limits
import requests
import responses
from limits.strategies import MovingWindowRateLimiter

from app import throttle
from tests import factories
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import FakeUpstream, stub_catalog
from tests.servers import serve

HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}
STREAMING_TEXT = len(HELLO["input"])


def test_per_key_and_per_account_rate_limits_answer_429_with_retry_after(make_app):
    app = make_app(RATE_LIMIT_PER_KEY="3/minute", RATE_LIMIT_PER_ACCOUNT="5/minute")
    customer = factories.customer(app, balance=100)
    second_key = factories.add_key(app, customer.user_id)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/v1/balance", headers=customer.headers).status_code == 200
    limited = client.post("/v1/audio/speech", json=HELLO, headers=customer.headers)
    assert limited.status_code == 429 and limited.get_json()["detail"].startswith("Rate limit reached.")
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    second = {"Authorization": f"Bearer {second_key}"}
    assert [client.get("/v1/balance", headers=second).status_code for _ in range(3)] == [200, 200, 429]
    assert factories.balance(app, customer.team_id) == 100
    other = factories.customer(app, balance=1)
    assert client.get("/v1/balance", headers=other.headers).status_code == 200


def test_in_process_rate_limits_start_no_thread_per_request(make_app, monkeypatch):
    app = make_app(RATE_LIMIT_PER_KEY="3/minute")
    customer = factories.customer(app, balance=10)
    client = app.test_client()
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda thread: started.append(thread.name))
    statuses = []
    for _ in range(4):
        statuses.append(client.get("/v1/balance", headers=customer.headers).status_code)
    assert statuses == [200, 200, 200, 429]
    assert started == []


def test_in_process_rate_limits_drop_expired_entries(freeze):
    advance = freeze(throttle)
    storage = throttle.InProcessWindows()
    limiter = MovingWindowRateLimiter(storage)
    window = limits.parse("5/second")
    for key in range(20):
        assert limiter.hit(window, "key", str(key))
    assert sum(map(len, storage.events.values())) == 20
    advance(1.1)
    assert limiter.hit(window, "key", "fresh")
    assert sum(map(len, storage.events.values())) == 1


def test_concurrent_streams_per_account_are_capped(make_app):
    gate = threading.Event()
    with serve(FakeUpstream([b"ID3first", b"rest"], gate=gate)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", MAX_STREAMS_PER_ACCOUNT=2)
        customer = factories.customer(app, balance=1000)
        second_key = {"Authorization": f"Bearer {factories.add_key(app, customer.user_id)}"}
        with serve(app) as url:

            def open_stream(headers):
                response = requests.post(f"{url}/v1/audio/speech", json=HELLO, headers=headers, stream=True, timeout=10)
                chunks = response.iter_content(chunk_size=None)
                if response.status_code == 200:
                    assert next(chunks) == b"ID3first"
                return response, chunks

            streams = [open_stream(customer.headers), open_stream(second_key)]
            refused, _ = open_stream(customer.headers)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert "concurrent speech streams" in refused.json()["detail"]
            # Refused by the charge: the place it took on the speech server is given back at once.
            assert [state["streams"] for state in app.extensions["upstream"].upstreams.states()] == [2]
            gate.set()
            for _, chunks in streams:
                assert b"".join(chunks) == b"rest"
            assert open_stream(customer.headers)[0].status_code == 200
    assert factories.balance(app, customer.team_id) == 1000 - 3 * STREAMING_TEXT


def test_a_stream_slot_is_free_as_soon_as_the_audio_has_all_been_read(make_app):
    app = make_app(MAX_STREAMS_PER_ACCOUNT=1)
    customer = factories.customer(app, balance=1000)
    client = app.test_client()
    with responses.RequestsMock() as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=b"ID3audio", content_type="audio/mpeg")
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=b"ID3again", content_type="audio/mpeg")
        first = client.post("/v1/audio/speech", json=HELLO, headers=customer.headers, buffered=False)
        assert b"".join(first.response) == b"ID3audio"
        # The body is read to its end; the response is not closed yet, as on a server finishing up.
        second = client.post("/v1/audio/speech", json=HELLO, headers=customer.headers)
        assert second.status_code == 200 and second.data == b"ID3again"
        first.close()
    assert factories.balance(app, customer.team_id) == 1000 - 2 * STREAMING_TEXT


def test_limits_in_redis_are_shared_by_several_app_hosts(make_app, own_redis):
    redis_url, _ = own_redis
    hosts = [make_app(RATELIMIT_STORAGE_URI=redis_url, RATE_LIMIT_PER_KEY="4/minute") for _ in range(2)]
    customer = factories.customer(hosts[0], balance=10)
    statuses = [
        hosts[index % 2].test_client().get("/v1/balance", headers=customer.headers).status_code for index in range(6)
    ]
    assert statuses == [200, 200, 200, 200, 429, 429]


def test_failed_sign_ins_are_throttled_per_account_and_per_ip(make_app):
    app = make_app(LOGIN_LIMIT_PER_ACCOUNT="3/15minutes", LOGIN_LIMIT_PER_IP="5/15minutes")
    victim = factories.customer(app, password="correct horse battery")
    bystander = factories.customer(app, password="correct horse battery")
    web = factories.WebClient(app.test_client())
    for _ in range(3):
        assert web.login(victim.email, "guess").status_code == 200
    blocked = web.login(victim.email, "correct horse battery")
    assert blocked.status_code == 429 and "Too many failed sign-ins" in blocked.get_data(as_text=True)
    assert int(blocked.headers["Retry-After"]) > 0
    assert web.login(bystander.email, "nope").status_code == 200
    assert web.login(bystander.email, "nope").status_code == 200
    # Five failures from this address: everyone is held back here, even with the right password.
    assert web.login(bystander.email, "correct horse battery").status_code == 429
    other_ip = factories.WebClient(app.test_client())
    other_ip.get("/login")
    response = other_ip.client.post(
        "/login",
        data={"email": bystander.email, "password": "correct horse battery", "csrf_token": other_ip.token},
        environ_base={"REMOTE_ADDR": "127.0.0.2"},
    )
    assert response.status_code == 302


def test_an_oversized_body_is_refused_before_it_is_read(make_app):
    app = make_app(MAX_CONTENT_LENGTH=1024)
    customer = factories.customer(app, balance=100)
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {customer.secret}\r\nContent-Length: 50000000\r\n\r\n".encode()
                + b'{"input": "'
            )
            # Nothing more is sent: the answer must not wait for the 50 MB.
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b'"detail"' in answer
    assert factories.balance(app, customer.team_id) == 100


def test_with_redis_down_the_abuse_limits_let_traffic_through_and_the_money_rules_still_hold(
    make_app, own_redis, caplog
):
    """The rule: limits kept in Redis fail open, with an error in the log and a metric; the stream
    cap and every money guarantee live in the database and hold without Redis."""
    from app import metrics

    url, stop_redis = own_redis
    app = make_app(RATELIMIT_STORAGE_URI=url, RATE_LIMIT_PER_KEY="3/minute", MAX_STREAMS_PER_ACCOUNT=1)
    customer = factories.customer(app, balance=1000)
    client = app.test_client()
    assert [client.get("/v1/balance", headers=customer.headers).status_code for _ in range(4)] == [200] * 3 + [429]
    failures = metrics.RATE_LIMIT_STORE_FAILURES._value.get()
    stop_redis()
    # Redis is gone mid-run: the limits cannot be read, so they let the requests through ...
    assert [client.get("/v1/balance", headers=customer.headers).status_code for _ in range(5)] == [200] * 5
    assert any(r.levelname == "ERROR" and "rate limits" in r.getMessage() for r in caplog.records)
    assert metrics.RATE_LIMIT_STORE_FAILURES._value.get() > failures
    # ... and sign-in, whose limits are kept there too, still works (and still says a wrong password is wrong).
    web = factories.WebClient(app.test_client())
    assert "Wrong email or password." in web.login("nobody@example.com").get_data(as_text=True)
    # The money rules do not depend on Redis: a speech request is charged once, and the
    # account's stream cap (kept by the database) still holds.
    gate = threading.Event()
    with serve(FakeUpstream(gate=gate)) as upstream_url:
        moved = dataclasses.replace(app.extensions["settings"], upstream_url=f"{upstream_url}/v1")
        app.extensions["upstream"] = type(app.extensions["upstream"]).from_settings(moved, app, app.extensions["lease"])
        with serve(app) as gateway:
            first = requests.post(f"{gateway}/v1/audio/speech", json=HELLO, headers=customer.headers, stream=True)
            second = requests.post(f"{gateway}/v1/audio/speech", json=HELLO, headers=customer.headers)
            assert first.status_code == 200 and second.status_code == 429
            assert second.json()["error"]["code"] == "too_many_streams"
            gate.set()
            assert first.content == b"ID3\x04audio-bytes"
    assert factories.balance(app, customer.team_id) == 1000 - STREAMING_TEXT
    factories.assert_books_balance(app, customer.team_id)
