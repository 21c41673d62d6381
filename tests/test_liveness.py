"""Delivered audio is paid for, even when a reader pauses: a request is settled by time only once the
gateway process serving it is gone (its lease ran out), and a reader that takes nothing for
CLIENT_IDLE_SECONDS is ended like a hang-up, its charge kept."""

import json
import os
import socket
import sqlite3
import threading
from datetime import timedelta
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import delete, event, select, update

from app import create_app, metering, speech
from app.config import SettingError
from app.extensions import db
from app.models import GatewayProcess, LedgerEntry, SpeechRequest, utcnow
from tests import factories
from tests.conftest import app_config
from tests.fake_upstream import FakeUpstream
from tests.servers import gunicorn, serve, wait_for
from tests.test_paid_audio import PROSE, in_chunks, pcm_of, speech_body

SPEECH = "/v1/audio/speech"


def lease_of(app, process_id):
    with app.app_context():
        return db.session.get(GatewayProcess, process_id)


def end_lease(app, process_id):
    """As if the process died a while ago: its lease ran out."""
    with app.app_context():
        db.session.execute(
            update(GatewayProcess)
            .where(GatewayProcess.id == process_id)
            .values(lease_until=utcnow() - timedelta(hours=2))
        )
        db.session.commit()


def quiet_for_hours(app, request_ids):
    """Made two hours ago, a second apart, in the order given."""
    with app.app_context():
        for second, request_id in enumerate(request_ids):
            made = utcnow() - timedelta(hours=2) + timedelta(seconds=second)
            db.session.execute(update(SpeechRequest).where(SpeechRequest.id == request_id).values(created_at=made))
        db.session.commit()


def served_by(app, customer, process_id, count=1):
    """`count` charged requests, as a speech request of process `process_id` records them."""
    with app.app_context():
        ids = []
        for _ in range(count):
            paid = metering.charge_speech(
                customer.team_id,
                customer.user_id,
                customer.key_id,
                unlimited=False,
                characters=10,
                model="kokoro",
                voice="af_sky",
                response_format="pcm",
                process_id=process_id,
            )
            ids.append(paid.request_id)
        db.session.commit()
    return ids


def test_settle_never_refunds_a_request_of_a_live_process_however_quiet_it_is(app, runner, customer):
    lease = app.extensions["lease"]
    alive = lease.process_id()
    [quiet] = served_by(app, customer, alive)
    quiet_for_hours(app, [quiet])
    result = runner.invoke(args=["speech", "settle"])
    assert result.exit_code == 0 and "settled 0" in result.output
    assert runner.invoke(args=["audit"]).exit_code == 0
    assert [row.state for row in factories.speech_requests(app, customer.team_id)] == ["charged"]

    end_lease(app, alive)
    result = runner.invoke(args=["speech", "settle"])
    assert "1 requests of gone processes without progress for over 600 s; settled 1, refunding 10 credits." in (
        result.output
    )
    assert factories.balance(app, customer.team_id) == 1000
    factories.assert_books_balance(app, customer.team_id)


def test_a_process_is_alive_until_the_exact_end_of_its_lease(app, customer):
    alive = app.extensions["lease"].process_id()
    [request_id] = served_by(app, customer, alive)
    quiet_for_hours(app, [request_id])
    until = lease_of(app, alive).lease_until
    with app.app_context():
        assert metering.stale_charges(600, now=until) == []
        assert metering.stale_charges(600, now=until + timedelta(microseconds=1)) == [request_id]
        # A request names a process that never registered (or whose row is gone): it is gone.
        db.session.execute(delete(GatewayProcess))
        db.session.commit()
        assert metering.stale_charges(600) == [request_id]


def test_stale_requests_are_settled_oldest_first_so_the_books_read_the_same_every_run(app, runner, customer):
    gone = "0" * 32
    ids = served_by(app, customer, gone, count=5)
    quiet_for_hours(app, ids)
    with app.app_context():
        assert metering.stale_charges(600) == ids
    assert "settled 5, refunding 50 credits" in runner.invoke(args=["speech", "settle"]).output
    with app.app_context():
        refunds = db.session.scalars(
            select(LedgerEntry.reference).where(LedgerEntry.kind == "refund").order_by(LedgerEntry.id)
        ).all()
    assert refunds == [f"refund:{request_id}" for request_id in ids]


