"""Money never leaks: crashes, stale charges, the audit, upstream faults, abuse limits, secrets."""

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import limits
import pytest
import requests
import responses
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import OperationalError
from urllib3.exceptions import NameResolutionError

from app import billing, throttle
from app.extensions import db
from app.models import LedgerEntry, SpeechRequest, User, utcnow
from tests import factories
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import FakeUpstream, stub_catalog
from tests.servers import gunicorn, serve

HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}
STREAMING_TEXT = len(HELLO["input"])


def charge(app, customer, count=1, characters=10):
    with app.app_context():
        ids = [factories.charge_speech(customer.user_id, characters).id for _ in range(count)]
        db.session.commit()
        return ids


def age(app, request_ids, seconds):
    with app.app_context():
        db.session.execute(
            update(SpeechRequest)
            .where(SpeechRequest.id.in_(request_ids))
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )
        db.session.commit()


def states(app, customer):
    return [row.state for row in factories.speech_requests(app, customer.user_id)]


# 1. Crash safety


def test_a_killed_worker_leaves_the_charge_visible_and_settle_refunds_it_once(app, runner, database_uri):
    customer = factories.customer(app, balance=1000)
    gate = threading.Event()
    upstream = FakeUpstream([b"ID3first", b"never sent"], gate=gate)
    with serve(upstream) as upstream_url:
        env = {"DATABASE_URL": database_uri, "UPSTREAM_URL": f"{upstream_url}/v1", "SECRET_KEY": "crash-test"}
        with gunicorn("wsgi:app", env, workers=1, threads=4) as (url, master):
            response = requests.post(
                f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, stream=True, timeout=10
            )
            chunks = response.iter_content(chunk_size=None)
            assert next(chunks) == b"ID3first"
            [worker] = subprocess.run(
                ["pgrep", "-P", str(master.pid)], capture_output=True, text=True, check=True
            ).stdout.split()
            os.kill(int(worker), signal.SIGKILL)
            with pytest.raises(requests.RequestException):
                b"".join(chunks)
            gate.set()
    assert states(app, customer) == ["charged"]
    assert factories.balance(app, customer.user_id) == 1000 - STREAMING_TEXT

    # Young charges are left alone: their worker may still be streaming.
    result = runner.invoke(args=["speech", "settle"])
    assert "settled 0" in result.output and states(app, customer) == ["charged"]

    result = runner.invoke(args=["speech", "settle", "--older-than", "0"])
    # It died before its first progress record: none of its audio is on the books as delivered.
    assert result.exit_code == 0 and f"settled 1, refunding {STREAMING_TEXT} credits" in result.output
    assert runner.invoke(args=["speech", "settle", "--older-than", "0"]).output.startswith("0 requests")
    [speech] = factories.speech_requests(app, customer.user_id)
    assert speech.state == "refunded" and speech.error == billing.STALE_REASON
    assert factories.balance(app, customer.user_id) == 1000
    assert runner.invoke(args=["audit"]).exit_code == 0


def test_a_lost_database_at_settlement_leaves_the_request_for_settle(app, runner, customer, monkeypatch):
    def database_gone(*args, **kwargs):
        raise OperationalError("UPDATE speech_requests", {}, Exception("server closed the connection"))

    monkeypatch.setattr(billing, "mark_delivered", database_gone)
    with responses.RequestsMock() as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=b"ID3audio", content_type="audio/mpeg")
        response = app.test_client().post("/v1/audio/speech", json=HELLO, headers=customer.headers)
        assert response.status_code == 200 and response.data == b"ID3audio"
    assert states(app, customer) == ["charged"]
    monkeypatch.undo()
    assert "settled 1" in runner.invoke(args=["speech", "settle", "--older-than", "0"]).output
    assert factories.balance(app, customer.user_id) == 1000


def test_settle_racing_itself_and_live_traffic_refunds_each_request_once(app, customer):
    stale = charge(app, customer, count=20)
    age(app, stale, 7200)
    live = charge(app, customer, count=5)
    barrier = threading.Barrier(4, timeout=30)

    def settle(_):
        with app.app_context():
            barrier.wait()
            refunded = 0
            for request_id in billing.stale_charges(3600):
                refunded += billing.refund_speech(request_id, billing.STALE_REASON) is not None
                db.session.commit()
            db.session.remove()
            return refunded

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(settle, range(4))) == 20
    with app.app_context():
        refunds = db.session.scalars(select(LedgerEntry.reference).where(LedgerEntry.kind == "refund")).all()
        assert sorted(refunds) == sorted(f"refund:{request_id}" for request_id in stale)
        assert all(db.session.get(SpeechRequest, request_id).state == "charged" for request_id in live)
    assert factories.balance(app, customer.user_id) == 1000 - 5 * 10
    factories.assert_books_balance(app, customer.user_id)


# 2. Audit


def test_the_audit_passes_on_clean_books(app, runner, customer):
    stale = charge(app, customer, count=3)
    with app.app_context():
        billing.refund_speech(stale[0], "upstream down")
        billing.mark_delivered(stale[1])
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 0 and "Audit passed: 1 users, 5 ledger entries, 3 speech requests" in result.output


def ledger_row(user_id: int, amount: int, kind: str, reference: str) -> None:
    """A ledger row written behind the billing module's back, as a bug or a hand edit would."""
    db.session.execute(
        insert(LedgerEntry).values(
            user_id=user_id, amount=amount, kind=kind, reference=reference, balance_after=0, created_at=utcnow()
        )
    )


