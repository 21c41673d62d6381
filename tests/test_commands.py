"""Operator commands, run through Flask's CLI runner."""

import re
from datetime import timedelta
from unittest.mock import ANY

from sqlalchemy import update

from app import keys
from app.extensions import db
from app.models import SpeechRequest, utcnow
from tests import factories


def test_create_user_grant_and_create_a_key_that_works(app, runner):
    result = runner.invoke(args=["users", "create", "Ops@Example.com"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(args=["credits", "grant", "ops@example.com", "500", "--reason", "trial"])
    assert "balance is now 500" in result.output
    result = runner.invoke(args=["keys", "create", "ops@example.com", "--name", "ci"])
    secret = re.search(r"kp_live_\S{43}", result.output).group(0)
    response = app.test_client().get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})
    assert response.get_json() == {"balance": 500, "unlimited": False, "key": ANY}


def test_duplicate_emails_are_refused_case_insensitively(runner):
    assert runner.invoke(args=["users", "create", "a@example.com"]).exit_code == 0
    result = runner.invoke(args=["users", "create", " A@EXAMPLE.COM "])
    assert result.exit_code != 0 and "already exists" in result.output


def test_a_malformed_email_is_refused(runner):
    result = runner.invoke(args=["users", "create", "not-an-email"])
    assert result.exit_code != 0 and "Enter one plain email address" in result.output


def test_deduct_is_ledgered_and_never_overdraws(app, runner, customer):
    result = runner.invoke(args=["credits", "deduct", customer.email, "400", "--reason", "chargeback"])
    assert result.exit_code == 0 and "balance is now 600" in result.output
    result = runner.invoke(args=["credits", "deduct", customer.email, "601", "--reason", "too much"])
    assert result.exit_code != 0 and "Nothing changed" in result.output
    assert factories.ledger(app, customer.team_id)[-1] == ("deduction", -400, 600)
    factories.assert_books_balance(app, customer.team_id)


def test_grants_need_a_positive_amount_and_a_reason(app, runner, customer):
    assert runner.invoke(args=["credits", "grant", customer.email, "0", "--reason", "x"]).exit_code != 0
    assert runner.invoke(args=["credits", "grant", customer.email, "-5", "--reason", "x"]).exit_code != 0
    assert runner.invoke(args=["credits", "grant", customer.email, "5"]).exit_code != 0
    assert runner.invoke(args=["credits", "grant", "nobody@example.com", "5", "--reason", "x"]).exit_code != 0
    assert factories.balance(app, customer.team_id) == 1000


def test_unlimited_on_and_off(app, runner, customer):
    client = app.test_client()
    assert runner.invoke(args=["users", "unlimited", customer.email]).exit_code == 0
    assert client.get("/v1/balance", headers=customer.headers).get_json()["unlimited"] is True
    assert runner.invoke(args=["users", "unlimited", customer.email, "--off"]).exit_code == 0
    assert client.get("/v1/balance", headers=customer.headers).get_json()["unlimited"] is False


def test_revoke_and_show(app, runner, customer):
    result = runner.invoke(args=["keys", "revoke", str(customer.key_id)])
    assert result.exit_code == 0
    assert runner.invoke(args=["keys", "revoke", str(customer.key_id)]).exit_code != 0
    assert runner.invoke(args=["keys", "revoke", "9999"]).exit_code != 0
    result = runner.invoke(args=["users", "show", customer.email])
    assert "Balance: 1000 credits" in result.output
    assert "revoked" in result.output and "grant" in result.output and "test credits" in result.output
    assert customer.secret not in result.output
    assert customer.secret[: len(keys.KEY_PREFIX) + 4] in result.output


def test_settle_counts_every_request_it_settles(app, runner):
    customer = factories.customer(app, balance=1000)
    factories.charged(app, customer.team_id, count=3, characters=30)
    with app.app_context():
        db.session.execute(update(SpeechRequest).values(created_at=utcnow() - timedelta(hours=1)))
        db.session.commit()
    result = runner.invoke(args=["speech", "settle"])
    assert "3 requests of gone processes without progress for over 600 s; settled 3, refunding 90 credits." in (
        result.output
    )
    assert factories.balance(app, customer.team_id) == 1000
