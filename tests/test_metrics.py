"""Prometheus metrics: off the public path, and summed over gunicorn's workers."""

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.servers import gunicorn, private_redis, serve
from tests.stripe_helpers import WEBHOOK_SECRET, checkout_session, event, sign

TOKEN = "metrics-token-for-tests"


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus' text format, whatever the order of its labels (0 when absent)."""
    for line in text.splitlines():
        found = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if found and found.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or "")) == labels:
            return float(found.group(3))
    return 0.0


def scrape(client) -> str:
    """What /metrics says now, asked with the token."""
    return client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).get_data(as_text=True)


def test_metrics_answer_only_with_the_token(make_app):
    closed = make_app()  # no METRICS_TOKEN
    assert closed.test_client().get("/metrics", headers={"Authorization": "Bearer "}).status_code == 404
    app = make_app(METRICS_TOKEN=TOKEN)
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 404
    client.get("/healthz")
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    assert sample(answer.get_data(as_text=True), "kokoro_http_requests_total", route="/healthz", status="200") >= 1


@pytest.mark.usefixtures("postgres_only")
def test_two_workers_add_up(app, database_uri, tmp_path):
    customer = factories.customer(app, balance=10_000)
    with app.app_context():
        from app.extensions import db

        factories.starter_payment(customer.team_id, "cs_test_metrics")
        db.session.commit()
    metrics_dir = tmp_path / "metrics"
    with serve(FakeUpstream([b"ID3", b"audio"])) as upstream_url, private_redis() as (limits, _):
        env = {
            "DATABASE_URL": database_uri,
            "UPSTREAM_URL": f"{upstream_url}/v1",
            "SECRET_KEY": "metrics-test",
            "RATELIMIT_STORAGE_URI": limits,
            "METRICS_TOKEN": TOKEN,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
        with gunicorn("wsgi:app", env, workers=2, threads=4) as (url, _):
            barrier = threading.Barrier(8, timeout=30)

            def speak(index):
                if index < 8:
                    barrier.wait()
                with requests.Session() as session:  # a new connection each: the workers share them out
                    answer = session.post(
                        f"{url}/v1/audio/speech",
                        json={"input": "0123456789", "voice": "af_sky"},
                        headers={**customer.headers, "Connection": "close"},
                        timeout=30,
                    )
                return answer.status_code

            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(speak, range(24))) == {200}
            refused = requests.get(f"{url}/v1/balance", headers={"Authorization": "Bearer kp_live_nope"}, timeout=10)
            assert refused.status_code == 401
            payload = event("checkout.session.completed", checkout_session(customer.team_id, "cs_test_metrics"))
            webhook = requests.post(
                f"{url}/stripe/webhook",
                data=payload,
                headers={"Stripe-Signature": sign(payload), "Content-Type": "application/json"},
                timeout=10,
            )
            assert webhook.status_code == 200
            scrapes = [
                requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}", "Connection": "close"})
                for _ in range(4)
            ]
    # Both workers wrote samples, and every scrape, whichever worker answered it, counts all of them.
    assert len({path.name.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}) == 2
    for scrape in scrapes:
        text = scrape.text
        assert sample(text, "kokoro_http_requests_total", route="/v1/audio/speech", status="200") == 24
        assert sample(text, "kokoro_http_requests_total", route="/v1/balance", status="401") == 1
        assert sample(text, "kokoro_speech_first_byte_seconds_count") == 24
        assert sample(text, "kokoro_speech_gateway_seconds_count") == 24
        assert sample(text, "kokoro_credits_charged_total") == 240
        assert sample(text, "kokoro_streams_in_flight") == 0
        assert sample(text, "kokoro_webhook_events_total", type="checkout.session.completed", outcome="credited") == 1


def test_upstream_failures_and_refunds_are_counted(make_app):
    from tests.fake_upstream import Failing

    app_metrics = {}
    with serve(Failing()) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", METRICS_TOKEN=TOKEN)
        customer = factories.customer(app, balance=100)
        client = app.test_client()
        before = scrape(client)
        answer = client.post("/v1/audio/speech", headers=customer.headers, json={"input": "Hello.", "voice": "af_sky"})
        assert answer.status_code == 502
        after = scrape(client)
    for name, labels, grown in (
        ("kokoro_upstream_failures_total", {"kind": "status"}, 1),
        ("kokoro_credits_refunded_total", {}, 6),
        ("kokoro_credits_charged_total", {}, 6),
    ):
        app_metrics[name] = sample(after, name, **labels) - sample(before, name, **labels)
        assert app_metrics[name] == grown, name


@pytest.mark.parametrize("kind", ["broke_off", "stalled"])
def test_a_stream_that_breaks_off_or_stalls_is_counted_under_its_kind(make_app, kind):
    from app.speech import StreamAborted

    gate = threading.Event()
    if kind == "stalled":
        upstream = FakeUpstream([b"ID3first", b"after the stall"], gate=gate)
    else:
        upstream = FakeUpstream([b"ID3first", b"never sent"], break_after=1)
    kinds = ("broke_off", "stalled")
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", METRICS_TOKEN=TOKEN, UPSTREAM_READ_TIMEOUT=0.3)
        customer = factories.customer(app, balance=100)
        client = app.test_client()

        def failures():
            text = scrape(client)
            return {name: sample(text, "kokoro_upstream_failures_total", kind=name) for name in kinds}

        before = failures()
        response = client.post(
            "/v1/audio/speech", headers=customer.headers, json={"input": "Hello.", "voice": "af_sky"}, buffered=False
        )
        try:
            with pytest.raises(StreamAborted):
                response.get_data()
        finally:
            gate.set()
        after = failures()
    assert {name: after[name] - before[name] for name in kinds} == {name: float(name == kind) for name in kinds}
