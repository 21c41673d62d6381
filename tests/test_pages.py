"""The dashboard's public pages, playground, usage chart and filters, guidance (test client).

The browser tests (tests/test_browser.py) drive the same pages in Chromium at desktop and
phone widths, with axe-core.
"""

import csv
import io
from datetime import timedelta

import pytest
import responses
from sqlalchemy import select, update

from app import billing, keys, metering, playground
from app.config import SettingError
from app.extensions import db
from app.models import ApiKey, LedgerEntry, Membership, SpeechRequest, Team, utcnow
from tests import factories
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import FakeUpstream
from tests.servers import serve


@pytest.fixture
def upstream():
    stand_in = FakeUpstream()
    with serve(stand_in) as url:
        stand_in.url = f"{url}/v1"
        yield stand_in


@pytest.fixture
def app(make_app, upstream):
    return make_app(UPSTREAM_URL=upstream.url)


def signed_in(app, web, email="pages@example.com", credits=1000) -> int:
    return factories.signed_up(app, web, email, credits)


# Public pages


def test_visitors_see_what_it_is_samples_and_prices(make_app, upstream):
    app = make_app(UPSTREAM_URL=upstream.url, SIGNUP_CREDITS=500)
    page = app.test_client().get("/").get_data(as_text=True)
    assert "one credit per character" in page.lower() and "500 free credits" in page
    assert 'src="/playground/samples/af_heart.mp3"' in page and "Packs start at $5.00" in page
    pricing = app.test_client().get("/pricing").get_data(as_text=True)
    # 10,000 credits for $5.00 and 250,000 for $80.00: $0.50 and $0.32 per 1,000 characters.
    assert "$5.00" in pricing and "$0.50</strong> per 1,000 characters" in pricing
    assert "$80.00" in pricing and "$0.32</strong> per 1,000 characters" in pricing
    german = app.test_client().get("/pricing", headers={"Accept-Language": "de-DE,de;q=0.9"})
    assert "5,00\xa0$" in german.get_data(as_text=True) and "250.000" in german.get_data(as_text=True)


def test_a_voice_sample_is_synthesised_once_and_only_for_the_listed_voices(app, upstream):
    client = app.test_client()
    first = client.get("/playground/samples/af_heart.mp3")
    assert first.status_code == 200 and first.mimetype == "audio/mpeg" and first.data == b"ID3\x04audio-bytes"
    assert client.get("/playground/samples/af_heart.mp3").data == first.data
    assert len(upstream.received) == 1 and "Heart" in upstream.received[0]["input"]
    # Nothing else can be synthesised through it.
    assert client.get("/playground/samples/am_adam.mp3").status_code == 404
    assert len(upstream.received) == 1


def test_a_sample_when_the_speech_server_is_down_is_503_and_tried_again_later(make_app):
    app = make_app()  # the stub address: nothing listens
    assert app.test_client().get("/playground/samples/af_heart.mp3").status_code == 503


@pytest.fixture
def failing_speech_server():
    """The speech server answers every synthesis with a 500; returns the mock, whose calls count the attempts."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(f"{STUB_UPSTREAM}/audio/speech", status=500, json={"detail": "model not loaded"})
        yield mock


@pytest.fixture
def clock(monkeypatch):
    """The samples' clock, moved by hand: [seconds]."""
    now = [1000.0]
    monkeypatch.setattr(playground, "clock", lambda: now[0])
    return now


def syntheses(mock) -> int:
    return sum(call.request.url.endswith("/audio/speech") for call in mock.calls)


def sample_from(client, address: str, voice="af_heart"):
    return client.get(f"/playground/samples/{voice}.mp3", environ_base={"REMOTE_ADDR": address})