def test_stale_requests_made_in_another_order_than_charged_are_refunded_oldest_first_in_the_books(
    app, runner, customer
):
    """The ledger's refund rows follow the requests' age, not the order they were charged or stored in:
    each row's balance after is the running balance of that order."""
    with app.app_context():
        ids = [factories.charge_speech(customer.team_id, characters).id for characters in (10, 20, 30)]
        db.session.commit()
    # The last charged is the oldest.
    quiet_for_hours(app, list(reversed(ids)))
    assert "settled 3, refunding 60 credits" in runner.invoke(args=["speech", "settle"]).output
    assert factories.ledger(app, customer.team_id, LedgerEntry.reference)[-3:] == [
        ("refund", 30, f"refund:{ids[2]}"),
        ("refund", 20, f"refund:{ids[1]}"),
        ("refund", 10, f"refund:{ids[0]}"),
    ]
    assert [balance for _, _, balance in factories.ledger(app, customer.team_id)[-3:]] == [970, 990, 1000]


def test_stale_requests_made_at_the_same_instant_are_refunded_in_the_order_of_their_ids(app, runner, customer):
    """Ties in age are broken by the request's id, so two runs of settle over the same books write the same rows."""
    later, earlier = "req_" + "b" * 32, "req_" + "a" * 32
    with app.app_context():
        for request_id, characters in ((later, 10), (earlier, 30)):
            factories.charge_speech(customer.team_id, characters, request_id=request_id)
        db.session.execute(update(SpeechRequest).values(created_at=utcnow() - timedelta(hours=2)))
        db.session.commit()
    assert "settled 2, refunding 40 credits" in runner.invoke(args=["speech", "settle"]).output
    assert factories.ledger(app, customer.team_id)[-2:] == [("refund", 30, 990), ("refund", 10, 1000)]


def test_a_request_is_stale_only_once_its_quiet_is_longer_than_the_threshold(app, customer):
    """Quiet for exactly the threshold is not yet stale; a microsecond more is (an injected clock)."""
    [request_id] = served_by(app, customer, "0" * 32)
    with app.app_context():
        made = db.session.get(SpeechRequest, request_id).created_at
        assert metering.stale_charges(600, now=made + timedelta(seconds=600)) == []
        assert metering.stale_charges(600, now=made + timedelta(seconds=600, microseconds=1)) == [request_id]


def test_a_settle_threshold_shorter_than_the_lease_is_refused_with_the_reason(app, runner, database_uri):
    result = runner.invoke(args=["speech", "settle", "--older-than", "59"])
    assert result.exit_code == 2
    assert (
        "59 s is shorter than a gateway process's lease (PROCESS_LEASE_SECONDS, 60 s), the time it takes to tell "
        "that the process serving a request is gone; use at least 60 s." in " ".join(result.output.split())
    )
    with pytest.raises(SettingError, match=r"^STALE_CHARGE_SECONDS: 30 s is shorter than a gateway process's lease"):
        create_app(app_config(database_uri, STALE_CHARGE_SECONDS=30))
    assert runner.invoke(args=["speech", "settle", "--older-than", "60"]).exit_code == 0


def test_the_lease_is_pushed_on_by_each_renewal_and_comes_back_when_its_row_was_removed(app):
    lease = app.extensions["lease"]
    process_id = lease.process_id()
    first = lease_of(app, process_id)
    assert first.pid == os.getpid() and first.host == socket.gethostname()
    assert timedelta(seconds=59) < first.lease_until - first.started_at <= timedelta(seconds=60)
    lease.renew()
    assert lease_of(app, process_id).lease_until > first.lease_until
    with app.app_context():
        db.session.execute(delete(GatewayProcess))
        db.session.commit()
    lease.renew()
    assert lease_of(app, process_id) is not None
    # One registration per process: the id a request names does not change.
    assert lease.process_id() == process_id


def test_once_stopped_the_lease_renews_no_more_its_thread_ended(app):
    # Stopping waits for the renewer, so no renewal (a write to the database) outlives the app that stopped it.
    before = set(threading.enumerate())
    lease = app.extensions["lease"]
    lease.process_id()
    [renewer] = [thread for thread in threading.enumerate() if thread not in before and thread.name == "gateway-lease"]
    lease.stop()
    assert not renewer.is_alive()


