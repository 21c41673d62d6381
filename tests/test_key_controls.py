"""Keys a customer controls: spending limits, expiry, allowed addresses, voices and models, rolling.

The key-management API that sets them over HTTP is tests/test_key_api.py's.
"""

import os
import re
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from flask_migrate import downgrade, upgrade
from sqlalchemy import func, select, text, update

from app import audit, keys, metering, models, speech, teams
from app.extensions import db
from app.models import ApiKey, KeyKind, LedgerEntry, SpeechRequest, Team, TeamRole, User
from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.locks import second_waits_for_first
from tests.servers import race_speech

SPEECH = "/v1/audio/speech"
# Ten characters: ten credits.
TEN = "0123456789"
NOON = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def clock(monkeypatch):
    """The time every key rule reads, set by the test: `clock.now = …`, `clock.advance(seconds)`."""

    class Clock:
        now = NOON

        def advance(self, seconds: float) -> None:
            self.now += timedelta(seconds=seconds)

    clock = Clock()
    for module in (keys, metering, speech, models):
        monkeypatch.setattr(module, "utcnow", lambda: clock.now)
    return clock


@pytest.fixture
def upstream(speaking_upstream):
    return speaking_upstream


def speech_calls(upstream) -> int:
    return sum(call.request.url.endswith("/audio/speech") for call in upstream.calls)


def speak(client, customer, text=TEN, voice="af_sky", model="kokoro", **kwargs):
    body = {"input": text, "voice": voice, "model": model}
    return client.post(SPEECH, json=body, headers=customer.headers, **kwargs)


def control(app, key_id: int, **controls) -> None:
    """Give the key these controls, as the dashboard and the key API do."""
    with app.app_context():
        key = db.session.get(ApiKey, key_id)
        keys.set_controls(key, keys.read_controls(**controls))
        db.session.commit()


def key_row(app, key_id: int) -> ApiKey:
    with app.app_context():
        key = db.session.get(ApiKey, key_id)
        db.session.expunge(key)
        return key


def books(app, team_id: int) -> tuple:
    """What a refused request must leave as it was: the balance, the ledger and the requests."""
    with app.app_context():
        return (
            factories.balance(app, team_id),
            db.session.scalar(select(func.count()).where(LedgerEntry.team_id == team_id)),
            db.session.scalar(select(func.count()).where(SpeechRequest.team_id == team_id)),
        )


def charge(customer, credits: int) -> SpeechRequest:
    """A speech request of `credits` charged through the customer's key, in the caller's app context."""
    return factories.charge_speech(customer.team_id, credits, customer.user_id, customer.key_id)


def delivered_and_refunded(customer, delivered: int, refunded: int) -> None:
    """Two requests through the customer's key, committed: one of `delivered` credits delivered, one of
    `refunded` refunded in full before any audio."""
    metering.mark_delivered(charge(customer, delivered).id)
    metering.refund_speech(charge(customer, refunded).id, "upstream down", audio_ms=0)
    db.session.commit()


def error_of(response) -> tuple:
    body = response.get_json()
    assert body["detail"] == body["error"]["message"]
    return response.status_code, body["error"]["code"], body["detail"]


# Spending limits


def test_a_limit_serves_what_it_covers_and_refuses_the_rest_with_its_own_error(app, client, upstream, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=25, spend_period="day")
    assert speak(client, customer).status_code == 200
    assert speak(client, customer).status_code == 200
    before = books(app, customer.team_id)
    refused = speak(client, customer)
    status, code, detail = error_of(refused)
    assert (status, code) == (402, "key_limit_reached")
    assert detail == (
        "This key's spending limit is reached: it may spend 25 credits until 2026-12-04T00:00:00Z, has spent 20 "
        "and this request costs 10. The limit resets at 2026-12-04T00:00:00Z."
    )
    assert refused.headers["X-Key-Limit-Reset"] == "2026-12-04T00:00:00Z"
    assert refused.headers["Retry-After"] == str(12 * 3600)
    # Spelled as the API reference spells them: HTTP reads any case, a client's log shows what was sent.
    assert {"X-Key-Limit-Reset", "Retry-After"} <= {name for name, _ in refused.headers.items()}
    # Nothing written for it, nothing started upstream, and five credits of the limit are still there.
    assert books(app, customer.team_id) == before == (980, 3, 2)
    assert speech_calls(upstream) == 2
    assert speak(client, customer, text="01234").status_code == 200
    assert key_row(app, customer.key_id).spent == 25
    # Half a second before the limit resets, a client is told to wait a whole second: never 0.
    clock.now = datetime(2026, 12, 3, 23, 59, 59, 500_000, tzinfo=timezone.utc)
    assert speak(client, customer).headers["Retry-After"] == "1"