def test_visitors_share_one_failed_sample_synthesis_instead_of_each_asking_the_speech_server(
    make_app, failing_speech_server, clock
):
    client = make_app().test_client()
    answers = [sample_from(client, f"203.0.113.{n}") for n in range(10)]
    answers += [sample_from(client, "198.51.100.7") for _ in range(10)]
    assert [answer.status_code for answer in answers] == [503] * 20
    assert all(int(answer.headers["Retry-After"]) >= 1 for answer in answers)
    asked = syntheses(failing_speech_server)
    assert 1 <= asked <= 2  # one synthesis, which may try the server twice
    # Once the failure is old enough, the next visitor tries again (once).
    clock[0] += playground.SAMPLE_FAILURE_SECONDS
    assert sample_from(client, "203.0.113.1").status_code == 503
    assert sample_from(client, "203.0.113.2").status_code == 503
    assert asked < syntheses(failing_speech_server) <= 2 * asked


def test_samples_beyond_the_per_address_limit_get_429_and_ask_the_speech_server_nothing(
    make_app, failing_speech_server, clock
):
    client = make_app(SAMPLE_LIMIT_PER_IP="5/minute").test_client()

    def again():
        clock[0] += playground.SAMPLE_FAILURE_SECONDS  # each request may try the speech server again
        return sample_from(client, "192.0.2.9")

    assert [again().status_code for _ in range(5)] == [503] * 5
    asked = syntheses(failing_speech_server)
    limited = [again() for _ in range(3)]
    assert [answer.status_code for answer in limited] == [429] * 3
    assert all(1 <= int(answer.headers["Retry-After"]) <= 60 for answer in limited)
    assert syntheses(failing_speech_server) == asked
    # Another address is not held back by this one's limit.
    clock[0] += playground.SAMPLE_FAILURE_SECONDS
    assert sample_from(client, "192.0.2.10").status_code == 503
    assert syntheses(failing_speech_server) > asked


def test_a_sample_limit_that_is_not_a_rate_stops_the_start(make_app):
    with pytest.raises(SettingError, match="SAMPLE_LIMIT_PER_IP"):
        make_app(SAMPLE_LIMIT_PER_IP="lots")


# The playground


def _speak(web, **body):
    web.get("/playground")
    payload = {"input": "Hello there.", "voice": "af_sky", "speed": 1, "response_format": "mp3", **body}
    return web.client.post("/playground/speech", json=payload, headers={"X-CSRFToken": web.token})


def test_the_playground_lists_the_live_voices_by_language_with_gender(app, web):
    signed_in(app, web)
    page = web.get("/playground").get_data(as_text=True)
    assert (
        '<optgroup label="English (United States)">' in page and '<optgroup label="English (United Kingdom)">' in page
    )
    assert '<option value="af_heart" selected>Heart (female)</option>' in page
    assert 'src="/static/playground.js"' in page and "<script>" not in page


def test_the_playground_is_metered_like_the_api(app, web, upstream):
    team_id = signed_in(app, web)
    response = _speak(web, input="Hello there.")
    assert response.status_code == 200 and response.data == b"ID3\x04audio-bytes"
    assert response.headers["X-Credits-Charged"] == "12" and response.headers["X-Credits-Remaining"] == "988"
    [request] = factories.speech_requests(app, team_id)
    assert request.api_key_id is None and request.state == "delivered" and request.credits == 12
    assert factories.ledger(app, team_id)[-1] == ("debit", -12, 988)
    assert upstream.received[-1]["voice"] == "af_sky" and upstream.received[-1]["input"] == "Hello there."
    # Shown as the playground's in the usage pages and the CSV.
    assert "playground" in web.get("/usage").get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(web.get("/usage.csv").get_data(as_text=True))))
    assert rows[0]["key"] == "playground"


