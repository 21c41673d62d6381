"""A request is never left charged: a killed worker, a lost database, settle racing itself and live traffic."""

import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
import responses
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from app import billing, metering
from app.extensions import db
from app.models import GatewayProcess, LedgerEntry, LedgerKind, SpeechRequest, utcnow
from tests import factories
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import FakeUpstream, stub_catalog
from tests.servers import gunicorn, serve, wait_for

HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}
STREAMING_TEXT = len(HELLO["input"])


def age(app, request_ids, seconds):
    with app.app_context():
        db.session.execute(
            update(SpeechRequest)
            .where(SpeechRequest.id.in_(request_ids))
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )
        db.session.commit()


def states(app, customer):
    return [row.state for row in factories.speech_requests(app, customer.team_id)]


def test_a_killed_worker_leaves_the_charge_visible_and_settle_refunds_it_once_its_lease_runs_out(
    make_app, database_uri
):
    app = make_app(PROCESS_LEASE_SECONDS=1.0, STALE_CHARGE_SECONDS=600)
    runner = app.test_cli_runner()
    customer = factories.customer(app, balance=1000)
    gate = threading.Event()
    upstream = FakeUpstream([b"ID3first", b"never sent"], gate=gate)
    with serve(upstream) as upstream_url:
        env = {
            "DATABASE_URL": database_uri,
            "UPSTREAM_URL": f"{upstream_url}/v1",
            "SECRET_KEY": "crash-test",
            "PROCESS_LEASE_SECONDS": "1",
        }
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
    assert factories.balance(app, customer.team_id) == 1000 - STREAMING_TEXT

    # Young charges are left alone: their worker may still be streaming.
    result = runner.invoke(args=["speech", "settle"])
    assert "settled 0" in result.output and states(app, customer) == ["charged"]

    # Once the dead worker's lease has run out, a threshold as short as the lease settles it.
    wait_for(lambda: "settled 1" in runner.invoke(args=["speech", "settle", "--older-than", "1"]).output)
    result = runner.invoke(args=["speech", "settle", "--older-than", "1"])
    # It died before its first progress record: none of its audio is on the books as delivered.
    assert result.exit_code == 0 and result.output.startswith("0 requests")
    [speech] = factories.speech_requests(app, customer.team_id)
    assert speech.state == "refunded" and speech.error == metering.STALE_REASON
    assert speech.credits_refunded == STREAMING_TEXT
    assert factories.balance(app, customer.team_id) == 1000
    assert runner.invoke(args=["audit"]).exit_code == 0


def speak(app, customer):
    """A speech request answered by a stubbed upstream with eight bytes of audio."""
    with responses.RequestsMock() as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", body=b"ID3audio", content_type="audio/mpeg")
        return app.test_client().post("/v1/audio/speech", json=HELLO, headers=customer.headers)


def database_gone(*args, **kwargs):
    raise OperationalError("UPDATE speech_requests", {}, Exception("server closed the connection"))


def assert_logged_database_error(caplog, message: str) -> None:
    """`message` was logged once, as an error carrying the database's exception."""
    [record] = [record for record in caplog.records if record.getMessage().startswith(message.rsplit(" ", 1)[0])]
    assert record.getMessage() == message
    assert record.levelname == "ERROR" and record.exc_info[0] is OperationalError


def test_a_lost_database_at_settlement_leaves_the_request_charged_and_the_log_names_it(
    app, runner, customer, monkeypatch, caplog
):
    monkeypatch.setattr(metering, "mark_delivered", database_gone)
    response = speak(app, customer)
    assert response.status_code == 200 and response.data == b"ID3audio"
    assert states(app, customer) == ["charged"]
    # The operator's log names the request left charged, with the database's error; its process
    # writes the settlement when the database is back (tests/test_liveness.py), or settle does,
    # should the process die first.
    [row] = factories.speech_requests(app, customer.team_id)
    assert_logged_database_error(caplog, f"could not settle speech request {row.id}")
    monkeypatch.undo()
    age(app, [row.id], 3600)
    assert "settled 0" in runner.invoke(args=["speech", "settle", "--older-than", "60"]).output
    with app.app_context():
        db.session.execute(update(GatewayProcess).values(lease_until=utcnow() - timedelta(minutes=1)))
        db.session.commit()
    assert "settled 1" in runner.invoke(args=["speech", "settle", "--older-than", "60"]).output
    assert factories.balance(app, customer.team_id) == 1000


def test_a_refund_the_database_refuses_halfway_leaves_the_request_charged_and_its_process_refunds_it_whole(
    app, runner, customer, monkeypatch, caplog
):
    # The database goes away between the refund's first writes (the request marked refunded) and its credit.
    apply = billing.apply

    def credit_lost(team_id, amount, **kwargs):
        if kwargs["kind"] == LedgerKind.REFUND:
            database_gone()
        return apply(team_id, amount, **kwargs)

    monkeypatch.setattr(billing, "apply", credit_lost)
    with responses.RequestsMock() as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", status=500, json={"detail": "model crashed"})
        response = app.test_client().post("/v1/audio/speech", json=HELLO, headers=customer.headers)
    assert response.status_code == 502
    # Nothing of the refund was written: not the request's state, not half of it.
    [row] = factories.speech_requests(app, customer.team_id)
    assert (row.state, row.credits_refunded) == ("charged", 0)
    assert factories.balance(app, customer.team_id) == 1000 - STREAMING_TEXT
    assert_logged_database_error(caplog, f"could not settle speech request {row.id}")
    monkeypatch.undo()
    assert app.extensions["lease"].settle_pending() == 0
    [row] = factories.speech_requests(app, customer.team_id)
    assert (row.state, row.credits_refunded) == ("refunded", STREAMING_TEXT)
    assert factories.balance(app, customer.team_id) == 1000
    assert runner.invoke(args=["audit"]).exit_code == 0


def test_a_stream_whose_progress_cannot_be_written_goes_on_and_the_log_names_it(make_app, monkeypatch, caplog):
    app = make_app(STREAM_HEARTBEAT_SECONDS=0)
    customer = factories.customer(app, balance=1000)
    monkeypatch.setattr(metering, "record_progress", database_gone)
    response = speak(app, customer)
    # Progress is a safeguard for settle, not a reason to cut off audio that was paid for.
    assert response.status_code == 200 and response.data == b"ID3audio"
    [row] = factories.speech_requests(app, customer.team_id)
    assert row.state == "delivered" and row.bytes_sent == len(b"ID3audio")
    assert_logged_database_error(caplog, f"could not record progress of speech request {row.id}")


def test_settle_racing_itself_and_live_traffic_refunds_each_request_once(app, customer):
    stale = factories.charged(app, customer.team_id, count=20)
    age(app, stale, 7200)
    live = factories.charged(app, customer.team_id, count=5)
    barrier = threading.Barrier(4, timeout=30)

    def settle(_):
        with app.app_context():
            barrier.wait()
            refunded = 0
            for request_id in metering.stale_charges(3600):
                refunded += metering.refund_speech(request_id, metering.STALE_REASON) is not None
                db.session.commit()
            db.session.remove()
            return refunded

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(settle, range(4))) == 20
    with app.app_context():
        refunds = db.session.scalars(select(LedgerEntry.reference).where(LedgerEntry.kind == "refund")).all()
        assert sorted(refunds) == sorted(f"refund:{request_id}" for request_id in stale)
        assert all(db.session.get(SpeechRequest, request_id).state == "charged" for request_id in live)
    assert factories.balance(app, customer.team_id) == 1000 - 5 * 10
    factories.assert_books_balance(app, customer.team_id)