def test_a_settlement_the_database_refused_is_written_by_its_process_when_the_database_is_back(
    app, runner, customer, monkeypatch
):
    from tests.test_settlement import database_gone, speak

    # The database goes away under the settlement itself (what mark_delivered writes with).
    monkeypatch.setattr(metering, "_close_speech", database_gone)
    response = speak(app, customer)
    assert response.status_code == 200 and response.data == b"ID3audio"
    [row] = factories.speech_requests(app, customer.team_id)
    assert row.state == "charged" and row.process_id == app.extensions["lease"].process_id()
    lease = app.extensions["lease"]
    # Still away at the next renewal: kept for the one after.
    assert lease.settle_pending() == 1
    monkeypatch.undo()
    assert lease.settle_pending() == 0
    [row] = factories.speech_requests(app, customer.team_id)
    # The audio went out: the charge stands, as it would have without the lost database, and the row says what
    # the stream did, as it would have.
    assert row.state == "delivered" and row.credits_refunded == 0
    assert (row.upstream_status, row.bytes_sent) == (200, len(b"ID3audio")) and row.duration_ms is not None
    assert factories.balance(app, customer.team_id) == 1000 - len("Hello from kokoro-pay.")
    assert runner.invoke(args=["audit"]).exit_code == 0


def recorded_progress(monkeypatch) -> list:
    """The audio each progress record of the test's streams covered, in ms, in the order written."""
    recorded = []
    record = metering.record_progress

    def spy(request_id, bytes_sent, audio_ms):
        recorded.append(audio_ms)
        return record(request_id, bytes_sent, audio_ms)

    monkeypatch.setattr(metering, "record_progress", spy)
    return recorded