@pytest.fixture
def server_in_new_york(monkeypatch):
    """The server's own time zone is New York's: every key rule still reads and states UTC."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_stated_in_utc_whatever_the_servers_own_zone(server_in_new_york):
    assert keys.moment(datetime(2026, 12, 3, 12, 0, 30, tzinfo=timezone.utc)) == "2026-12-03T12:00:30Z"
    # A limit's day is UTC's: at 02:00 UTC (21:00 the day before in New York) it is already the 3rd.
    early = datetime(2026, 12, 3, 2, 0, tzinfo=timezone.utc)
    assert keys.window_bounds("day", early) == (
        datetime(2026, 12, 3, tzinfo=timezone.utc),
        datetime(2026, 12, 4, tzinfo=timezone.utc),
    )
    # An expiry without a zone is UTC's, and kept in UTC.
    expiry = keys.read_controls(expires_at="2026-12-24T18:00", now=NOON).expires_at
    assert expiry == datetime(2026, 12, 24, 18, tzinfo=timezone.utc) and expiry.utcoffset() == timedelta(0)
    expiry = keys.read_controls(expires_at="2027-01-31T18:00:00+02:00", now=NOON).expires_at
    assert expiry.utcoffset() == timedelta(0) and expiry.hour == 16


def test_a_month_window_runs_to_the_first_of_the_next_month():
    assert keys.window_bounds("month", datetime(2026, 6, 15, 9, tzinfo=timezone.utc)) == (
        datetime(2026, 6, 1, tzinfo=timezone.utc),
        datetime(2026, 7, 1, tzinfo=timezone.utc),
    )


LONGEST = "host-" + "x" * 70


@pytest.mark.parametrize(
    ("sent", "field", "message"),
    [
        (
            {"spend_limit": True, "spend_period": "day"},
            "spend_limit",
            "The spending limit must be a whole number of credits.",
        ),
        (
            {"spend_limit": "lots", "spend_period": "day"},
            "spend_limit",
            "The spending limit must be a whole number of credits.",
        ),
        (
            {"spend_limit": -1, "spend_period": "day"},
            "spend_limit",
            "The spending limit must be between 0 and 1,000,000,000,000 credits.",
        ),
        (
            {"spend_limit": 10**12 + 1, "spend_period": "day"},
            "spend_limit",
            "The spending limit must be between 0 and 1,000,000,000,000 credits.",
        ),
        ({"spend_limit": 5}, "spend_period", "A spending limit needs a period: lifetime, day, week or month."),
        ({"spend_period": "day"}, "spend_limit", "A period needs a spending limit in credits."),
        (
            {"allowed_models": "kokoro(2)"},
            "allowed_models",
            "'kokoro(2)' is not a model name (one model, no blend or weight).",
        ),
        (
            {"expires_at": "next tuesday"},
            "expires_at",
            "The expiry must be a date and time such as 2027-01-31T18:00:00Z.",
        ),
        ({"expires_at": 12}, "expires_at", "The expiry must be a date and time such as 2027-01-31T18:00:00Z."),
        (
            {"expires_at": "9999-12-31T23:30:00-01:00"},
            "expires_at",
            "The expiry must be a date before the year 9999 ends.",
        ),
        ({"expires_at": "2026-12-03T12:00:00Z"}, "expires_at", "The expiry must be in the future."),  # exactly now
        (
            {"spend_limit": 5, "spend_period": "year"},
            "spend_period",
            "The period must be one of lifetime, day, week or month.",
        ),
        (
            {"allowed_ips": [1, 2]},
            "allowed_ips",
            "Give a list of names, or one string of names separated by commas or spaces.",
        ),
        ({"allowed_ips": " ".join(f"10.0.0.{n}" for n in range(51))}, "allowed_ips", "At most 50 entries."),
        (
            {"allowed_voices": LONGEST},
            "allowed_voices",
            f"'{LONGEST[:60]}' is not a voice name (one voice, no blend or weight).",
        ),
    ],
)
def test_a_control_that_cannot_be_set_is_named_with_why(sent, field, message):
    with pytest.raises(keys.BadControl) as refused:
        keys.read_controls(**sent, now=NOON)
    assert (refused.value.field, str(refused.value)) == (field, message)


def test_controls_are_read_as_people_write_them():
    assert keys.read_controls(expires_at="", now=NOON).expires_at is None
    # A limit from a form's text, from 0 (nothing may be spent) to the largest.
    assert keys.read_controls(spend_limit="", spend_period="").spend_limit is None
    for limit in (0, "0", 10**12):
        assert keys.read_controls(spend_limit=limit, spend_period="day").spend_limit == int(limit)
    assert keys.read_controls(expires_at="2027-01-31T18:00:00Z", now=NOON).expires_at == datetime(
        2027, 1, 31, 18, tzinfo=timezone.utc
    )
    # A day alone, with or without UTC's Z, is its first instant.
    for day in ("2027-01-31", "2027-01-31Z"):
        assert keys.read_controls(expires_at=day, now=NOON).expires_at == datetime(2027, 1, 31, tzinfo=timezone.utc)
    # A list's entries may themselves hold several, separated by commas.
    assert keys.read_controls(allowed_ips=["10.0.0.0/8, 203.0.113.7"]).allowed_ips == "10.0.0.0/8 203.0.113.7/32"
    fifty = [f"10.0.0.{n}" for n in range(50)]
    assert keys.read_controls(allowed_ips=fifty).allowed_ips == " ".join(f"{ip}/32" for ip in fifty)


def test_changing_one_control_keeps_the_others(app):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, allowed_models="kokoro", allowed_voices="af_sky", allowed_ips="10.0.0.0/8")
    with app.app_context():
        key = db.session.get(ApiKey, customer.key_id)
        changed = keys.changed_controls(key, {"spend_limit": 100, "spend_period": "day"})
    assert (changed.allowed_models, changed.allowed_voices, changed.allowed_ips) == ("kokoro", "af_sky", "10.0.0.0/8")
    assert (changed.spend_limit, changed.spend_period) == (100, "day")


def test_a_lifetime_limit_says_it_never_resets(app, client, upstream, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=5, spend_period="lifetime")
    refused = speak(client, customer)
    assert error_of(refused) == (
        402,
        "key_limit_reached",
        "This key's spending limit is reached: it may spend 5 credits in all, has spent 0 and this request costs 10. "
        "Raise the key's limit to go on.",
    )
    assert "X-Key-Limit-Reset" not in refused.headers
    clock.advance(400 * 86400)
    assert speak(client, customer).status_code == 402


def test_a_limit_counts_only_its_own_key(app, client, upstream, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=10, spend_period="day")
    other = factories.add_key(app, customer.user_id)
    assert speak(client, customer).status_code == 200
    assert speak(client, customer).status_code == 402
    assert (
        client.post(
            SPEECH, json={"input": TEN, "voice": "af_sky"}, headers={"Authorization": f"Bearer {other}"}
        ).status_code
        == 200
    )


def test_a_refund_gives_the_key_its_use_back(app, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=100, spend_period="day")
    with app.app_context():
        failed = charge(customer, 40)
        broke = charge(customer, 40)
        db.session.commit()
        assert db.session.get(ApiKey, customer.key_id).spent == 80
        # Nothing delivered: all of it back; broken off after some audio: the undelivered part back.
        metering.refund_speech(failed.id, "upstream down", audio_ms=0)
        given_back = metering.refund_speech(broke.id, "broke off", audio_ms=1000)
        db.session.commit()
        assert 0 < given_back < 40
        assert db.session.get(ApiKey, customer.key_id).spent == 40 - given_back
        with pytest.raises(keys.KeyLimitReached):
            charge(customer, 100 - (40 - given_back) + 1)
        db.session.rollback()
        charge(customer, 100 - (40 - given_back))
        db.session.commit()
        assert db.session.get(ApiKey, customer.key_id).spent == 100


def test_a_refund_after_the_period_ended_does_not_give_to_the_next_one(app, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=50, spend_period="day")
    with app.app_context():
        yesterday = charge(customer, 30)
        db.session.commit()
        clock.advance(86400)
        charge(customer, 20)
        db.session.commit()
        metering.refund_speech(yesterday.id, "settled late", audio_ms=0)
        db.session.commit()
        key = db.session.get(ApiKey, customer.key_id)
        assert (key.spent, key.spent_window) == (20, "day:2026-12-04")
    assert factories.balance(app, customer.team_id) == 980


def test_a_limit_set_later_counts_its_periods_requests_less_their_refunds_from_its_first_instant(app, clock):
    """Spent is counted again from the key's requests: each costs its credits less what was refunded; a request
    made exactly when the period began counts, and one dated the next period (a clock behind) does not."""
    customer = factories.customer(app, balance=1000)
    day = datetime(2026, 12, 3, tzinfo=timezone.utc)
    with app.app_context():
        clock.now = day - timedelta(microseconds=1)
        charge(customer, 7)  # the day before
        clock.now = day
        charge(customer, 30)
        refunded = charge(customer, 20)
        clock.now = day + timedelta(days=1)
        charge(customer, 9)  # the next day
        db.session.commit()
        metering.refund_speech(refunded.id, "broke off", audio_ms=0)
        db.session.commit()
        clock.now = NOON
    control(app, customer.key_id, spend_limit=100, spend_period="day")
    assert key_row(app, customer.key_id).spent == 30


BOUNDARIES = {
    "day": datetime(2026, 12, 4, tzinfo=timezone.utc),
    # ISO weeks start on Monday: 7 December 2026 is one.
    "week": datetime(2026, 12, 7, tzinfo=timezone.utc),
    # Across a year's end too.
    "month": datetime(2027, 1, 1, tzinfo=timezone.utc),
}


@pytest.mark.parametrize("period", BOUNDARIES)
def test_each_period_starts_again_exactly_at_its_boundary(app, clock, period):
    boundary = BOUNDARIES[period]
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=30, spend_period=period)
    clock.now = boundary - timedelta(microseconds=1)
    with app.app_context():
        charge(customer, 30)
        db.session.commit()
        key = db.session.get(ApiKey, customer.key_id)
        assert keys.limit_resets_at(key, clock.now) == boundary
        with pytest.raises(keys.KeyLimitReached) as reached:
            charge(customer, 1)
        # What the 402 says: the limit, what was spent, what this request costs, when the limit starts again.
        assert (reached.value.limit, reached.value.spent, reached.value.cost) == (30, 30, 1)
        assert reached.value.resets_at == boundary
        db.session.rollback()
        clock.now = boundary
        charge(customer, 30)
        db.session.commit()
        db.session.refresh(key)
        assert key.spent == 30 and key.spent_window == keys.window(period, boundary)
        assert keys.limit_resets_at(key, clock.now) > boundary


def test_a_limit_set_later_counts_what_the_key_already_spent_in_its_period(app, client, upstream, clock):
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        charge(customer, 30)
        db.session.commit()
        clock.advance(86400)
        charge(customer, 20)
        db.session.commit()
    control(app, customer.key_id, spend_limit=25, spend_period="day")
    assert key_row(app, customer.key_id).spent == 20
    assert error_of(speak(client, customer))[:2] == (402, "key_limit_reached")
    assert speak(client, customer, text="01234").status_code == 200
    # Per month, both days count.
    control(app, customer.key_id, spend_limit=100, spend_period="month")
    assert keys.use_now(key_row(app, customer.key_id), clock.now) == 55


def test_unlimited_teams_are_charged_nothing_so_their_keys_spend_nothing(app, client, upstream, clock):
    rich = factories.customer(app, balance=0, unlimited=True)
    control(app, rich.key_id, spend_limit=5, spend_period="day")
    assert speak(client, rich).status_code == 200
    assert key_row(app, rich.key_id).spent == 0


def test_a_refused_count_reports_the_use_of_the_debits_own_window(app, clock):
    # The clock has passed midnight while a debit of the day before is counted: the refusal says what was
    # spent in the debit's day and when that day's limit starts again, not the new day's nothing.
    boundary = BOUNDARIES["day"]
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=30, spend_period="day")
    clock.now = boundary - timedelta(microseconds=1)
    with app.app_context():
        charge(customer, 30)
        db.session.commit()
        clock.now = boundary
        with pytest.raises(keys.KeyLimitReached) as reached:
            keys.count_use(customer.key_id, 1, boundary - timedelta(microseconds=1))
        db.session.rollback()
    assert (reached.value.spent, reached.value.resets_at) == (30, boundary)


def test_counting_a_debit_against_a_key_that_is_not_there_names_the_key(app, clock):
    # No code deletes a key; a row gone by hand fails the debit (rolled back) with the key's id in the log.
    with app.app_context(), pytest.raises(LookupError, match=r"^no key 424242$"):
        keys.count_use(424242, 10, clock.now)


def test_two_hundred_racing_debits_never_overshoot_a_key_limit(app, postgres_only):
    customer = factories.customer(app, balance=10_000)
    control(app, customer.key_id, spend_limit=500, spend_period="month")
    assert factories.race_charges(app, customer, count=200, characters=10) == {"charged": 50, "limit": 150}
    assert key_row(app, customer.key_id).spent == 500
    assert factories.balance(app, customer.team_id) == 9_500
    assert len(factories.speech_requests(app, customer.team_id)) == 50
    factories.assert_books_balance(app, customer.team_id)


def test_two_hundred_racing_requests_through_gunicorn_never_overshoot_a_key_limit(app, database_uri, postgres_only):
    customer = factories.customer(app, balance=10_000)
    control(app, customer.key_id, spend_limit=500, spend_period="day")
    # Room for every request at once: only the key's limit refuses any.
    room = {"MAX_STREAMS_PER_ACCOUNT": "1000", "UPSTREAM_QUEUE": "1000", "UPSTREAM_QUEUE_SECONDS": "60"}
    results = race_speech(
        database_uri,
        FakeUpstream([b"ID3", b"audio"]),
        [customer.secret],
        count=200,
        text=TEN,
        threads=16,
        timeout=60,
        env=room,
    )
    statuses = Counter(status for status, _ in results)
    assert statuses == {200: 50, 402: 150}
    assert all(b"key_limit_reached" in body for status, body in results if status == 402)
    assert key_row(app, customer.key_id).spent == 500
    assert factories.balance(app, customer.team_id) == 9_500
    assert len(factories.speech_requests(app, customer.team_id)) == 50
    factories.assert_books_balance(app, customer.team_id)


# Expiry


def test_an_expired_key_is_refused_before_any_work(app, client, upstream, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, expires_at="2026-12-03T13:00:00Z")
    clock.now = datetime(2026, 12, 3, 12, 59, 59, tzinfo=timezone.utc)
    assert speak(client, customer).status_code == 200
    clock.now = datetime(2026, 12, 3, 13, 0, tzinfo=timezone.utc)
    before = books(app, customer.team_id)
    for response in (speak(client, customer), client.get("/v1/balance", headers=customer.headers)):
        assert error_of(response) == (401, "key_expired", "This API key expired at 2026-12-03T13:00:00Z.")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert books(app, customer.team_id) == before
    assert speech_calls(upstream) == 1


def test_an_expiry_must_be_in_the_future(app, clock):
    with pytest.raises(keys.BadControl, match="must be in the future"):
        keys.read_controls(expires_at="2026-12-03T11:59:00Z")
    with pytest.raises(keys.BadControl, match="such as 2027-01-31T18:00:00Z"):
        keys.read_controls(expires_at="next tuesday")
    # A time without a zone is UTC.
    assert keys.read_controls(expires_at="2026-12-24T18:00").expires_at == datetime(
        2026, 12, 24, 18, tzinfo=timezone.utc
    )


# Allowed addresses

ALLOWED = "10.0.0.0/8, 2001:db8::/32 203.0.113.7"


@pytest.mark.parametrize(
    ("address", "status"),
    [
        ("10.1.2.3", 200),
        ("203.0.113.7", 200),
        ("2001:db8::1", 200),
        # An IPv4 client seen through an IPv6 socket.
        ("::ffff:10.0.0.1", 200),
        ("203.0.113.8", 403),
        ("11.0.0.1", 403),
        ("2001:db9::1", 403),
    ],
)
def test_a_key_works_only_from_its_allowed_addresses(app, client, upstream, address, status):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, allowed_ips=ALLOWED)
    assert key_row(app, customer.key_id).allowed_ips == "10.0.0.0/8 2001:db8::/32 203.0.113.7/32"
    before = books(app, customer.team_id)
    response = speak(client, customer, environ_base={"REMOTE_ADDR": address})
    assert response.status_code == status
    if status == 403:
        assert error_of(response) == (403, "ip_not_allowed", f"This key may not be used from {address}.")
        assert books(app, customer.team_id) == before
        assert key_row(app, customer.key_id).last_used_at is None


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("10.0.0.7/8", "10.0.0.0/8"),  # a range written from one of its addresses
        ("2001:db8::7/32", "2001:db8::/32"),
        ("::ffff:203.0.113.7", "203.0.113.7/32"),  # IPv4 written the IPv6 way, as clients are matched
        ("::ffff:0:0/96", "0.0.0.0/0"),  # every IPv4 address, written the IPv6 way
        ("::ffff:0:0/95", "::fffe:0:0/95"),  # wider than IPv4's space: IPv6 it stays
    ],
)
def test_allowed_addresses_are_kept_as_the_networks_they_name(written, kept):
    assert keys.read_controls(allowed_ips=written).allowed_ips == kept


def test_a_bad_address_is_named_in_the_error_up_to_60_characters():
    written = "host-" + "x" * 70
    with pytest.raises(keys.BadControl) as refused:
        keys.read_controls(allowed_ips=written)
    assert f"'{written[:60]}' is not an IPv4 or IPv6 address or CIDR range." in str(refused.value)


def test_a_forged_forwarded_for_does_not_get_in(make_app, upstream):
    app = make_app()
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, allowed_ips="10.0.0.0/8")
    forged = {**customer.headers, "X-Forwarded-For": "10.0.0.1"}
    body = {"input": TEN, "voice": "af_sky"}
    response = app.test_client().post(SPEECH, json=body, headers=forged, environ_base={"REMOTE_ADDR": "192.0.2.1"})
    assert error_of(response) == (403, "ip_not_allowed", "This key may not be used from 192.0.2.1.")


def test_behind_a_trusted_proxy_the_address_it_saw_counts(make_app, upstream):
    app = make_app(TRUSTED_PROXIES=1)
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, allowed_ips="10.0.0.0/8")
    client = app.test_client()
    proxy = {"REMOTE_ADDR": "127.0.0.1"}

    def through_proxy(forwarded_for):
        headers = {**customer.headers, "X-Forwarded-For": forwarded_for}
        return client.post(SPEECH, json={"input": TEN, "voice": "af_sky"}, headers=headers, environ_base=proxy)

    assert through_proxy("10.0.0.1").status_code == 200
    # The client wrote 10.0.0.1 itself; the proxy appended the address it really came from.
    assert through_proxy("10.0.0.1, 192.0.2.1").status_code == 403


@pytest.mark.parametrize(
    "forwarded_for", ["not-an-address", "10.0.0.1, unknown", ""], ids=["not an address", "unknown", "none at all"]
)
def test_an_address_the_app_cannot_read_is_not_allowed(make_app, upstream, forwarded_for):
    # A trusted proxy that forwards something that is not an address: the key's list cannot be met.
    app = make_app(TRUSTED_PROXIES=1)
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, allowed_ips="10.0.0.0/8 ::/0 0.0.0.0/0")
    headers = {**customer.headers, "X-Forwarded-For": forwarded_for}
    proxy = {"REMOTE_ADDR": "127.0.0.1"} if forwarded_for else {"REMOTE_ADDR": ""}
    response = app.test_client().post(
        SPEECH, json={"input": TEN, "voice": "af_sky"}, headers=headers, environ_base=proxy
    )
    seen = forwarded_for.rpartition(",")[2].strip() or "an unknown address"
    assert error_of(response) == (403, "ip_not_allowed", f"This key may not be used from {seen}.")
    assert factories.balance(app, customer.team_id) == 1000


def test_a_refused_address_is_not_counted_as_guessing_keys(make_app, upstream):
    app = make_app(KEY_FAILURES_PER_IP="2/minute")
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, allowed_ips="10.0.0.0/8")
    client = app.test_client()
    outside = {"REMOTE_ADDR": "192.0.2.1"}
    for _ in range(4):
        assert client.get("/v1/balance", headers=customer.headers, environ_base=outside).status_code == 403


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "localhost", "10.0.0.1/8/8", "2001:db8::/129"])
def test_an_address_that_is_not_one_is_refused_when_set(entry):
    with pytest.raises(keys.BadControl, match="not an IPv4 or IPv6 address or CIDR range") as bad:
        keys.read_controls(allowed_ips=f"10.0.0.1 {entry}")
    assert bad.value.field == "allowed_ips"


# Allowed voices and models


@pytest.mark.parametrize(
    ("voice", "refused"),
    [
        ("alloy", None),
        # The voice alloy is spoken by: the same voice, by its Kokoro name.
        ("af_alloy", None),
        ("af_sky(2)+alloy(1)", None),
        ("af_heart", "af_heart"),
        ("af_sky+af_bella", "af_bella"),
    ],
)
def test_a_key_asks_only_for_its_allowed_voices_resolved_as_requests_are(app, client, upstream, voice, refused):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, allowed_voices="alloy af_sky")
    before = books(app, customer.team_id)
    response = speak(client, customer, voice=voice)
    if refused is None:
        assert response.status_code == 200
        return
    assert error_of(response) == (
        403,
        "voice_not_allowed",
        f"This key may not use the voice '{refused}'; it may use alloy, af_sky.",
    )
    assert response.get_json()["error"]["param"] == "voice"
    assert books(app, customer.team_id) == before
    assert speech_calls(upstream) == 0


def test_a_key_asks_only_for_its_allowed_models(app, client, upstream):
    customer = factories.customer(app, balance=1000)
    # OpenAI's tts-1 is spoken by kokoro: allowing one allows the other.
    control(app, customer.key_id, allowed_models="tts-1")
    assert speak(client, customer, model="kokoro").status_code == 200
    control(app, customer.key_id, allowed_models="another-model third-model")
    before = books(app, customer.team_id)
    response = speak(client, customer, model="tts-1")
    assert error_of(response) == (
        403,
        "model_not_allowed",
        "This key may not use the model 'tts-1'; it may use another-model, third-model.",
    )
    assert response.get_json()["error"]["param"] == "model"
    assert books(app, customer.team_id) == before
    assert speech_calls(upstream) == 1


# Rolling


def balance_with(client, secret: str):
    return client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})


def test_a_rolled_key_keeps_its_old_secret_for_the_grace_period_then_refuses_it(app, client, clock):
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        key = db.session.get(ApiKey, customer.key_id)
        new = keys.roll(key, timedelta(hours=1))
        db.session.commit()
    assert balance_with(client, new).status_code == 200
    assert balance_with(client, customer.secret).status_code == 200
    clock.advance(3600)
    assert error_of(balance_with(client, customer.secret)) == (
        401,
        "key_rolled",
        "This secret was replaced when the key was rolled; it stopped working at 2026-12-03T13:00:00Z. "
        "Use the key's new secret.",
    )
    assert balance_with(client, new).status_code == 200


def test_rolling_with_no_grace_ends_the_old_secret_at_once_and_a_second_roll_ends_the_first(app, client, clock):
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        key = db.session.get(ApiKey, customer.key_id)
        second = keys.roll(key, timedelta(days=7))
        third = keys.roll(key, timedelta(0))
        db.session.commit()
    # The first secret is forgotten by the second roll; the second stopped at once, and says why.
    assert error_of(balance_with(client, customer.secret))[:2] == (401, "invalid_api_key")
    assert error_of(balance_with(client, second))[:2] == (401, "key_rolled")
    assert balance_with(client, third).status_code == 200
    with app.app_context(), pytest.raises(ValueError, match="between 0 and 7 days"):
        keys.roll(db.session.get(ApiKey, customer.key_id), timedelta(days=8))


def test_a_roll_that_crossed_another_is_refused_and_the_secret_the_other_handed_out_works(app, client, monkeypatch):
    """Where the database cannot lock the key's row, two rolls can cross: the one that read the secret before
    the other changed it changes nothing (KeyChanged; the API answers 409 key_changed), and the secret the
    other handed out is the one that works. Here the other roll commits where the lock would have waited."""
    customer = factories.customer(app, balance=1000)
    real_lock, other = keys.lock, {}

    def another_roll_commits_first(stale: ApiKey) -> None:
        monkeypatch.setattr(keys, "lock", real_lock)
        with app.app_context():
            other["secret"] = keys.roll(db.session.get(ApiKey, stale.id), timedelta(0))
            db.session.commit()

    monkeypatch.setattr(keys, "lock", another_roll_commits_first)
    with app.app_context():
        key = db.session.get(ApiKey, customer.key_id)
        with pytest.raises(keys.KeyChanged):
            keys.roll(key, timedelta(hours=1))
        db.session.rollback()
    assert balance_with(client, other["secret"]).status_code == 200
    assert error_of(balance_with(client, customer.secret))[:2] == (401, "key_rolled")


def test_the_balance_tells_the_calling_key_its_limit_use_and_reset(app, client, upstream, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=500, spend_period="week", expires_at="2027-01-01T00:00:00Z")
    assert speak(client, customer).status_code == 200
    assert client.get("/v1/balance", headers=customer.headers).get_json() == {
        "balance": 990,
        "unlimited": False,
        "key": {
            "spend_limit": 500,
            "spend_period": "week",
            "spent": 10,
            "limit_resets_at": "2026-12-07T00:00:00Z",
            "expires_at": "2027-01-01T00:00:00Z",
        },
    }


# Who may: a management key's maker must manage keys


def test_a_maker_who_no_longer_manages_keys_loses_their_management_keys(app):
    owner = factories.customer(app, balance=0)
    with app.app_context():
        team = teams.create("Acme", db.session.get(User, owner.user_id))
        admin = User(email="admin@example.com")
        db.session.add(admin)
        teams.create_personal(admin)
        membership = teams.add_member(team, admin, TeamRole.ADMIN)
        db.session.flush()
        management, _ = keys.create_key(team, admin, "ci", kind=KeyKind.MANAGEMENT)
        speaking, _ = keys.create_key(team, admin, "app")
        db.session.commit()
        actor = teams.membership(db.session.get(User, owner.user_id), team.id)
        assert teams.change_role(actor, membership, TeamRole.DEVELOPER) == 1
        db.session.commit()
        assert db.session.get(ApiKey, management.id).revoked and not db.session.get(ApiKey, speaking.id).revoked


# The audit


def test_the_audit_checks_each_keys_use_against_its_books(app, runner, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=100, spend_period="day")
    with app.app_context():
        delivered_and_refunded(customer, 30, 20)
        clock.advance(86400)
        charge(customer, 5)
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        db.session.execute(update(ApiKey).where(ApiKey.id == customer.key_id).values(spent=4))
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 1
    key = f"key {customer.key_id} ({customer.secret[:12]}…)"
    assert f"{key}: 4 credits recorded as used in day:2026-12-04, the ledger says 5" in result.output


# The migration


def test_migration_0012_counts_each_keys_lifetime_use_and_goes_back_only_without_controls(app, caplog):
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        delivered_and_refunded(customer, 30, 20)
        downgrade(revision="0011")
        assert db.session.scalar(text("SELECT version_num FROM alembic_version")) == "0011"
        upgrade()
        db.session.expire_all()
        key = db.session.get(ApiKey, customer.key_id)
        assert (key.spent, key.spent_window, key.kind, key.spend_limit) == (30, "lifetime", "speech", None)
    control(app, customer.key_id, spend_limit=100, spend_period="day")
    with app.app_context():
        with pytest.raises(SystemExit):
            downgrade(revision="0011")
        assert "1 keys are management keys, have controls or a rolled secret" in caplog.text
        db.session.rollback()
        assert db.session.get(ApiKey, customer.key_id).spend_limit == 100


# The dashboard


# The key page's form as a browser sends it with nothing filled in.
BLANK_FORM = {
    "name": "laptop",
    "spend_limit": "",
    "spend_period": "",
    "expires_at": "",
    "allowed_ips": "",
    "allowed_voices": "",
    "allowed_models": "",
}


def signed_in_with_key(app, web) -> tuple[int, str]:
    """Signed in with 1,000 credits and one key made on the keys page: (its id, its secret)."""
    team_id = factories.signed_up(app, web, "owner@example.com", 1000)
    web.get("/keys")
    page = web.post("/keys", {"name": "laptop"}).get_data(as_text=True)
    secret = re.search(r'id="new-key">(kp_live_[A-Za-z0-9_-]{43})<', page).group(1)
    with app.app_context():
        return db.session.scalar(select(ApiKey.id).where(ApiKey.team_id == team_id)), secret


def test_the_key_page_sets_its_controls_and_shows_its_use(app, web, upstream, clock):
    key_id, secret = signed_in_with_key(app, web)
    page = web.get(f"/keys/{key_id}")
    assert page.status_code == 200
    saved = web.post(
        f"/keys/{key_id}",
        {
            "name": "laptop",
            "spend_limit": "300",
            "spend_period": "day",
            "expires_at": "2027-01-31T18:00",
            "allowed_ips": "10.0.0.0/8\n203.0.113.7",
            "allowed_voices": "alloy, af_sky",
            "allowed_models": "",
        },
        follow_redirects=True,
    )
    assert "is saved" in saved.get_data(as_text=True)
    key = key_row(app, key_id)
    assert keys.controls_of(key) == keys.Controls(
        300, "day", datetime(2027, 1, 31, 18, tzinfo=timezone.utc), "10.0.0.0/8 203.0.113.7/32", "alloy af_sky", None
    )
    client = app.test_client()
    speech = client.post(
        SPEECH,
        json={"input": TEN, "voice": "alloy"},
        headers={"Authorization": f"Bearer {secret}"},
        environ_base={"REMOTE_ADDR": "10.0.0.9"},
    )
    # Read to its end, as a client does: the stream's context is popped before the browser's next page.
    assert speech.status_code == 200 and speech.data == b"ID3audio"
    shown = web.get(f"/keys/{key_id}").get_data(as_text=True)
    assert "Spent today" in shown and "10 <small>of 300</small>" in shown
    assert "The limit starts again at 2026-12-04 00:00 UTC." in shown
    listed = web.get("/keys").get_data(as_text=True)
    assert "10 of 300" in listed


@pytest.mark.parametrize(
    ("form", "field_error"),
    [
        ({"spend_limit": "300", "spend_period": ""}, "A spending limit needs a period"),
        ({"spend_limit": "", "spend_period": "day"}, "A period needs a spending limit"),
        ({"allowed_ips": "10.0.0.0/8 somewhere"}, "&#39;somewhere&#39; is not an IPv4 or IPv6 address"),
        ({"allowed_voices": "af_sky(2)+af_bella"}, "is not a voice name"),
        ({"expires_at": "2026-12-01T00:00"}, "The expiry must be in the future."),
        ({"spend_limit": "-5", "spend_period": "day"}, "Number must be at least 0."),
    ],
)
def test_a_control_that_cannot_be_set_is_shown_beside_its_field_and_nothing_changes(app, web, clock, form, field_error):
    key_id, _ = signed_in_with_key(app, web)
    web.get(f"/keys/{key_id}")
    before = keys.controls_of(key_row(app, key_id))
    response = web.post(f"/keys/{key_id}", {**BLANK_FORM, **form})
    assert response.status_code == 200
    assert field_error in response.get_data(as_text=True)
    assert keys.controls_of(key_row(app, key_id)) == before


def test_an_expiry_already_past_stays_as_it_is_when_other_controls_change(app, web, clock):
    key_id, _ = signed_in_with_key(app, web)
    control(app, key_id, expires_at="2026-12-03T12:30:00Z")
    clock.advance(3600)
    page = web.get(f"/keys/{key_id}").get_data(as_text=True)
    assert 'value="2026-12-03T12:30"' in page and "expired" in page
    sent = {**BLANK_FORM, "name": "renamed", "expires_at": "2026-12-03T12:30"}
    response = web.post(f"/keys/{key_id}", sent, follow_redirects=True)
    assert "is saved" in response.get_data(as_text=True)
    key = key_row(app, key_id)
    assert (key.name, key.expires_at) == ("renamed", datetime(2026, 12, 3, 12, 30, tzinfo=timezone.utc))


def test_rolling_on_the_dashboard_shows_the_new_secret_once_and_both_secrets_while_the_old_works(app, web, clock):
    key_id, old = signed_in_with_key(app, web)
    web.get(f"/keys/{key_id}")
    page = web.post(f"/keys/{key_id}/roll", {"grace": "86400"}).get_data(as_text=True)
    new = re.search(r'id="new-key">(kp_live_[A-Za-z0-9_-]{43})<', page).group(1)
    assert "keeps working until 2026-12-04 12:00 UTC" in page
    client = app.test_client()
    assert client.get("/v1/balance", headers={"Authorization": f"Bearer {old}"}).status_code == 200
    assert client.get("/v1/balance", headers={"Authorization": f"Bearer {new}"}).status_code == 200
    listed = web.get("/keys").get_data(as_text=True)
    assert f"<code>{new[:12]}…</code>" in listed and f"<code>{old[:12]}…</code> until 2026-12-04 12:00" in listed
    assert new not in listed and new not in web.get(f"/keys/{key_id}").get_data(as_text=True)


def test_a_management_keys_page_sets_only_what_applies_to_it(app, web, clock):
    team_id = factories.signed_up(app, web, "owner@example.com", 1000)
    web.get("/keys")
    page = web.post("/keys", {"name": "ci", "kind": "management"}).get_data(as_text=True)
    assert "a management key, for the key API" in page
    with app.app_context():
        key_id = db.session.scalar(
            select(ApiKey.id).where(ApiKey.team_id == team_id, ApiKey.kind == KeyKind.MANAGEMENT)
        )
    form = web.get(f"/keys/{key_id}").get_data(as_text=True)
    assert 'id="spend_limit"' not in form and 'id="allowed_voices"' not in form and 'id="allowed_ips"' in form
    sent = {"name": "ci", "expires_at": "2027-06-01T00:00", "allowed_ips": "198.51.100.0/24"}
    assert "is saved" in web.post(f"/keys/{key_id}", sent, follow_redirects=True).get_data(as_text=True)
    key = key_row(app, key_id)
    assert (key.allowed_ips, key.expires_at.year, key.spend_limit) == ("198.51.100.0/24", 2027, None)


# What an attack run found: each seen failing first


def test_a_charge_read_on_a_clock_behind_the_last_one_never_takes_the_count_back_a_period(app, clock):
    """Two gateway hosts whose clocks differ by milliseconds, around midnight: the count only moves on."""
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=50, spend_period="day")
    midnight = datetime(2026, 12, 4, tzinfo=timezone.utc)
    with app.app_context():
        clock.now = midnight + timedelta(milliseconds=5)
        charge(customer, 40)
        db.session.commit()
        # The other host's clock is 10 ms behind: its request counts in the day the key has reached.
        clock.now = midnight - timedelta(milliseconds=5)
        late = charge(customer, 10)
        db.session.commit()
        assert late.created_at == midnight
        # Dated at the very first instant of the day it counts in, it is that day's in the books too.
        assert audit.key_use_matches_books() == []
        clock.now = midnight + timedelta(seconds=1)
        with pytest.raises(keys.KeyLimitReached):
            charge(customer, 1)
        db.session.rollback()
        key = db.session.get(ApiKey, customer.key_id)
        assert (key.spent, key.spent_window) == (50, "day:2026-12-04")
        # Refunding the late one gives back to the day it was counted in.
        metering.refund_speech(late.id, "upstream down", audio_ms=0)
        db.session.commit()
        db.session.refresh(key)
        assert key.spent == 40
        assert audit.key_use_matches_books() == []


def test_a_key_made_with_a_limit_counts_from_the_period_it_was_made_in_whatever_a_clock_behind_says(app, clock):
    """A key made with a daily limit just after midnight has reached that day: a first request from a host
    whose clock is 10 ms behind counts in it, as it would had the limit been set once the key existed."""
    customer = factories.customer(app, balance=1000)
    midnight = datetime(2026, 12, 4, tzinfo=timezone.utc)
    with app.app_context():
        clock.now = midnight + timedelta(milliseconds=5)
        team, user = db.session.get(Team, customer.team_id), db.session.get(User, customer.user_id)
        limit = keys.read_controls(spend_limit=50, spend_period="day")
        key, _ = keys.create_key(team, user, "made with a limit", controls=limit)
        db.session.commit()
        clock.now = midnight - timedelta(milliseconds=5)
        late = factories.charge_speech(customer.team_id, 10, customer.user_id, key.id)
        db.session.commit()
        assert late.created_at == midnight
        db.session.refresh(key)
        assert (key.spent, key.spent_window) == (10, "day:2026-12-04")
        assert audit.key_use_matches_books() == []


def test_a_limit_set_on_a_clock_behind_the_keys_count_keeps_the_period_the_key_reached(app, clock):
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=100, spend_period="day")
    midnight = datetime(2026, 12, 4, tzinfo=timezone.utc)
    with app.app_context():
        clock.now = midnight - timedelta(hours=1)
        charge(customer, 30)
        clock.now = midnight + timedelta(milliseconds=5)
        charge(customer, 20)
        db.session.commit()
    clock.now = midnight - timedelta(milliseconds=5)
    control(app, customer.key_id, spend_limit=90, spend_period="day")
    key = key_row(app, customer.key_id)
    assert (key.spent, key.spent_window) == (20, "day:2026-12-04")
    with app.app_context():
        assert audit.key_use_matches_books() == []


def test_the_audit_sees_a_later_debit_the_keys_count_never_took_in(app, clock):
    """A key's count left in an earlier window than a debit of its own (a bug, or a hand edit) is named."""
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=100, spend_period="day")
    with app.app_context():
        for day, credits in ((3, 30), (4, 20)):
            clock.now = datetime(2026, 12, day, 12, tzinfo=timezone.utc)
            charge(customer, credits)
        db.session.commit()
        assert audit.key_use_matches_books() == []
        lost = {"spent": 30, "spent_window": "day:2026-12-03"}
        db.session.execute(update(ApiKey).where(ApiKey.id == customer.key_id).values(**lost))
        db.session.commit()
        assert audit.key_use_matches_books() == [
            f"key {customer.key_id} ({customer.secret[:12]}…): 30 credits recorded as used in day:2026-12-03, "
            "the ledger says 50"
        ]