def test_a_request_the_speech_server_refused_is_exported_refunded_with_its_duration(app, web):
    team_id = signed_in(app, web)
    with app.app_context():
        team = db.session.get(Team, team_id)
        _, secret = keys.create_key(team, team.memberships[0].user, "export")
        db.session.commit()
    # Listed by the stand-in, refused when asked for: the upstream fails before any audio.
    refused = app.test_client().post(
        "/v1/audio/speech",
        headers={"Authorization": f"Bearer {secret}"},
        json={"input": "Hello.", "voice": "af_nicole"},
    )
    assert refused.status_code == 400
    [row] = csv.DictReader(io.StringIO(web.get("/usage.csv").get_data(as_text=True)))
    assert (row["state"], row["credits"], row["credits_refunded"], row["bytes"]) == ("refunded", "6", "6", "0")
    assert row["duration_ms"].isdigit() and "af_nicole' not found" in row["error"]


def test_playground_errors_are_the_apis_and_change_nothing(app, web):
    team_id = signed_in(app, web, credits=5)
    short = _speak(web, input="Far more than five characters.")
    assert short.status_code == 402 and short.json["detail"].startswith("Insufficient credits")
    unknown = _speak(web, voice="xx_nobody")
    assert unknown.status_code == 400 and "voice" in unknown.json["detail"]
    pcm = _speak(web, response_format="pcm")
    assert pcm.status_code == 400 and pcm.json["error"]["param"] == "response_format"
    assert factories.ledger(app, team_id) == [("grant", 5, 5)] and factories.speech_requests(app, team_id) == []


def test_the_playground_needs_the_csrf_token_a_signed_in_and_verified_account(app, web, upstream):
    # Signed out: refused (its CSRF check comes first), nothing reaches the speech server.
    assert app.test_client().post("/playground/speech", json={"input": "hi"}).status_code == 400
    signed_in(app, web)
    web.get("/playground")
    forged = web.client.post("/playground/speech", json={"input": "Hello.", "voice": "af_sky"})
    assert forged.status_code == 400 and upstream.received == []
    unverified = factories.WebClient(app.test_client())
    unverified.register("unverified@example.com")
    unverified.login("unverified@example.com")
    assert _speak(unverified).status_code == 403 and upstream.received == []


# Usage you can see


def _usage(app, team_id, key_id, days_ago, credits, refunded=0):
    with app.app_context():
        made_by = db.session.scalar(select(Membership.user_id).where(Membership.team_id == team_id))
        paid = metering.charge_speech(
            team_id,
            made_by,
            key_id,
            unlimited=False,
            characters=credits,
            model="kokoro",
            voice="af_sky",
            response_format="mp3",
        )
        request = db.session.get(SpeechRequest, paid.request_id)
        request.created_at = utcnow() - timedelta(days=days_ago)
        request.state = "delivered"
        request.credits_refunded = refunded
        db.session.commit()
        return request.id


def test_usage_shows_credits_per_day_filtered_by_key_with_this_months_totals(app, web):
    team_id = signed_in(app, web, credits=10_000)
    web.get("/keys")
    web.post("/keys", {"name": "laptop"})
    web.post("/keys", {"name": "server"})
    with app.app_context():
        laptop, server = db.session.scalars(select(ApiKey.id).where(ApiKey.team_id == team_id).order_by(ApiKey.id))
    _usage(app, team_id, laptop, 0, 300)
    _usage(app, team_id, laptop, 0, 200, refunded=50)
    _usage(app, team_id, server, 2, 700)
    _usage(app, team_id, None, 40, 999)  # outside the chart

    page = web.get("/usage").get_data(as_text=True)
    today = utcnow().date()
    assert f'data-day="{today}" data-credits="450"' in page
    assert f'data-day="{today - timedelta(days=2)}" data-credits="700"' in page
    assert page.count("<rect ") == 30 and "1,150 credits in the last 30 days" in page
    only_server = web.get(f"/usage?key={server}").get_data(as_text=True)
    assert f'data-day="{today}" data-credits="0"' in only_server and "700 credits in the last 30 days" in only_server
    playground = web.get("/usage?key=playground").get_data(as_text=True)
    assert "0 credits in the last 30 days" in playground
    if today.day > 2:  # the month's totals count what this month holds
        assert '<dd id="month-credits">1,150</dd>' in page