def test_progress_is_recorded_for_every_heartbeat_of_audio_however_fast_it_arrives(make_app, monkeypatch):
    """Audio outpaces the clock: a record each time a heartbeat of audio (5 s) has gone out unrecorded, and only
    then, not one per chunk (the speech module's monotonic clock injected and stopped: no time passes)."""
    monkeypatch.setattr(speech, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    # 30 one-second chunks, each relayed as one piece, sent as fast as they are read.
    chunks = in_chunks(pcm_of(30), 30)
    recorded = recorded_progress(monkeypatch)
    with serve(FakeUpstream(chunks)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", STREAM_CHUNK_BYTES=1 << 24)
        customer = factories.customer(app, balance=10_000)
        with serve(app) as url:
            response = requests.post(f"{url}{SPEECH}", json=speech_body(), headers=customer.headers, timeout=30)
            assert response.content == b"".join(chunks)
    assert app.extensions["settings"].stream_heartbeat_seconds == 5
    # What a crash could refund of audio that went out is what the last record does not cover: under a heartbeat.
    assert recorded == [5000, 10000, 15000, 20000, 25000, 30000]


@pytest.mark.parametrize(
    ("heartbeat", "waited", "records"),
    [(5.0, 4.5, []), (5.0, 5.0, [None]), (0.001, 0.0, [])],
    ids=["under a heartbeat", "exactly a heartbeat", "no time at all"],
)
def test_progress_of_audio_that_cannot_be_measured_is_recorded_by_the_clock_alone(
    make_app, monkeypatch, heartbeat, waited, records
):
    """Audio the meter cannot read has no length to count: however many chunks go out, a record is written only
    once STREAM_HEARTBEAT_SECONDS have passed since the last, exactly that long included (the speech module's
    monotonic clock injected)."""
    clock = [1000.0]
    monkeypatch.setattr(speech, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    recorded = recorded_progress(monkeypatch)
    chunks = [b"not a WAV header", b"nor this", b"nor that", b"the end"]
    with serve(FakeUpstream(chunks)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", STREAM_HEARTBEAT_SECONDS=heartbeat)
        customer = factories.customer(app, balance=10_000)
        body = speech_body(response_format="wav")
        response = app.test_client().post(SPEECH, json=body, headers=customer.headers, buffered=False)
        pieces = iter(response.response)
        assert [next(pieces), next(pieces)] == chunks[:2] and recorded == []
        clock[0] += waited
        assert next(pieces) == chunks[2] and recorded == records
        assert list(pieces) == chunks[3:] and recorded == records
        response.close()
    [row] = factories.speech_requests(app, customer.team_id)
    assert row.state == "delivered" and row.audio_ms is None


def test_after_a_record_by_the_clock_the_next_heartbeat_of_audio_is_counted_from_what_it_covered(make_app, monkeypatch):
    """A record the clock called for before any whole millisecond of audio went out covers none: the next one
    comes once exactly a heartbeat of audio has gone out (the speech module's monotonic clock injected)."""
    clock = [1000.0]
    monkeypatch.setattr(speech, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    recorded = recorded_progress(monkeypatch)
    # Two bytes of PCM twice (a 24th of a millisecond each), then the rest of exactly five seconds.
    chunks = [bytes(2), bytes(2), bytes(5 * 48000 - 4)]
    with serve(FakeUpstream(chunks)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", STREAM_HEARTBEAT_SECONDS=5.0, STREAM_CHUNK_BYTES=1 << 24)
        customer = factories.customer(app, balance=10_000)
        response = app.test_client().post(SPEECH, json=speech_body(), headers=customer.headers, buffered=False)
        pieces = iter(response.response)
        assert next(pieces) == chunks[0] and recorded == []
        clock[0] += 5.0
        assert next(pieces) == chunks[1] and recorded == [0]
        assert list(pieces) == chunks[2:] and recorded == [0, 5000]
        response.close()


def test_a_progress_record_leaves_its_connection_all_or_nothing_for_the_next_transaction(make_app, monkeypatch):
    """Progress, and a delivery, are each written as one statement committed as it runs; the connection it ran
    on must go back to the pool as it came, or the next charge on it would commit its debit before its
    ledger row (checked on PostgreSQL: a connection left so makes this fail)."""
    chunks = in_chunks(pcm_of(30), 30)
    recorded = recorded_progress(monkeypatch)
    with serve(FakeUpstream(chunks)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        customer = factories.customer(app, balance=10_000)
        handed_out = []
        with app.app_context():
            event.listen(db.engine, "checkout", lambda dbapi, *_: handed_out.append(_commits_each_statement(dbapi)))
        with serve(app) as url:
            for _ in range(3):
                response = requests.post(f"{url}{SPEECH}", json=speech_body(), headers=customer.headers, timeout=30)
                assert response.content == b"".join(chunks)
    assert len(recorded) >= 3 * 6
    # Every connection handed out afterwards (the next requests' charges and settlements included) began
    # transactions again.
    assert handed_out and not any(handed_out)


def _commits_each_statement(dbapi_connection) -> bool:
    if isinstance(dbapi_connection, sqlite3.Connection):
        return dbapi_connection.isolation_level is None
    return dbapi_connection.autocommit


def quiet_since(app, customer) -> timedelta:
    [row] = factories.speech_requests(app, customer.team_id)
    return utcnow() - (row.progress_at or row.created_at)


def raw_speech_request(url: str, customer, body: dict) -> socket.socket:
    """A client that sends a speech request, reads the answer's status line, then stops reading.

    Its receive buffer is small, so the gateway's writes soon block, as a paused player's would.
    """
    address = urlsplit(url)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((address.hostname, address.port))
    payload = json.dumps(body).encode()
    client.sendall(
        f"POST {SPEECH} HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: {customer.headers['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    assert client.recv(64).startswith(b"HTTP/1.1 200")
    return client


@pytest.mark.parametrize(
    ("client_does", "recorded"), [("hangs up", "client disconnected"), ("stops reading", "client took nothing for 1 s")]
)
def test_a_stream_blocked_on_its_client_records_whether_it_hung_up_or_took_nothing_for_the_idle_time(
    make_app, monkeypatch, client_does, recorded
):
    """The request's error tells the operator why a charged stream ended early: the client hung up, or it
    took nothing for CLIENT_IDLE_SECONDS, counted from when the audio was handed over (the speech module's
    monotonic clock injected: exactly the idle time counts as idle)."""
    clock = [1000.0]
    monkeypatch.setattr(speech, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    # One piece larger than every buffer between, read whole: the relay hands it over once, then blocks writing it.
    with serve(FakeUpstream([pcm_of(200)])) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", CLIENT_IDLE_SECONDS=1.0, STREAM_CHUNK_BYTES=1 << 24)
        customer = factories.customer(app, balance=10_000)
        with serve(app) as url:
            # The status line is out: the audio was handed over at 1000.0 s.
            client = raw_speech_request(url, customer, speech_body())
            if client_does == "hangs up":
                client.close()
            else:
                clock[0] += 1.0
            [row] = wait_for(
                lambda: [r for r in factories.speech_requests(app, customer.team_id) if r.state != "charged"],
                timeout=20,
                what="the blocked stream to end",
            )
            client.close()
    assert row.state == "delivered" and row.credits_refunded == 0 and row.error == recorded


def test_once_the_answer_closes_the_clients_socket_is_left_as_the_server_had_it():
    """The write timeout is the stream's alone: the socket's own comes back when the answer closes, for the
    next request on the connection; a socket the server closed first is left alone, with no error to log; no
    socket (a server that gives none) is no timeout."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(7.0)
        undo = speech._limit_client_writes(ours, 2.5)
        assert ours.gettimeout() == 2.5
        undo()
        assert ours.gettimeout() == 7.0
    closed, theirs = socket.socketpair()
    theirs.close()
    undo = speech._limit_client_writes(closed, 2.5)
    closed.close()
    undo()
    speech._limit_client_writes(None, 2.5)()


def read_to_the_end(client: socket.socket) -> bytes:
    client.settimeout(30)
    received = bytearray()
    while data := client.recv(1 << 16):
        received += data
    client.close()
    return bytes(received)


def test_a_reader_who_pauses_past_settle_pays_for_the_audio_it_gets_and_is_ended_like_a_hang_up(make_app, database_uri):
    """The attack: read the headers, stop reading, wait for `flask speech settle`, then read the audio."""
    upstream = FakeUpstream(in_chunks(pcm_of(4), 4), endless=True)
    settings = {"PROCESS_LEASE_SECONDS": "1", "STALE_CHARGE_SECONDS": "1", "CLIENT_IDLE_SECONDS": "3"}
    app = make_app(**{name: float(value) for name, value in settings.items()})
    customer = factories.customer(app, balance=10_000)
    with serve(upstream) as upstream_url:
        env = {"DATABASE_URL": database_uri, "UPSTREAM_URL": f"{upstream_url}/v1", "SECRET_KEY": "pause", **settings}
        # One thread: that it serves another request afterwards shows the paused one let it go.
        with gunicorn("wsgi:app", env, workers=1, threads=1) as (url, _master):
            client = raw_speech_request(url, customer, speech_body())
            wait_for(lambda: factories.speech_requests(app, customer.team_id), what="the charge")
            # Paused past the lease and the threshold, with no progress since: settle leaves the request
            # of a live process alone.
            wait_for(lambda: quiet_since(app, customer) > timedelta(seconds=1.5), what="a quiet stream")
            result = app.test_cli_runner().invoke(args=["speech", "settle", "--older-than", "1"])
            assert result.exit_code == 0 and "settled 0" in result.output
            # Taking nothing for CLIENT_IDLE_SECONDS ends the stream as a hang-up would: the charge stands.
            [row] = wait_for(
                lambda: [r for r in factories.speech_requests(app, customer.team_id) if r.state != "charged"],
                timeout=20,
                what="the paused stream to end",
            )
            assert row.state == "delivered" and row.error == "client took nothing for 3 s"
            assert upstream.stream_closed.wait(5), "the upstream was left synthesising"
            assert requests.get(f"{url}/v1/balance", headers=customer.headers, timeout=10).status_code == 200
            received = read_to_the_end(client)
    assert row.credits_refunded == 0 and row.bytes_sent > 0
    # Every byte the client got was handed over by the relay, and all of it is paid for.
    assert len(received.partition(b"\r\n\r\n")[2]) <= row.bytes_sent + 64 * 1024
    assert factories.balance(app, customer.team_id) == 10_000 - len(PROSE)
    with app.app_context():
        kinds = db.session.scalars(select(LedgerEntry.kind).where(LedgerEntry.team_id == customer.team_id)).all()
    assert sorted(kinds) == ["debit", "grant"]
    assert "settled 0" in app.test_cli_runner().invoke(args=["speech", "settle", "--older-than", "1"]).output
    assert app.test_cli_runner().invoke(args=["audit"]).exit_code == 0