@pytest.fixture
def local_zone_ahead_of_utc():
    """The host's local time zone 12 hours ahead of UTC, as a server set to its own zone has it."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "NZST-12"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_a_keys_windows_are_utc_days_weeks_and_months_whatever_the_hosts_zone(app, clock, local_zone_ahead_of_utc):
    utc = timezone.utc
    assert keys.window_range("day:2026-12-04") == (datetime(2026, 12, 4, tzinfo=utc), datetime(2026, 12, 5, tzinfo=utc))
    assert keys.window_range("week:2026-W49") == (datetime(2026, 11, 30, tzinfo=utc), datetime(2026, 12, 7, tzinfo=utc))
    assert keys.window_range("month:2026-12") == (datetime(2026, 12, 1, tzinfo=utc), datetime(2027, 1, 1, tzinfo=utc))
    customer = factories.customer(app, balance=1000)
    control(app, customer.key_id, spend_limit=100, spend_period="day")
    with app.app_context():
        # 13:00 on the host's clock both times, a UTC day apart.
        for day, credits in ((3, 30), (4, 20)):
            clock.now = datetime(2026, 12, day, 1, tzinfo=utc)
            charge(customer, credits)
        db.session.commit()
        key = db.session.get(ApiKey, customer.key_id)
        assert (key.spent, key.spent_window) == (20, "day:2026-12-04")
        assert audit.key_use_matches_books() == []


def test_rolling_twice_at_once_hands_out_no_secret_that_never_works(app, client):
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        seen_first = db.session.get(ApiKey, customer.key_id)
        with app.app_context():
            other = db.session.get(ApiKey, customer.key_id)
            first = keys.roll(other, timedelta(hours=1))
            db.session.commit()
        second = keys.roll(seen_first, timedelta(hours=1))
        db.session.commit()
    # The second roll started from the first's secret: it is the previous one now, still in its grace.
    assert balance_with(client, first).status_code == 200
    assert balance_with(client, second).status_code == 200
    assert error_of(balance_with(client, customer.secret))[:2] == (401, "invalid_api_key")


def test_a_secret_rolled_away_from_with_no_grace_says_so(app, client, clock):
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        keys.roll(db.session.get(ApiKey, customer.key_id), timedelta(0))
        db.session.commit()
    assert error_of(balance_with(client, customer.secret))[:2] == (401, "key_rolled")


def test_a_known_key_refused_is_not_taken_for_guessing(make_app, clock):
    """Stragglers still sending a rolled or expired secret do not lock the address out for its new one."""
    app = make_app(KEY_FAILURES_PER_IP="3/minute")
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        new = keys.roll(db.session.get(ApiKey, customer.key_id), timedelta(0))
        db.session.commit()
    client = app.test_client()
    for _ in range(5):
        assert error_of(balance_with(client, customer.secret))[:2] == (401, "key_rolled")
    assert balance_with(client, new).status_code == 200
    # Unknown keys still are.
    for _ in range(3):
        balance_with(client, "kp_live_" + "x" * 43)
    assert balance_with(client, new).status_code == 429


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer ", "Basic dXNlcjpwYXNz", "kp_live_" + "x" * 43],
    ids=["no header", "empty bearer", "not bearer", "no scheme"],
)
def test_a_request_without_a_usable_key_counts_as_guessing(make_app, authorization):
    """A client that sends no key, or not as a bearer token, is refused like a wrong key and counted like one."""
    app = make_app(KEY_FAILURES_PER_IP="3/minute")
    customer = factories.customer(app, balance=1000)
    client = app.test_client()
    headers = {} if authorization is None else {"Authorization": authorization}
    for _ in range(3):
        assert client.get("/v1/balance", headers=headers).status_code == 401
    blocked = client.get("/v1/balance", headers=customer.headers)
    assert blocked.status_code == 429 and "invalid API key" in blocked.get_json()["detail"]


@pytest.mark.parametrize("when", ["9999-12-31T23:00:00-05:00", "9999-12-31T23:59:59.999999-00:01"])
def test_an_expiry_past_the_calendar_is_refused_as_bad_input(when):
    with pytest.raises(keys.BadControl) as bad:
        keys.read_controls(expires_at=when)
    assert bad.value.field == "expires_at"


def test_an_address_written_as_ipv4_mapped_is_kept_as_the_ipv4_it_is(app, client, upstream):
    assert keys.read_controls(allowed_ips="::ffff:203.0.113.7 ::ffff:10.0.0.0/104").allowed_ips == (
        "203.0.113.7/32 10.0.0.0/8"
    )


def test_a_blend_is_not_an_allowed_voice(clock):
    for blend in ("af_bella-af_sky", "af_bella+af_sky", "af_bella(2)"):
        with pytest.raises(keys.BadControl, match="is not a voice name"):
            keys.read_controls(allowed_voices=blend)


def test_the_dashboards_expiry_may_carry_seconds(app, web, clock):
    key_id, _ = signed_in_with_key(app, web)
    web.get(f"/keys/{key_id}")
    sent = {**BLANK_FORM, "expires_at": "2027-01-31T18:00:30"}
    assert "is saved" in web.post(f"/keys/{key_id}", sent, follow_redirects=True).get_data(as_text=True)
    assert key_row(app, key_id).expires_at == datetime(2027, 1, 31, 18, 0, 30, tzinfo=timezone.utc)


def test_what_a_key_spent_in_an_earlier_period_no_longer_counts_as_spent(app, client):
    customer = factories.customer(app, balance=1000)
    with app.app_context():
        key = db.session.get(ApiKey, customer.key_id)
        key.spend_limit, key.spend_period, key.spent = 100, "day", 40
        key.spent_window = keys.window("day", models.utcnow() - timedelta(days=1))
        db.session.commit()
    shown = client.get("/v1/balance", headers=customer.headers).get_json()["key"]
    assert (shown["spend_limit"], shown["spend_period"], shown["spent"]) == (100, "day", 0)
    with app.app_context():
        db.session.get(ApiKey, customer.key_id).spent_window = keys.window("day", models.utcnow())
        db.session.commit()
    assert client.get("/v1/balance", headers=customer.headers).get_json()["key"]["spent"] == 40


def test_a_debit_of_a_key_waits_while_its_controls_are_being_changed(make_app, postgres_only):
    """keys.lock holds the key's row while its controls change: a request of that key charged meanwhile
    waits, so the change counts it (PostgreSQL, where waiting can be seen; tests/test_row_locks.py probes the
    lock on both databases)."""
    app = make_app()
    customer = factories.customer(app, balance=1000)

    def charge():
        with app.app_context():
            factories.charge_speech(customer.team_id, 10)
            db.session.commit()

    failures = second_waits_for_first(
        app.app_context, lambda: keys.lock(db.session.get(ApiKey, customer.key_id)), charge, "a debit of the key"
    )
    assert failures == []
    assert factories.balance(app, customer.team_id) == 990