def test_the_audit_names_every_kind_of_offender_and_exits_1(app, runner, customer):
    delivered, refunded = charge(app, customer, count=2)
    other = factories.customer(app, balance=50)
    with app.app_context():
        billing.mark_delivered(delivered)
        billing.refund_speech(refunded, "upstream down")
        # A balance changed behind the ledger's back.
        db.session.execute(update(User).where(User.id == other.user_id).values(balance=75))
        # A refund for a delivered request, and one for a request that was never charged.
        ledger_row(customer.user_id, 10, "refund", f"refund:{delivered}")
        ledger_row(customer.user_id, 7, "refund", "refund:req_ghost")
        # A paid Stripe payment that was never credited, and a top-up with no payment.
        factories.starter_payment(customer.user_id, "cs_lost", status="paid", paid_at=utcnow())
        ledger_row(other.user_id, 5, "topup", "topup:cs_forged")
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 1
    output = result.output
    assert f"user {other.user_id} <{other.email}>: balance 75 but the ledger sums to 55" in output
    assert f"user {customer.user_id} <{customer.email}>: balance 990 but the ledger sums to 1007" in output
    assert f"request {delivered}: refunded 10 credits while delivered" in output
    assert "ledger refund:req_ghost: +7 credits for no speech request" in output
    assert "payment cs_lost: 10000 credits paid, 0 top-ups of 0 in all" in output
    assert "ledger topup:cs_forged: a top-up for no payment" in output
    assert "AUDIT FAILED: 6 problems" in output


# 3. Upstream faults


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
    assert factories.balance(app, customer.user_id) == 1000 and states(app, customer) == ["refunded"]


class Faulty(FakeUpstream):
    """Healthy, except that voice af_bella gets headers and then silence."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def _stream(self):
        if self.received[-1].get("voice") == "af_bella":
            yield b""
            self.release.wait(10)
            return
        yield from super()._stream()


def test_a_single_thread_worker_is_free_again_after_each_fault(app, database_uri):
    customer = factories.customer(app, balance=1000)
    upstream = Faulty()
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
    rows = factories.speech_requests(app, customer.user_id)
    assert sorted(row.state for row in rows) == ["delivered"] * 4 + ["refunded"] * 4
    assert factories.balance(app, customer.user_id) == 1000 - 4 * STREAMING_TEXT
    factories.assert_books_balance(app, customer.user_id)


def test_failover_to_the_next_upstream_when_one_refuses(make_app):
    with serve(FakeUpstream()) as healthy:
        app = make_app(UPSTREAM_URL=f"http://127.0.0.1:9/v1,{healthy}/v1")
        customer = factories.customer(app, balance=100)
        client = app.test_client()
        response = client.post("/v1/audio/speech", json=HELLO, headers=customer.headers)
        assert response.status_code == 200 and response.data == b"ID3\x04audio-bytes"
        assert client.get("/v1/models", headers=customer.headers).status_code == 200


# 4. Abuse


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
    assert factories.balance(app, customer.user_id) == 100
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
        # Spaced like a quiet customer's requests: past the 10 ms after which limits' own timer thread ends.
        time.sleep(0.03)
        statuses.append(client.get("/v1/balance", headers=customer.headers).status_code)
    assert statuses == [200, 200, 200, 429]
    assert started == []


def test_in_process_rate_limits_drop_expired_entries(monkeypatch):
    monkeypatch.setattr(throttle, "SWEEP_SECONDS", 0.0)
    storage = throttle._SweptMemoryStorage()
    limiter = MovingWindowRateLimiter(storage)
    window = limits.parse("5/second")
    for key in range(20):
        assert limiter.hit(window, "key", str(key))
    assert sum(map(len, storage.events.values())) == 20
    time.sleep(1.1)
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
            gate.set()
            for _, chunks in streams:
                assert b"".join(chunks) == b"rest"
            assert open_stream(customer.headers)[0].status_code == 200
    assert factories.balance(app, customer.user_id) == 1000 - 3 * STREAMING_TEXT


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
    assert factories.balance(app, customer.user_id) == 1000 - 2 * STREAMING_TEXT


@pytest.fixture
def redis_url():
    url = "redis://127.0.0.1:6379/15"
    try:
        import redis

        redis.Redis.from_url(url).flushdb()
    except Exception as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({error})")
    return url


def test_limits_in_redis_are_shared_by_several_app_hosts(make_app, redis_url):
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
    assert factories.balance(app, customer.user_id) == 100


# 5. Secrets


def test_a_key_never_reaches_logs_error_bodies_or_the_database(app, customer, caplog):
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    with responses.RequestsMock() as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", status=500, json={"detail": "boom"})
        bodies = [
            client.post("/v1/audio/speech", json=HELLO, headers=customer.headers).data,
            client.get("/v1/balance", headers={"Authorization": f"Bearer {customer.secret}x"}).data,
            client.get("/v1/nope", headers=customer.headers).data,
        ]
    assert all(customer.secret.encode() not in body for body in bodies)
    assert customer.secret not in caplog.text
    with app.app_context():
        for table in db.metadata.sorted_tables:
            for row in db.session.execute(text(f"SELECT * FROM {table.name}")):
                assert customer.secret not in " ".join(map(str, row)), table.name
