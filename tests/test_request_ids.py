"""Every /v1 answer carries X-Request-Id (the client's own when well-formed), and log lines carry it too."""

import csv
import io
import json
import re
import sys

import pytest

from app import create_app
from app.config import SettingError
from tests import factories
from tests.conftest import app_config
from tests.fake_upstream import FakeUpstream
from tests.servers import serve

OURS = re.compile(r"req_[0-9a-f]{32}")
SPEECH = {"model": "kokoro", "input": "Hello.", "voice": "af_sky"}


@pytest.fixture
def upstream_app(make_app):
    with serve(FakeUpstream()) as url:
        yield make_app(UPSTREAM_URL=f"{url}/v1")


def test_every_v1_answer_has_a_request_id(app, customer):
    client = app.test_client()
    answers = [
        client.get("/v1/balance", headers=customer.headers),
        client.get("/v1/balance"),
        client.get("/v1/balance", headers={"Authorization": "Bearer kp_live_nope"}),
        client.get("/v1/nothing-here", headers=customer.headers),
        client.post("/v1/audio/speech", headers=customer.headers, data="not json"),
    ]
    assert [answer.status_code for answer in answers] == [200, 401, 401, 404, 400]
    ids = [answer.headers["X-Request-Id"] for answer in answers]
    assert all(OURS.fullmatch(value) for value in ids) and len(set(ids)) == len(ids)


def test_a_speech_requests_id_is_its_id_in_the_usage_list(upstream_app):
    customer = factories.customer(upstream_app, balance=100)
    answer = upstream_app.test_client().post("/v1/audio/speech", headers=customer.headers, json=SPEECH)
    [request] = factories.speech_requests(upstream_app, customer.team_id)
    assert answer.headers["X-Request-Id"] == request.id and request.client_request_id is None


def test_a_clients_own_well_formed_id_is_kept(upstream_app):
    customer = factories.customer(upstream_app, balance=100, password="correct horse battery")
    client = upstream_app.test_client()
    own = {**customer.headers, "X-Request-Id": "trace-42.a:b_c"}
    assert client.get("/v1/balance", headers=own).headers["X-Request-Id"] == "trace-42.a:b_c"
    answer = client.post("/v1/audio/speech", headers=own, json=SPEECH)
    assert answer.status_code == 200 and answer.headers["X-Request-Id"] == "trace-42.a:b_c"
    [request] = factories.speech_requests(upstream_app, customer.team_id)
    assert OURS.fullmatch(request.id) and request.client_request_id == "trace-42.a:b_c"
    # The customer finds it in the usage download.
    web = factories.WebClient(upstream_app.test_client())
    web.login(customer.email)
    [row] = csv.DictReader(io.StringIO(web.get("/usage.csv").get_data(as_text=True)))
    assert row["request_id"] == request.id and row["client_request_id"] == "trace-42.a:b_c"
    # Refused before the charge: the client's id still comes back.
    short = client.post("/v1/audio/speech", headers=own, json={**SPEECH, "input": "x" * 500})
    assert short.status_code == 402 and short.headers["X-Request-Id"] == "trace-42.a:b_c"


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "-leading-dash", "semi;colon", "ünïcode"])
def test_a_malformed_client_id_is_replaced_by_ours(app, customer, bad):
    answer = app.test_client().get("/v1/balance", headers={**customer.headers, "X-Request-Id": bad})
    assert OURS.fullmatch(answer.headers["X-Request-Id"])


def _log_stream(app) -> io.StringIO:
    stream = io.StringIO()
    app.logger.handlers[0].setStream(stream)
    return stream


def test_log_lines_carry_the_request_id(make_app):
    app = make_app()  # the stub upstream: the catalog cannot be read, which is logged
    customer = factories.customer(app, balance=100)
    stream = _log_stream(app)
    headers = {**customer.headers, "X-Request-Id": "find-me-in-the-log"}
    app.test_client().post("/v1/audio/speech", headers=headers, json=SPEECH)
    lines = [line for line in stream.getvalue().splitlines() if "catalog unavailable" in line]
    assert lines and all("[find-me-in-the-log] app:" in line for line in lines)
    # The operator reads why: the speech server's fault, not just that names went unchecked.
    assert all(line.endswith("names go unchecked: The speech server could not be reached.") for line in lines)


def test_json_logs_are_one_object_per_line_with_the_request_id(make_app):
    app = make_app(LOG_FORMAT="json")
    customer = factories.customer(app, balance=100)
    stream = _log_stream(app)
    answer = app.test_client().post("/v1/audio/speech", headers=customer.headers, json=SPEECH)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    warning = next(record for record in records if "catalog unavailable" in record["message"])
    assert warning["request_id"] == answer.headers["X-Request-Id"]
    assert warning["level"] == "WARNING" and warning["logger"] == "app" and "time" in warning


def test_an_unknown_log_format_stops_the_start():
    with pytest.raises(SettingError, match="LOG_FORMAT must be text or json"):
        create_app(app_config("sqlite://", LOG_FORMAT="xml"))


def test_the_log_writes_to_stderr_as_it_is_when_a_line_is_written(make_app, monkeypatch):
    """Not to the stderr of when the app was made: one closed since (a test's capture) must not take the log."""
    made_with = io.StringIO()
    monkeypatch.setattr(sys, "stderr", made_with)
    app = make_app()
    made_with.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    app.logger.warning("written later")
    assert now.getvalue().endswith("WARNING [-] app: written later\n")
    assert "Logging error" not in now.getvalue()
