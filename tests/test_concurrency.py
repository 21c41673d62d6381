"""Concurrent debits of one balance on PostgreSQL: never below zero, books always balance."""

from collections import Counter

import pytest

from tests import factories
from tests.fake_upstream import Failing, FakeUpstream
from tests.servers import race_speech

pytestmark = pytest.mark.usefixtures("postgres_only")


def test_threads_racing_on_one_balance_in_the_billing_module(app):
    customer = factories.customer(app, balance=1005)
    assert factories.race_charges(app, customer, count=40, characters=50) == {"charged": 20, "short": 20}
    assert factories.balance(app, customer.team_id) == 5
    factories.assert_books_balance(app, customer.team_id)


def test_gunicorn_processes_and_threads_racing_through_the_real_api(app, database_uri):
    """Two gunicorn worker processes with eight threads each, eighty requests at once."""
    customer = factories.customer(app, balance=255)
    other_key = factories.add_key(app, customer.user_id)
    # 10 credits each: 25 requests are affordable, 5 credits stay.
    upstream = FakeUpstream([b"ID3", b"audio"])
    secrets = [other_key, customer.secret]
    results = race_speech(database_uri, upstream, secrets, count=80, text="0123456789", threads=8, timeout=30)
    statuses = Counter(status for status, _ in results)
    assert statuses == {200: 25, 402: 55}
    assert all(body == b"ID3audio" for status, body in results if status == 200)
    assert factories.balance(app, customer.team_id) == 5
    factories.assert_books_balance(app, customer.team_id)
    rows = factories.speech_requests(app, customer.team_id)
    assert len(rows) == 25 and all(row.state == "delivered" for row in rows)


@pytest.mark.parametrize("upstream_kind", ["healthy", "half-broken"])
def test_two_hundred_requests_from_many_keys_race_on_one_balance(app, database_uri, runner, upstream_kind):
    customer = factories.customer(app, balance=1000)
    secrets = [customer.secret] + [factories.add_key(app, customer.user_id) for _ in range(9)]
    upstream = FakeUpstream([b"ID3", b"audio"]) if upstream_kind == "healthy" else Failing(every=2)
    # 10 credits each: the balance covers 100 of the 200.
    answers = race_speech(
        database_uri,
        upstream,
        secrets,
        count=200,
        text="0123456789",
        threads=32,
        timeout=60,
        env={"MAX_STREAMS_PER_ACCOUNT": "1000"},
    )
    statuses = Counter(status for status, _ in answers)
    rows = factories.speech_requests(app, customer.team_id)
    states = Counter(row.state for row in rows)
    balance = factories.balance(app, customer.team_id)
    print(
        f"\n{upstream_kind}: 200 requests -> {dict(statuses)}; requests {dict(states)}; "
        f"faults injected {statuses[502]}; refunds {states['refunded']}; balance {balance}"
    )
    assert sum(statuses.values()) == 200 and set(statuses) <= {200, 402, 502}
    assert balance >= 0 and balance == 1000 - 10 * statuses[200]
    assert states["delivered"] == statuses[200] and states["refunded"] == statuses[502]
    assert states["charged"] == 0 and statuses[402] == 200 - len(rows)
    if upstream_kind == "healthy":
        assert statuses == {200: 100, 402: 100} and balance == 0
    else:
        assert statuses[502] > 0
    factories.assert_books_balance(app, customer.team_id)
    assert runner.invoke(args=["audit"]).exit_code == 0
