"""/healthz and /readyz: what a load balancer or process manager asks before sending traffic."""

import responses
from sqlalchemy.exc import OperationalError

from app.extensions import db
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import FakeUpstream, stub_catalog
from tests.servers import serve


def test_healthz_answers_from_the_process_alone(app, monkeypatch):
    def no_database(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("database is down"))

    monkeypatch.setattr(db.session, "execute", no_database)
    response = app.test_client().get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_says_ready_when_the_database_and_a_speech_server_answer(make_app):
    with serve(FakeUpstream()) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        response = app.test_client().get("/readyz")
    body = response.get_json()
    assert response.status_code == 200 and body["status"] == "ready"
    assert body["database"]["ok"] is True and body["upstream"] == {
        "ok": True,
        "servers": [{"streams": 0, "taken_out": False}],
    }
    assert response.headers["Cache-Control"] == "no-store"


def test_readyz_is_503_naming_what_cannot_serve(app, monkeypatch):
    client = app.test_client()
    # No speech server listens at the test's upstream address.
    response = client.get("/readyz")
    body = response.get_json()
    assert response.status_code == 503 and body["status"] == "not ready"
    assert body["database"]["ok"] is True and body["upstream"]["ok"] is False
    assert "127.0.0.1" not in response.get_data(as_text=True)

    def no_database(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("database is down"))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        app.extensions["upstream"]._catalog.clear()
        monkeypatch.setattr(db.session, "execute", no_database)
        # The servers' places and health are kept in the database too (app/places.py).
        monkeypatch.setattr(app.extensions["upstream"].upstreams, "_engine", no_database)
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["database"] == {"ok": False} and response.get_json()["upstream"]["ok"] is True
    assert response.get_json()["upstream"]["servers"] == [{"streams": None, "taken_out": None}]