def test_usage_and_ledger_take_a_date_range_and_their_csvs_follow_it(app, web):
    team_id = signed_in(app, web, credits=10_000)
    old = _usage(app, team_id, None, 10, 100)
    new = _usage(app, team_id, None, 0, 200)
    with app.app_context():
        db.session.execute(
            update(LedgerEntry)
            .where(LedgerEntry.reference == f"speech:{old}")
            .values(created_at=utcnow() - timedelta(days=10))
        )
        db.session.commit()
    since = (utcnow() - timedelta(days=1)).date()
    page = web.get(f"/usage?from={since}").get_data(as_text=True)
    assert page.count('data-label="Voice"') == 1 and "?from=" in page  # the CSV link keeps the range
    rows = list(csv.DictReader(io.StringIO(web.get(f"/usage.csv?from={since}").get_data(as_text=True))))
    assert [row["request_id"] for row in rows] == [new]
    until = (utcnow() - timedelta(days=5)).date()
    ledger = list(csv.DictReader(io.StringIO(web.get(f"/ledger.csv?to={until}").get_data(as_text=True))))
    assert [(row["kind"], row["credits"]) for row in ledger] == [("debit", "-100")]
    everything = list(csv.DictReader(io.StringIO(web.get("/ledger.csv").get_data(as_text=True))))
    assert len(everything) == 3 and set(everything[0]) == {
        "time",
        "kind",
        "credits",
        "balance_after",
        "member",
        "key",
        "reference",
        "note",
    }
    # A malformed date is ignored, not an error.
    assert web.get("/ledger?from=yesterday").status_code == 200


def test_a_ledger_line_links_to_its_request_or_payment(app, web):
    team_id = signed_in(app, web, credits=1000)
    request_id = _usage(app, team_id, None, 0, 10)
    page = web.get("/ledger").get_data(as_text=True)
    assert f'<a href="/usage?request={request_id}">request →</a>' in page
    only = web.get(f"/usage?request={request_id}").get_data(as_text=True)
    assert only.count('data-label="Voice"') == 1


# Guidance


def test_a_low_or_empty_balance_says_how_to_top_up(app, web):
    team_id = signed_in(app, web, credits=0)
    page = web.get("/keys").get_data(as_text=True)
    assert "Your balance is empty" in page and 'id="balance-banner"' in page
    with app.app_context():
        billing.grant(db.session.get(Team, team_id), 400, "some")
        db.session.commit()
    assert "Your balance is low: <span data-balance>400</span> credits left." in web.get("/keys").get_data(as_text=True)
    with app.app_context():
        billing.grant(db.session.get(Team, team_id), 5000, "more")
        db.session.commit()
    assert 'id="balance-banner"' not in web.get("/keys").get_data(as_text=True)


def test_the_overview_says_the_next_step(make_app):
    app = make_app(STRIPE_SECRET_KEY=None)
    web = factories.WebClient(app.test_client())
    signed_in(app, web, credits=0)
    page = web.get("/").get_data(as_text=True)
    assert "<h1" in page and "Next: create an API key" in page and "ask its operator for credits" in page
    web.post("/keys", {"name": "first"})
    assert "Next: create an API key" not in web.get("/").get_data(as_text=True)


def test_the_nav_marks_the_current_page(app, web):
    signed_in(app, web)
    page = web.get("/usage").get_data(as_text=True)
    assert '<a href="/usage" aria-current="page">Usage</a>' in page
    assert '<a href="/keys">API keys</a>' in page and 'href="#main"' in page


def test_speech_requests_without_a_key_are_books_like_any_other(app, web):
    team_id = signed_in(app, web)
    _speak(web)
    with app.app_context():
        from app.audit import audit

        assert not audit().problems
        assert db.session.scalar(select(SpeechRequest.api_key_id).where(SpeechRequest.team_id == team_id)) is None
