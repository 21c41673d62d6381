"""Automatic top-ups, saved cards, invoices and the billing portal, against Stripe's API stubbed in its own shapes.

A customer whose balance falls below their threshold gets one top-up from the saved card: queued by
the debit that crosses, paid by the buyer (never a web request) with one Idempotency-Key however
often it is tried, credited by the webhook alone, once, whatever the order.
"""

import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
from datetime import timedelta

import psycopg
import pytest
from flask_migrate import downgrade, upgrade
from sqlalchemy import event, func, select, text

from app import accounts, audit, autotopup, billing, card_payments, metering, payments, services, teams
from app.extensions import db
from app.models import (
    LedgerEntry,
    LedgerKind,
    Membership,
    Payment,
    PaymentKind,
    PaymentStatus,
    StripeEvent,
    Team,
    TeamRole,
    User,
    utcnow,
)
from tests import factories
from tests.conftest import STUB_UPSTREAM, app_config
from tests.servers import ROOT, serve, wait_for
from tests.stripe_helpers import FakeStripe, charge, checkout_session, deliver, dispute, payment_intent
from tests.stripe_helpers import event as stripe_event

OWNER = "owner@example.com"


def owner(app, web, credits: int = 0, email: str = OWNER) -> int:
    """A signed-in owner on the billing page (its form's token at hand); their team's id."""
    team_id = factories.signed_up(app, web, email, credits=credits)
    web.get("/billing")
    return team_id


def with_card(app, team_id: int) -> None:
    with app.app_context():
        team = db.session.get(Team, team_id)
        team.stripe_customer_id = FakeStripe.CUSTOMER
        team.card_payment_method = "pm_test_1"
        team.card_brand, team.card_last4, team.card_expires = "visa", "4242", "12/2030"
        db.session.commit()


def turned_on(app, web, credits: int, below: int = 5_000, monthly_limit: int = 5, email: str = OWNER) -> int:
    """A signed-in owner whose team has `credits`, a saved card and automatic top-up on; the team's id."""
    team_id = owner(app, web, credits, email)
    with_card(app, team_id)
    response = web.post("/billing/automatic", {"below": below, "pack": "starter", "monthly_limit": monthly_limit})
    assert response.status_code == 302, response.data
    return team_id


def spend(app, team_id: int, characters: int, times: int = 1) -> None:
    """`times` speech requests of `characters` each, charged and committed (made in the playground)."""
    with app.app_context():
        owner_id = db.session.scalar(select(Membership.user_id).where(Membership.team_id == team_id))
        for _ in range(times):
            factories.charge_speech(team_id, characters, made_by_id=owner_id, key_id=None)
            db.session.commit()


def automatic(app, team_id: int) -> list[Payment]:
    with app.app_context():
        rows = db.session.scalars(
            select(Payment)
            .where(Payment.team_id == team_id, Payment.kind == PaymentKind.AUTOMATIC)
            .order_by(Payment.id)
        ).all()
        db.session.expunge_all()
        return rows


def team_row(app, team_id: int) -> Team:
    with app.app_context():
        team = db.session.get(Team, team_id)
        db.session.expunge(team)
        return team


def a_day_passes(app, payment_id: int) -> None:
    """The top-up was queued a day ago, and is due now."""
    with app.app_context():
        row = db.session.get(Payment, payment_id)
        row.created_at -= timedelta(hours=24)
        row.next_attempt_at = row.created_at
        db.session.commit()


def buy(app, limit: int = 50) -> dict:
    """One call of the buyer (rounds of `limit`): how many top-ups it sent, failed and left for later."""
    with app.app_context():
        return dict(card_payments.buy_due(services.stripe_client(), limit))


def setup_completed(team_id: int, session_id: str = "cs_test_setup_1", setup_intent: str = "seti_test_1") -> dict:
    """A Checkout Session in setup mode as its checkout.session.completed event carries it."""
    return checkout_session(
        team_id,
        session_id=session_id,
        payment_status="no_payment_required",
        payment_intent=None,
        mode="setup",
        amount_total=None,
        customer=FakeStripe.CUSTOMER,
        setup_intent=setup_intent,
    )


def succeeded(client, payment: Payment, intent_id: str = "pi_auto_1", event_id: str | None = None):
    return deliver(
        client,
        stripe_event(
            "payment_intent.succeeded", payment_intent(payment.idempotency_key, payment.team_id, intent_id), event_id
        ),
    )


# 1. A saved card.


def test_saving_a_card_opens_checkout_in_setup_mode_and_its_webhook_keeps_the_card(app, web, client, stripe_api):
    team_id = owner(app, web)
    response = web.post("/billing/card")
    assert response.status_code == 303
    assert response.headers["Location"].endswith("/c/pay/cs_test_setup_1")
    ((customer, _),) = stripe_api.called("POST", "/v1/customers")
    assert customer == {"name": "Personal", "email": OWNER, "metadata[team_id]": str(team_id)}
    ((session, _),) = stripe_api.called("POST", "/v1/checkout/sessions")
    assert session["mode"] == "setup"
    assert session["customer"] == FakeStripe.CUSTOMER
    assert session["currency"] == "usd"
    assert session["client_reference_id"] == str(team_id)
    assert session["success_url"].endswith("/billing?card=saved")
    assert team_row(app, team_id).card_payment_method is None  # nothing is saved before Stripe says so

    completed = setup_completed(team_id, "cs_test_setup_1", "seti_test_1")
    assert deliver(client, stripe_event("checkout.session.completed", completed)).status_code == 200
    team = team_row(app, team_id)
    assert (team.card_payment_method, team.card_brand, team.card_last4, team.card_expires) == (
        "pm_test_1",
        "visa",
        "4242",
        "12/2030",
    )
    ((made_default, _),) = stripe_api.called("POST", f"/v1/customers/{FakeStripe.CUSTOMER}")
    assert made_default == {"invoice_settings[default_payment_method]": "pm_test_1"}
    page = web.get("/billing").get_data(as_text=True)
    assert "Visa ending in <strong>4242</strong>, expires 12/2030" in page
    assert "pm_test_1" not in page


def test_a_setup_session_of_another_customer_saves_nothing(app, web, client, stripe_api):
    team_id = owner(app, web)
    with_card(app, team_id)
    other = setup_completed(team_id + 1, "cs_x", "seti_9")
    deliver(client, stripe_event("checkout.session.completed", other))
    assert stripe_api.called("GET", "/v1/setup_intents") == []


def test_a_card_made_default_in_the_portal_becomes_the_teams_and_a_removed_card_pauses(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=20_000)
    stripe_api.default_method = "pm_new"
    updated = {
        "id": FakeStripe.CUSTOMER,
        "object": "customer",
        "invoice_settings": {"default_payment_method": "pm_new"},
    }
    assert deliver(client, stripe_event("customer.updated", updated)).status_code == 200
    team = team_row(app, team_id)
    assert (team.card_payment_method, team.card_brand, team.card_last4) == ("pm_new", "mastercard", "4444")

    detached = {"id": "pm_new", "object": "payment_method", "type": "card", "customer": None}
    assert deliver(client, stripe_event("payment_method.detached", detached)).status_code == 200
    team = team_row(app, team_id)
    assert team.card_payment_method is None and team.card_last4 is None
    assert team.auto_topup_paused == "The saved card was removed."
    (notice,) = factories.mails(app, OWNER, "auto_topup_paused")
    assert "The saved card was removed." in notice.body
    assert re.search(r"again: \S*/billing#card\n", notice.body)
    # Below the threshold now: nothing is queued while paused.
    spend(app, team_id, 16_000)
    assert automatic(app, team_id) == []
    # A late customer.updated that still names the removed card brings nothing back: Stripe is asked.
    stripe_api.default_method = None
    late = deliver(client, stripe_event("customer.updated", updated)).get_json()["outcome"]
    assert late == "no new default card"
    team = team_row(app, team_id)
    assert team.card_payment_method is None and team.auto_topup_paused == "The saved card was removed."


# 2. Automatic top-up: settings.


@pytest.mark.parametrize(
    "form, message",
    [
        ({"below": 0, "pack": "starter", "monthly_limit": 5}, "at least 1"),
        ({"below": "lots", "pack": "starter", "monthly_limit": 5}, "at least 1"),
        ({"below": 5000, "pack": "gold", "monthly_limit": 5}, "Not a valid choice"),
        ({"below": 5000, "pack": "starter", "monthly_limit": 0}, "from 1 to 100"),
        ({"below": 5000, "pack": "starter", "monthly_limit": 101}, "from 1 to 100"),
    ],
)
def test_settings_that_cannot_work_are_refused_beside_their_field_and_change_nothing(app, web, form, message):
    team_id = owner(app, web, 100)
    with_card(app, team_id)
    response = web.post("/billing/automatic", form)
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    team = team_row(app, team_id)
    assert (team.auto_topup_below, team.auto_topup_pack) == (None, None)
    assert automatic(app, team_id) == []


def test_automatic_top_up_needs_a_saved_card(app, web):
    team_id = owner(app, web, 100)
    response = web.post("/billing/automatic", {"below": 5000, "pack": "starter", "monthly_limit": 5})
    assert response.status_code == 302
    flashed = '<div class="flash error" role="status">Save a card first: automatic top-ups pay with it.</div>'
    assert flashed in web.get("/billing").get_data(as_text=True)
    assert team_row(app, team_id).auto_topup_below is None


def test_turning_it_on_below_the_threshold_queues_one_now_and_turning_it_off_calls_it_off(app, web):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    assert (queued.status, queued.pack, queued.credits, queued.amount_cents) == ("queued", "starter", 10_000, 500)
    assert "a top-up is on its way" in web.get("/billing").get_data(as_text=True).lower()
    web.post("/billing/automatic", {"action": "off"})
    (called_off,) = automatic(app, team_id)
    assert called_off.status == PaymentStatus.EXPIRED
    team = team_row(app, team_id)
    assert team.auto_topup_below is None and not team.auto_topup_pending


# 2. Queued by the debit, paid by the buyer, credited by the webhook.


def test_the_debit_that_crosses_queues_one_top_up_and_the_buyer_pays_it_with_one_key(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=5_010)
    spend(app, team_id, 5)  # 5,005: above
    assert automatic(app, team_id) == []
    spend(app, team_id, 10)  # 4,995: crossed
    spend(app, team_id, 10, times=3)  # still below, one already pending
    (queued,) = automatic(app, team_id)
    assert queued.status == PaymentStatus.QUEUED and team_row(app, team_id).auto_topup_pending
    assert stripe_api.called("POST", "/v1/payment_intents") == []  # no web request or debit pays

    assert buy(app) == {"sent": 1}
    ((params, headers),) = stripe_api.called("POST", "/v1/payment_intents")
    assert headers["Idempotency-Key"] == queued.idempotency_key
    assert params["amount"] == "500" and params["currency"] == "usd"
    assert params["customer"] == FakeStripe.CUSTOMER and params["payment_method"] == "pm_test_1"
    assert params["off_session"] == "true" and params["confirm"] == "true"
    assert params["metadata[kokoro_pay_auto_topup]"] == queued.idempotency_key
    assert params["metadata[team_id]"] == str(team_id)
    (sent,) = automatic(app, team_id)
    assert (sent.status, sent.payment_intent_id) == (PaymentStatus.PROCESSING, "pi_auto_1")
    assert factories.balance(app, team_id) == 4_965  # nothing credited before the webhook
    assert buy(app) == {}  # nothing due: never sent twice

    assert succeeded(client, sent, event_id="evt_auto_1").get_json()["outcome"].startswith("credited 10000")
    assert succeeded(client, sent, event_id="evt_auto_1").get_json()["outcome"] == "already processed"
    assert succeeded(client, sent, event_id="evt_auto_again").get_json()["outcome"] == "already credited"
    assert factories.balance(app, team_id) == 14_965
    (paid,) = automatic(app, team_id)
    assert paid.status == PaymentStatus.PAID and not team_row(app, team_id).auto_topup_pending
    factories.assert_books_balance(app, team_id)
    (receipt,) = factories.mails(app, OWNER, "receipt")
    assert "automatic top-up" in receipt.body
    assert f"/billing/payments/{paid.id}/document" in receipt.body
    with app.app_context():
        assert audit.audit().problems == []


def test_the_top_up_queued_is_of_the_pack_saved_last_though_the_request_read_its_team_before(app, web):
    # A speech request reads its team (as the playground's does), the owner saves another pack in another
    # tab, then the request's debit crosses the threshold: the top-up it queues buys the pack saved last.
    team_id = turned_on(app, web, credits=5_010)
    with app.app_context():
        owner_id = db.session.scalar(select(Membership.user_id).where(Membership.team_id == team_id))
        # Read, held (as the playground holds its team through the request) and not committed: the
        # session's identity map keeps it only while it is referenced.
        read = db.session.get(Team, team_id)
        assert read.auto_topup_pack == "starter"
        with app.app_context():  # the other tab, a session of its own
            db.session.get(Team, team_id).auto_topup_pack = "pro"
            db.session.commit()
        factories.charge_speech(read.id, 20, made_by_id=owner_id, key_id=None)
        db.session.commit()
    (queued,) = automatic(app, team_id)
    assert (queued.pack, queued.credits, queued.amount_cents) == ("pro", 250_000, 8_000)


def test_a_checkout_payment_intent_is_not_an_automatic_top_up(app, web, client, stripe_api):
    team_id = owner(app, web, 10)
    checkout_intent = {"id": "pi_checkout", "object": "payment_intent", "metadata": {}, "status": "succeeded"}
    response = deliver(client, stripe_event("payment_intent.succeeded", checkout_intent))
    assert response.get_json()["outcome"] == "ignored: not an automatic top-up"
    forged = payment_intent("kp-auto-topup-nothing", team_id)
    assert deliver(client, stripe_event("payment_intent.succeeded", forged)).get_json()["outcome"].startswith("ignored")
    assert factories.balance(app, team_id) == 10


def one_intent_credited_once(app, client, stripe_api: FakeStripe, team_id: int, key: str) -> None:
    """The buyer asked twice with the one key; Stripe made one PaymentIntent; its success, delivered
    twice, credited the team once (it had 100 credits)."""
    first, again = stripe_api.called("POST", "/v1/payment_intents")
    assert first[1]["Idempotency-Key"] == again[1]["Idempotency-Key"] == key
    assert len(stripe_api.intents) == 1
    (sent,) = automatic(app, team_id)
    assert (sent.status, sent.payment_intent_id) == (PaymentStatus.PROCESSING, "pi_auto_1")
    succeeded(client, sent)
    succeeded(client, sent)
    assert factories.balance(app, team_id) == 10_100
    factories.assert_books_balance(app, team_id)


class Crash(BaseException):
    """The process dies: nothing after this point runs, and the transaction never commits."""


def test_a_buyer_that_dies_after_stripe_answered_sends_the_same_key_again_and_is_credited_once(
    app, web, client, stripe_api
):
    team_id = turned_on(app, web, credits=100)

    def die_before_commit(session):
        if any(isinstance(row, Payment) for row in session.dirty) or session.info.get("crash"):
            raise Crash

    with app.app_context():
        (queued,) = automatic(app, team_id)
        payment = card_payments._claim(queued.id)
        db.session.info["crash"] = True
        event.listen(db.session(), "before_commit", die_before_commit)
        with pytest.raises(Crash):
            card_payments.charge(services.stripe_client(), payment)
        event.remove(db.session(), "before_commit", die_before_commit)
        db.session.info.pop("crash", None)
        db.session.rollback()
    (unsent,) = automatic(app, team_id)
    assert unsent.status == PaymentStatus.QUEUED and unsent.payment_intent_id is None
    assert len(stripe_api.called("POST", "/v1/payment_intents")) == 1

    # The claim lapses; the next round asks again, with the same key, and gets the same intent.
    with app.app_context():
        db.session.get(Payment, unsent.id).claimed_until -= card_payments.CLAIM
        db.session.commit()
    assert buy(app) == {"sent": 1}
    one_intent_credited_once(app, client, stripe_api, team_id, unsent.idempotency_key)


def test_the_webhook_may_come_before_the_buyer_records_stripes_answer(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    # Stripe's event overtakes the buyer's commit (or the buyer died): the payment is credited from the event.
    assert succeeded(client, queued).get_json()["outcome"].startswith("credited 10000")
    assert buy(app) == {}  # paid already: not sent again
    assert stripe_api.called("POST", "/v1/payment_intents") == []
    (paid,) = automatic(app, team_id)
    assert (paid.status, paid.payment_intent_id) == (PaymentStatus.PAID, "pi_auto_1")
    assert factories.balance(app, team_id) == 10_100


# 3. When it fails.


@pytest.mark.parametrize(
    "outcome, status, said",
    [
        ("declined", PaymentStatus.FAILED, "Your card has insufficient funds."),
        ("authentication_required", PaymentStatus.ACTION_REQUIRED, "requires authentication"),
        ("no_card", PaymentStatus.FAILED, "The saved card cannot be charged"),
    ],
)
def test_a_card_that_fails_pauses_automatic_top_up_mails_billing_and_is_not_tried_again(
    app, web, client, stripe_api, outcome, status, said
):
    stripe_api.intent_outcome = outcome
    team_id = turned_on(app, web, credits=100)
    with app.app_context():
        team = db.session.get(Team, team_id)
        billing_person = User(email="books@example.com")
        db.session.add(billing_person)
        db.session.flush()
        db.session.add(Membership(team_id=team.id, user_id=billing_person.id, role=TeamRole.BILLING))
        db.session.add(User(email="dev@example.com"))
        db.session.commit()
    assert buy(app) == {"failed": 1}
    (failed,) = automatic(app, team_id)
    assert failed.status == status and said in failed.failure
    team = team_row(app, team_id)
    assert team.auto_topup_paused and said in team.auto_topup_paused and not team.auto_topup_pending
    for person in (OWNER, "books@example.com"):
        (notice,) = factories.mails(app, person, "auto_topup_paused")
        assert said in notice.body and "nothing was charged" in notice.body
        assert re.search(r"\): \S*/billing\n", notice.body) and re.search(r"again: \S*/billing#card\n", notice.body)
        assert ("confirm this payment yourself" in notice.body) == (status == PaymentStatus.ACTION_REQUIRED)
    page = web.get("/billing").get_data(as_text=True)
    assert "Automatic top-up is paused." in page
    # Stripe's own failure event for the same intent changes nothing more.
    if outcome != "no_card":
        failed_event = payment_intent(
            failed.idempotency_key,
            team_id,
            status="requires_payment_method",
            last_payment_error={"code": "card_declined", "message": "declined"},
        )
        assert (
            deliver(client, stripe_event("payment_intent.payment_failed", failed_event)).get_json()["outcome"]
            == "already ended"
        )
    # Below the threshold, more debits: nothing queued, nothing sent, no more mail.
    spend(app, team_id, 10, times=3)
    assert buy(app) == {}
    assert len(stripe_api.called("POST", "/v1/payment_intents")) == 1
    assert len(factories.mails(app, OWNER, "auto_topup_paused")) == 1
    # Turned on again (after, say, paying in Checkout): a new top-up, a new key.
    stripe_api.intent_outcome = "succeeded"
    web.post("/billing/automatic", {"below": 5000, "pack": "starter", "monthly_limit": 5})
    assert buy(app) == {"sent": 1}
    keys_sent = [headers["Idempotency-Key"] for _, headers in stripe_api.called("POST", "/v1/payment_intents")]
    assert len(set(keys_sent)) == 2


def test_the_failure_event_may_come_first(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    failed_event = payment_intent(
        queued.idempotency_key,
        team_id,
        status="requires_payment_method",
        last_payment_error={"code": "card_declined", "message": "Your card was declined."},
    )
    outcome = deliver(client, stripe_event("payment_intent.payment_failed", failed_event)).get_json()["outcome"]
    assert outcome.endswith("failed: Your card was declined.")
    assert buy(app) == {}
    assert team_row(app, team_id).auto_topup_paused == "Your card was declined."
    assert len(factories.mails(app, OWNER, "auto_topup_paused")) == 1


@pytest.mark.parametrize(
    "error,status,said",
    [
        (
            {"code": "card_declined", "decline_code": "authentication_required", "message": "Needs your bank."},
            PaymentStatus.ACTION_REQUIRED,
            "Needs your bank.",
        ),
        (
            {"code": "authentication_required", "message": "Needs your bank."},
            PaymentStatus.ACTION_REQUIRED,
            "Needs your bank.",
        ),
        ({"code": "card_declined"}, PaymentStatus.FAILED, "The card was declined."),
        ({"code": "expired_card", "message": "x" * 500}, PaymentStatus.FAILED, "x" * 400),
        (None, PaymentStatus.FAILED, "The card was declined."),
    ],
)
def test_stripes_failure_event_says_whether_the_customer_must_confirm_and_why_it_failed(
    app, web, client, stripe_api, error, status, said
):
    """The decline code, or else the error's code, tells a payment the bank wants confirmed (SCA) from one
    that failed; the reason shown and mailed is Stripe's message, cut to 400 characters, or a plain one."""
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    extra = {"last_payment_error": error} if error is not None else {}
    failed_event = payment_intent(queued.idempotency_key, team_id, status="requires_payment_method", **extra)
    outcome = deliver(client, stripe_event("payment_intent.payment_failed", failed_event)).get_json()["outcome"]
    assert outcome == f"automatic top-up {queued.name} failed: {said}"
    (failed,) = automatic(app, team_id)
    assert (failed.status, failed.failure) == (status, said)
    assert team_row(app, team_id).auto_topup_paused == said[:200]  # the column the billing page shows
    (notice,) = factories.mails(app, OWNER, "auto_topup_paused")
    assert said in notice.body
    assert ("confirm this payment yourself" in notice.body) == (status == PaymentStatus.ACTION_REQUIRED)


def test_a_failure_event_of_a_payment_that_is_no_automatic_top_up_is_answered_ignored(app, client):
    checkout_intent = payment_intent("", 1, status="requires_payment_method", last_payment_error={"code": "x"})
    checkout_intent["metadata"] = {}
    outcome = deliver(client, stripe_event("payment_intent.payment_failed", checkout_intent)).get_json()["outcome"]
    assert outcome == "ignored: not an automatic top-up"


def test_an_error_object_may_hold_nulls_where_stripe_writes_them(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    error = {"code": None, "decline_code": None, "message": None, "type": "card_error"}
    failed_event = payment_intent(
        queued.idempotency_key, team_id, status="requires_payment_method", last_payment_error=error
    )
    response = deliver(client, stripe_event("payment_intent.payment_failed", failed_event))
    assert response.status_code == 200
    assert response.get_json()["outcome"] == f"automatic top-up {queued.name} failed: The card was declined."


def test_an_intent_that_names_a_top_up_not_its_own_changes_nothing_and_the_log_says_which(
    app, web, client, stripe_api, caplog
):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    elsewhere = payment_intent(queued.idempotency_key, team_id + 1, "pi_elsewhere")
    nameless = payment_intent(queued.idempotency_key, team_id, "pi_nameless")
    del nameless["metadata"]["team_id"]
    for intent in (elsewhere, nameless):
        assert deliver(client, stripe_event("payment_intent.succeeded", intent)).get_json()["outcome"] == (
            "ignored: not an automatic top-up"
        )
        said = f"payment intent {intent['id']} names no automatic top-up of ours ({queued.idempotency_key})"
        assert said in [record.getMessage() for record in caplog.records]
    # Credited through its own intent; a second intent for it is not applied, and the log names all three.
    assert succeeded(client, queued).status_code == 200
    other = payment_intent(queued.idempotency_key, team_id, "pi_other")
    assert deliver(client, stripe_event("payment_intent.succeeded", other)).get_json()["outcome"] == (
        "ignored: not an automatic top-up"
    )
    said = f"payment intent pi_other is not {queued.idempotency_key}'s (pi_auto_1)"
    assert said in [record.getMessage() for record in caplog.records]
    assert factories.balance(app, team_id) == 10_100


def test_stripe_out_of_reach_is_tried_again_with_the_same_key_and_given_up_after_a_day(app, web, client, stripe_api):
    stripe_api.intent_outcome = "down"
    team_id = turned_on(app, web, credits=100)
    assert buy(app) == {"later": 1}
    (waiting,) = automatic(app, team_id)
    assert waiting.status == PaymentStatus.QUEUED and waiting.next_attempt_at > waiting.created_at
    assert buy(app) == {}  # not due yet
    with app.app_context():
        db.session.get(Payment, waiting.id).next_attempt_at = waiting.created_at
        db.session.commit()
    assert buy(app) == {"later": 1}
    sent_keys = {headers["Idempotency-Key"] for _, headers in stripe_api.called("POST", "/v1/payment_intents")}
    assert sent_keys == {waiting.idempotency_key}
    a_day_passes(app, waiting.id)
    # A day on, Stripe may have forgotten the key: never sent again under it, given up instead.
    assert buy(app) == {"failed": 1}
    assert len(stripe_api.called("POST", "/v1/payment_intents")) == 2
    assert team_row(app, team_id).auto_topup_paused.startswith("Stripe could not be reached")
    (notice,) = factories.mails(app, OWNER, "auto_topup_paused")
    assert "nothing was charged" not in notice.body  # an earlier try may have gone through
    # Should it have, its success still credits it, and frees the team for the next.
    succeeded(client, waiting)
    assert factories.balance(app, team_id) == 10_100


# The monthly cap.


def test_the_monthly_cap_stops_queueing_until_the_next_month(app, web, client, stripe_api, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "app.autotopup")
    team_id = turned_on(app, web, credits=5_100, monthly_limit=2)
    for round_ in range(2):
        spend(app, team_id, 10_000 if round_ else 200)
        (queued,) = [p for p in automatic(app, team_id) if p.status == PaymentStatus.QUEUED]
        buy(app)
        succeeded(client, queued, intent_id=f"pi_auto_{round_ + 1}")
    assert factories.balance(app, team_id) == 5_100 - 200 - 10_000 + 20_000
    spend(app, team_id, 10_000)  # below again: the third this month is not made
    assert len(automatic(app, team_id)) == 2
    capped = [r.getMessage() for r in caplog.records if r.name == "app.autotopup" and r.levelno == logging.INFO]
    assert capped[-1] == f"team {team_id}: automatic top-up cap of 2 this month reached"
    keys = [payment.idempotency_key for payment in automatic(app, team_id)]
    assert capped[:-1] == [f"team {team_id}: automatic top-up {key} queued (starter pack)" for key in keys]
    team = team_row(app, team_id)
    start = autotopup.month_start(team.auto_topup_capped_until - timedelta(days=1))
    assert team.auto_topup_capped_until == autotopup.next_month(start)
    assert "This month's cap of 2 automatic top-ups is reached" in web.get("/billing").get_data(as_text=True)
    # The next month, from its very first instant (the cap lasts until then, exclusive): the next debit
    # queues one again.
    later = team.auto_topup_capped_until
    for module in (autotopup, metering):
        monkeypatch.setattr(f"{module.__name__}.utcnow", lambda: later, raising=False)
    monkeypatch.setattr("app.billing.utcnow", lambda: later)
    spend(app, team_id, 10)
    assert [p.status for p in automatic(app, team_id)][-1] == PaymentStatus.QUEUED


def test_a_top_up_queued_in_a_months_last_instant_counts_in_that_month_not_the_next(
    app, web, client, stripe_api, monkeypatch
):
    # The clock stopped at the last microsecond of last month: the top-up it queues is dated then, so this
    # month's cap of one is whole and the next debit below queues this month's.
    this_month = autotopup.month_start(utcnow())
    team_id = turned_on(app, web, credits=5_100, monthly_limit=1)

    def clock_at(moment):
        for module in (autotopup, metering, billing, card_payments):
            monkeypatch.setattr(module, "utcnow", lambda: moment)

    clock_at(this_month - timedelta(microseconds=1))
    spend(app, team_id, 200)
    (last_months,) = automatic(app, team_id)
    assert last_months.created_at == this_month - timedelta(microseconds=1)
    assert buy(app) == {"sent": 1}
    succeeded(client, last_months)
    clock_at(this_month)
    spend(app, team_id, 10_000)
    assert [payment.status for payment in automatic(app, team_id)] == [PaymentStatus.PAID, PaymentStatus.QUEUED]


# Refunds and disputes, the audit.


def test_a_refund_or_lost_dispute_of_an_automatic_top_up_is_taken_back_like_checkouts(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    buy(app)
    # The refund overtakes the credit: kept, applied with it.
    deliver(client, stripe_event("charge.refunded", charge("pi_auto_1", amount=500, amount_refunded=250)))
    succeeded(client, queued)
    assert factories.balance(app, team_id) == 100 + 10_000 - 5_000
    deliver(client, stripe_event("charge.dispute.closed", dispute("pi_auto_1", amount=500)))
    assert factories.balance(app, team_id) == 100
    (reversed_,) = automatic(app, team_id)
    assert reversed_.status == PaymentStatus.DISPUTED and reversed_.credits_reversed == 10_000
    factories.assert_books_balance(app, team_id)
    with app.app_context():
        kinds = db.session.scalars(select(LedgerEntry.kind).where(LedgerEntry.team_id == team_id)).all()
        assert LedgerKind.PAYMENT_REFUND in kinds and LedgerKind.CHARGEBACK in kinds
        assert audit.audit().problems == []


def test_the_audit_sees_an_automatic_top_up_out_of_step_with_its_team(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    with app.app_context():
        assert audit.audit().problems == []
        db.session.get(Team, team_id).auto_topup_pending = False
        db.session.commit()
        assert audit.audit().problems == [f"team {team_id}: automatic top-up not pending, but 1 in flight"]


# 4. Invoices and receipts; 5. the portal; 6. tax.


def test_checkout_makes_an_invoice_for_the_teams_customer_and_its_link_opens_it(app, web, client, stripe_api):
    team_id = owner(app, web)
    assert web.post("/billing/checkout", {"pack": "starter"}).status_code == 303
    ((first, _),) = stripe_api.called("POST", "/v1/checkout/sessions")
    assert first["invoice_creation[enabled]"] == "true"
    assert first["customer_email"] == OWNER and first["customer_creation"] == "always"
    assert "automatic_tax[enabled]" not in first and "line_items[0][price_data][tax_behavior]" not in first
    # The invoice says what was bought, for which team.
    assert first["invoice_creation[invoice_data][description]"] == "10,000 kokoro-pay credits"
    assert first["invoice_creation[invoice_data][metadata][team_id]"] == str(team_id)
    assert first["invoice_creation[invoice_data][metadata][pack]"] == "starter"
    completed = checkout_session(
        team_id, session_id="cs_test_payment_1", customer="cus_from_checkout", invoice="in_checkout_1"
    )
    bystander = factories.customer(app)  # another team, with no customer yet either
    deliver(client, stripe_event("checkout.session.completed", completed))
    assert team_row(app, team_id).stripe_customer_id == "cus_from_checkout"
    assert team_row(app, bystander.team_id).stripe_customer_id is None
    with app.app_context():
        payment = db.session.scalar(select(Payment).where(Payment.team_id == team_id))
        assert payment.invoice_id == "in_checkout_1"
        payment_id = payment.id
    page = web.get("/billing").get_data(as_text=True)
    assert f'href="/billing/payments/{payment_id}/document">Invoice</a>' in page
    document = web.get(f"/billing/payments/{payment_id}/document")
    assert document.status_code == 302 and document.headers["Location"].endswith("/invoices/in_checkout_1")
    (receipt,) = factories.mails(app, OWNER, "receipt")
    assert f"/billing/payments/{payment_id}/document" in receipt.body
    # The next purchase is the team's customer's.
    web.post("/billing/checkout", {"pack": "starter"})
    second = stripe_api.called("POST", "/v1/checkout/sessions")[1][0]
    assert second["customer"] == "cus_from_checkout" and "customer_email" not in second


def test_an_automatic_top_up_gets_a_paid_invoice_and_otherwise_its_receipt(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    buy(app)
    succeeded(client, queued)
    receipt = web.get(f"/billing/payments/{queued.id}/document")
    assert receipt.headers["Location"].endswith("/receipts/pi_auto_1")
    with app.app_context():
        assert dict(card_payments.invoice_due(services.stripe_client())) == {"invoiced": 1}
        assert dict(card_payments.invoice_due(services.stripe_client())) == {}
    key = queued.idempotency_key
    steps = [
        (path, headers["Idempotency-Key"])
        for method, path, _, headers in stripe_api.calls
        if path.startswith(("/v1/invoices", "/v1/invoiceitems")) and method == "POST"
    ]
    assert steps == [
        ("/v1/invoices", f"{key}-invoice"),
        ("/v1/invoiceitems", f"{key}-item"),
        ("/v1/invoices/in_test_1/finalize", f"{key}-finalize"),
        ("/v1/invoices/in_test_1/attach_payment", f"{key}-attach"),
    ]
    ((attach, _),) = stripe_api.called("POST", "/v1/invoices/in_test_1/attach_payment")
    assert attach == {"payment_intent": "pi_auto_1"}
    ((item, _),) = stripe_api.called("POST", "/v1/invoiceitems")
    assert (item["amount"], item["currency"], item["invoice"]) == ("500", "usd", "in_test_1")
    invoice = web.get(f"/billing/payments/{queued.id}/document")
    assert invoice.headers["Location"].endswith("/invoices/in_test_1")


def test_a_payment_of_another_team_has_no_document_here(app, web, stripe_api):
    owner(app, web)
    other = factories.customer(app)
    with app.app_context():
        payment = factories.starter_payment(other.team_id, "cs_other", status="paid", invoice_id="in_other")
        db.session.commit()
        payment_id = payment.id
    assert web.get(f"/billing/payments/{payment_id}/document").status_code == 404
    assert stripe_api.calls == []


def test_the_billing_portal_opens_for_the_teams_customer_and_comes_back_to_billing(app, web, stripe_api):
    team_id = owner(app, web)
    response = web.post("/billing/portal")
    assert response.status_code == 303 and response.headers["Location"] == FakeStripe.PORTAL
    ((params, _),) = stripe_api.called("POST", "/v1/billing_portal/sessions")
    assert params == {"customer": FakeStripe.CUSTOMER, "return_url": "http://localhost/billing"}
    assert team_row(app, team_id).stripe_customer_id == FakeStripe.CUSTOMER
    web.post("/billing/portal")
    assert len(stripe_api.called("POST", "/v1/customers")) == 1  # one customer per team


def test_the_portal_comes_back_to_the_public_address(make_app, stripe_api):
    app = make_app(PUBLIC_BASE_URL="https://tts.example.com")
    web = factories.WebClient(app.test_client())
    owner(app, web)
    web.post("/billing/portal")
    ((params, _),) = stripe_api.called("POST", "/v1/billing_portal/sessions")
    assert params["return_url"] == "https://tts.example.com/billing"


def test_with_automatic_tax_checkout_collects_the_address_and_the_credits_stay_the_packs(make_app, stripe_api):
    app = make_app(STRIPE_AUTOMATIC_TAX=True)
    web, client = factories.WebClient(app.test_client()), app.test_client()
    team_id = owner(app, web)
    web.post("/billing/checkout", {"pack": "starter"})
    ((params, _),) = stripe_api.called("POST", "/v1/checkout/sessions")
    assert params["automatic_tax[enabled]"] == "true"
    assert params["billing_address_collection"] == "required"
    assert params["tax_id_collection[enabled]"] == "true"
    assert params["line_items[0][price_data][tax_behavior]"] == "exclusive"
    assert "customer_update[address]" not in params  # a new customer: Checkout makes it with the address
    taxed = checkout_session(team_id, session_id="cs_test_payment_1", amount_total=595, customer="cus_from_checkout")
    deliver(client, stripe_event("checkout.session.completed", taxed))
    assert factories.balance(app, team_id) == 10_000
    # The team's next checkout is its customer's, and keeps the address and name given there.
    web.post("/billing/checkout", {"pack": "starter"})
    (_, (params, _)) = stripe_api.called("POST", "/v1/checkout/sessions")
    assert params["customer"] == "cus_from_checkout"
    assert (params["customer_update[address]"], params["customer_update[name]"]) == ("auto", "auto")


# 7. The admin console.


def test_the_admin_console_shows_the_card_the_settings_and_the_attempts(app, web, runner, stripe_api):
    team_id = turned_on(app, web, credits=100)
    buy(app)
    runner.invoke(args=["users", "create", "boss@example.com", "--password", "correct horse battery"])
    runner.invoke(args=["users", "admin", "boss@example.com", "--on"])
    operator = factories.WebClient(app.test_client())
    operator.login("boss@example.com")
    page = operator.get(f"/admin/teams/{team_id}").get_data(as_text=True)
    assert "Visa ending in 4242, expires 12/2030" in page
    assert "below 5,000 credits, buy starter, at most 5 a month · one in flight" in page
    assert "automatic" in page and "processing" in page and "pi_auto_1" in page
    assert "pm_test_1" not in page


# On PostgreSQL: many debits at once.


def test_fifty_concurrent_debits_crossing_the_threshold_make_exactly_one_payment_intent(
    postgres_only, app, web, client, stripe_api
):
    team_id = turned_on(app, web, credits=5_500)
    with app.app_context():
        owner_id = db.session.scalar(select(Membership.user_id).where(Membership.team_id == team_id))
    person = factories.Customer(user_id=owner_id, email=OWNER, secret="", key_id=None, team_id=team_id)
    assert factories.race_charges(app, person, 50, 20) == {"charged": 50}
    assert factories.balance(app, team_id) == 4_500
    (queued,) = automatic(app, team_id)
    assert queued.status == PaymentStatus.QUEUED
    assert buy(app) == {"sent": 1}
    assert len(stripe_api.called("POST", "/v1/payment_intents")) == 1
    succeeded(client, automatic(app, team_id)[0])
    assert factories.balance(app, team_id) == 14_500
    factories.assert_books_balance(app, team_id)


def test_flask_topups_buy_once_pays_what_is_due(app, web, client, runner, stripe_api):
    team_id = turned_on(app, web, credits=100)
    result = runner.invoke(args=["topups", "buy", "--once"])
    assert result.exit_code == 0 and result.output.splitlines()[-1] == "sent 1, failed 0, to retry 0; invoiced 0"
    succeeded(client, automatic(app, team_id)[0])
    result = runner.invoke(args=["topups", "buy", "--once"])
    assert result.output.splitlines()[-1] == "sent 0, failed 0, to retry 0; invoiced 1"


def bought_by_the_thread(app, team_id: int) -> bool:
    """Whether the buyer thread takes the team's queued top-up to Stripe within ten seconds."""
    for _ in range(200):
        if automatic(app, team_id)[0].status == PaymentStatus.PROCESSING:
            return True
        threading.Event().wait(0.05)
    return False


def test_the_buyer_thread_wakes_when_a_debit_queues_a_top_up(make_app, stripe_api):
    app = make_app(TOPUP_WORKER=True, TOPUP_POLL_SECONDS=3600)
    web = factories.WebClient(app.test_client())
    team_id = turned_on(app, web, credits=5_010)
    buyer = app.extensions["buyer"]
    try:
        spend(app, team_id, 20)  # the commit wakes the thread at once, not in an hour
        assert bought_by_the_thread(app, team_id)
    finally:
        buyer.stop()


def test_the_buyer_thread_finds_a_top_up_another_process_queued_at_its_next_poll(make_app, stripe_api):
    """No wake reaches this process's buyer for a top-up another gateway process queued: it is found by the
    poll, every TOPUP_POLL_SECONDS."""
    app = make_app(TOPUP_WORKER=True, TOPUP_POLL_SECONDS=0.05)
    web = factories.WebClient(app.test_client())
    team_id = turned_on(app, web, credits=10_000)  # above the threshold: nothing queued; the thread started
    buyer = app.extensions["buyer"]
    try:
        with app.app_context():
            autotopup.queue(team_id)
            # Queued as another process queues it: the commit wakes no buyer here.
            del db.session.info[autotopup.QUEUED]
            db.session.commit()
        assert bought_by_the_thread(app, team_id)
    finally:
        buyer.stop()


def test_no_team_row_is_locked_while_stripe_is_asked(app, web, client, stripe_api):
    """A team's requests never wait on Stripe: while any Stripe call of the dashboard, the webhook or the
    buyer is under way, the team's row can be locked at once (as a debit locks it); on SQLite, where a
    write holds the whole database, a write can start at once."""
    team_id = owner(app, web, credits=100)
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    asked = []

    def lock_the_team(path):
        if uri.startswith("sqlite"):
            other = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None, timeout=0.2)
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        else:
            other = psycopg.connect(uri.replace("postgresql+psycopg://", "postgresql://"))
            other.execute("SET lock_timeout = '200ms'")
            other.execute("SELECT id FROM teams WHERE id = %s FOR UPDATE", (team_id,))
            other.rollback()
        other.close()
        asked.append(path)

    stripe_api.meanwhile = lock_the_team
    web.post("/billing/card")
    completed = setup_completed(team_id, "cs_test_setup_1", "seti_test_1")
    assert deliver(client, stripe_event("checkout.session.completed", completed)).status_code == 200
    updated = {"id": FakeStripe.CUSTOMER, "object": "customer", "invoice_settings": {"default_payment_method": "pm_2"}}
    stripe_api.default_method = "pm_2"
    assert deliver(client, stripe_event("customer.updated", updated)).status_code == 200
    web.post("/billing/automatic", {"below": 5000, "pack": "starter", "monthly_limit": 5})
    buy(app)
    web.post("/billing/portal")
    web.get(f"/billing/payments/{automatic(app, team_id)[0].id}/document")
    web.post("/billing/checkout", {"pack": "starter"})
    assert asked == [
        "/v1/customers",
        "/v1/checkout/sessions",
        "/v1/setup_intents/seti_test_1",
        f"/v1/customers/{FakeStripe.CUSTOMER}",
        f"/v1/customers/{FakeStripe.CUSTOMER}",
        "/v1/payment_intents",
        "/v1/billing_portal/sessions",
        "/v1/payment_intents/pi_auto_1",
        "/v1/checkout/sessions",
    ]


def test_the_billing_page_lists_every_payment_a_page_at_a_time(app, web):
    team_id = owner(app, web)
    with app.app_context():
        for n in range(25):
            factories.starter_payment(team_id, f"cs_listed_{n:02d}", status="paid")
        db.session.commit()
    first = web.get("/billing").get_data(as_text=True)
    second = web.get("/billing?page=2").get_data(as_text=True)
    listed = re.findall(r'id="payment-(cs_listed_\d+)"', first) + re.findall(r'id="payment-(cs_listed_\d+)"', second)
    assert listed == [f"cs_listed_{n:02d}" for n in reversed(range(25))]
    assert 'href="/billing?page=2"' in first


def test_a_buyer_process_killed_after_stripe_answered_is_retried_with_the_same_key_and_credited_once(app, web, client):
    """`flask topups buy` in a process of its own, against a Stripe stand-in over real HTTP: killed (-9) once
    Stripe has answered and before its commit (the test holds the database until the kill), then run again."""
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    held = []

    def hold_the_database(path):
        if path != "/v1/payment_intents" or held:
            return
        if uri.startswith("sqlite"):
            connection = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
            connection.execute("BEGIN IMMEDIATE")  # the buyer's next write waits for this
        else:
            connection = psycopg.connect(uri.replace("postgresql+psycopg://", "postgresql://"))
            connection.execute("SELECT id FROM payments WHERE id = %s FOR UPDATE", (queued.id,))
        held.append(connection)

    stand_in = FakeStripe()
    stand_in.meanwhile = hold_the_database
    with serve(stand_in) as stripe_url:
        env = {
            **{key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "FLASK_APP")},
            "FLASK_APP": "wsgi.py",
            "DATABASE_URL": uri,
            "SECRET_KEY": "test-secret-key",
            "UPSTREAM_URL": STUB_UPSTREAM,
            "STRIPE_SECRET_KEY": "sk_test_kokoro",
            "STRIPE_API_BASE": stripe_url,
            "CREDIT_PACKS": app_config("")["CREDIT_PACKS"],
            "MAIL_WORKER": "false",
            "TOPUP_WORKER": "false",
        }
        # This interpreter's flask, run in the checkout under test (mutants/ under `make mutate`,
        # which has no .venv of its own).
        flask = [sys.executable, "-m", "flask", "topups", "buy", "--once"]
        buyer = subprocess.Popen(flask, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: held or buyer.poll() is not None, timeout=60, what="the buyer's call to Stripe")
        assert held, buyer.communicate()[0].decode()
        buyer.kill()
        buyer.wait()
        held[0].rollback() if hasattr(held[0], "rollback") else None
        held[0].close()
        (unsent,) = automatic(app, team_id)
        assert (unsent.status, unsent.payment_intent_id, unsent.attempts) == (PaymentStatus.QUEUED, None, 1)

        with app.app_context():  # the dead buyer's claim lapses
            db.session.get(Payment, unsent.id).claimed_until -= card_payments.CLAIM
            db.session.commit()
        again = subprocess.run(flask, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert again.stdout.splitlines()[-1] == "sent 1, failed 0, to retry 0; invoiced 0", again.stdout + again.stderr
    one_intent_credited_once(app, client, stand_in, team_id, queued.idempotency_key)


def test_migration_0013_keeps_checkout_payments_and_goes_back_only_without_cards_or_automatic_top_ups(app, web, caplog):
    team_id = owner(app, web)
    with app.app_context():
        factories.starter_payment(team_id, "cs_before_0013", status="paid")
        db.session.commit()
        downgrade(revision="0012")
        upgrade()
        kind, key = db.session.execute(
            text("SELECT kind, idempotency_key FROM payments WHERE checkout_session_id = 'cs_before_0013'")
        ).one()
        assert (kind, key) == ("checkout", None)
        # The team's id sequence survives the table's rebuild on SQLite: a new team is numbered after it.
        other = factories.customer(app)
        assert other.team_id > team_id
    with_card(app, team_id)
    with app.app_context():
        with pytest.raises(SystemExit):
            downgrade(revision="0012")
        assert "saved cards or automatic top-up settings exist" in caplog.text
        db.session.rollback()
        assert db.session.scalar(text("SELECT card_payment_method FROM teams WHERE id = :id"), {"id": team_id})


def test_a_top_up_no_buyer_took_up_for_a_day_is_called_off_unsent_and_the_next_debit_queues_anew(app, web, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    a_day_passes(app, queued.id)
    assert buy(app) == {"called off": 1}
    assert stripe_api.called("POST", "/v1/payment_intents") == []
    (called_off,) = automatic(app, team_id)
    assert called_off.status == PaymentStatus.EXPIRED
    team = team_row(app, team_id)
    assert not team.auto_topup_pending and team.auto_topup_paused is None
    assert factories.mails(app, OWNER, "auto_topup_paused") == []
    spend(app, team_id, 10)
    assert [p.status for p in automatic(app, team_id)] == [PaymentStatus.EXPIRED, PaymentStatus.QUEUED]


def test_turning_off_leaves_a_tried_top_up_in_flight_and_a_late_success_frees_only_its_own(
    app, web, client, stripe_api
):
    stripe_api.intent_outcome = "down"
    team_id = turned_on(app, web, credits=100)
    buy(app)  # tried once: Stripe may have taken it
    web.post("/billing/automatic", {"action": "off"})
    (first,) = automatic(app, team_id)
    assert first.status == PaymentStatus.QUEUED and team_row(app, team_id).auto_topup_pending
    # A day on it is given up, the team freed and paused; turned on again, a second is queued.
    a_day_passes(app, first.id)
    assert buy(app) == {"failed": 1}
    web.post("/billing/automatic", {"below": 5000, "pack": "starter", "monthly_limit": 5})
    second = automatic(app, team_id)[1]
    assert second.status == PaymentStatus.QUEUED
    # The first try had gone through after all: credited, and the second is still the one in flight.
    succeeded(client, first, intent_id="pi_late")
    assert factories.balance(app, team_id) == 10_100
    assert team_row(app, team_id).auto_topup_pending
    spend(app, team_id, 10)  # no second queueing, no error
    assert [p.status for p in automatic(app, team_id)] == [PaymentStatus.PAID, PaymentStatus.QUEUED]
    with app.app_context():
        assert audit.audit().problems == []


def test_a_replayed_or_late_setup_event_never_brings_an_older_card_back(app, web, client, stripe_api):
    team_id = owner(app, web)
    web.post("/billing/card")
    older = setup_completed(team_id, "cs_test_setup_1", "seti_old") | {"created": int(utcnow().timestamp()) - 600}
    newer = setup_completed(team_id, "cs_test_setup_2", "seti_new") | {"created": int(utcnow().timestamp()) - 60}
    assert deliver(client, stripe_event("checkout.session.completed", newer, "evt_new")).status_code == 200
    asked = len(stripe_api.calls)
    # The same event again: nothing asked of Stripe, nothing changed.
    again = deliver(client, stripe_event("checkout.session.completed", newer, "evt_new")).get_json()
    assert again["outcome"] == "already processed" and len(stripe_api.calls) == asked
    # The older setup's event, late: the card saved since stays, and Stripe's default is not touched.
    late = deliver(client, stripe_event("checkout.session.completed", older, "evt_old")).get_json()["outcome"]
    assert late == "a setup older than the card saved since: not applied"
    assert stripe_api.called("POST", f"/v1/customers/{FakeStripe.CUSTOMER}") == [
        ({"invoice_settings[default_payment_method]": "pm_test_1"}, stripe_api.calls[asked - 1][3])
    ]


@pytest.mark.parametrize(
    "event_type, obj",
    [
        ("payment_intent.succeeded", payment_intent("kp-auto-topup-x", 7001) | {"metadata": {"team_id": {"a": 1}}}),
        ("payment_intent.succeeded", payment_intent("kp-auto-topup-x", 7001) | {"metadata": ["x"]}),
        ("payment_intent.succeeded", {"id": "pi_1", "object": "payment_intent"}),
        (
            "payment_intent.payment_failed",
            payment_intent("kp-auto-topup-x", 7001) | {"last_payment_error": {"message": 5}},
        ),
        ("payment_intent.payment_failed", payment_intent("kp-auto-topup-x", 7001) | {"last_payment_error": "no"}),
        (
            "payment_intent.payment_failed",
            payment_intent("kp-auto-topup-x", 7001) | {"last_payment_error": {"code": 5}},
        ),
        (
            "payment_intent.payment_failed",
            payment_intent("kp-auto-topup-x", 7001) | {"last_payment_error": {"decline_code": ["x"]}},
        ),
        ("payment_intent.succeeded", payment_intent("kp-auto-topup-x", 7001) | {"metadata": {"team_id": None}}),
        ("checkout.session.completed", checkout_session(7001, mode="setup", created="yesterday")),
        ("checkout.session.completed", checkout_session(7001, mode="setup", created=10**20)),
        ("checkout.session.completed", checkout_session(7001, mode="setup", created=True)),
    ],
)
def test_a_signed_event_of_the_wrong_shape_is_refused_and_changes_nothing(app, client, event_type, obj):
    response = deliver(client, stripe_event(event_type, obj))
    assert response.status_code == 400 and response.get_json() == {"detail": "Malformed event."}
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(StripeEvent)) == 0


def test_the_log_says_why_a_signed_event_was_refused(app, client, caplog):
    obj = payment_intent("kp-auto-topup-x", 7001) | {"last_payment_error": {"code": 5}}
    assert deliver(client, stripe_event("payment_intent.payment_failed", obj, "evt_odd")).status_code == 400
    said = (
        "stripe event 'evt_odd' refused: last_payment_error is {'code': 5}, "
        "not what a payment_intent.payment_failed event carries"
    )
    assert said in [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize(
    ("event_type", "obj", "said"),
    [
        ("t" * 101, {}, "not an event: it needs an id, a type and data.object"),
        ("t" * 100, {}, None),
        (
            "checkout.session.completed",
            checkout_session(7001, mode="setup", created=2**37),
            "created is 137438953472, not a time Stripe writes",
        ),
        (
            "charge.refunded",
            charge() | {"payment_intent": 5},
            "payment_intent is 5, not what a charge.refunded event carries",
        ),
        ("charge.refunded", charge() | {"amount_refunded": payments.MAX_CENTS}, None),
        (
            "charge.refunded",
            charge() | {"amount_refunded": payments.MAX_CENTS + 1},
            f"amount_refunded is {payments.MAX_CENTS + 1}, not a whole number of cents",
        ),
    ],
)
def test_each_refusal_of_a_signed_event_says_why_and_its_limits_are_taken(app, client, caplog, event_type, obj, said):
    response = deliver(client, stripe_event(event_type, obj, "evt_odd"))
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stripe event 'evt_odd' refused")]
    if said is None:
        assert response.status_code == 200 and refused == []
    else:
        assert (response.status_code, refused) == (400, [f"stripe event 'evt_odd' refused: {said}"])


def test_a_card_removed_while_a_top_up_waits_is_told_once(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    detached = {"id": "pm_test_1", "object": "payment_method", "type": "card", "customer": None}
    deliver(client, stripe_event("payment_method.detached", detached))
    assert buy(app) == {"failed": 1}
    assert stripe_api.called("POST", "/v1/payment_intents") == []
    assert len(factories.mails(app, OWNER, "auto_topup_paused")) == 1
    assert team_row(app, team_id).auto_topup_paused == "The saved card was removed."
    assert automatic(app, team_id)[0].failure == "No card is saved for automatic top-ups."


def test_an_invoice_never_finished_is_voided_so_none_is_left_to_pay(app, web, client, stripe_api):
    stripe_api.refuse_attach = True
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    buy(app)
    succeeded(client, queued)
    with app.app_context():
        assert dict(card_payments.invoice_due(services.stripe_client())) == {"later": 1}
    (waiting,) = automatic(app, team_id)
    assert (waiting.invoice_id, waiting.draft_invoice_id) == (None, "in_test_1")
    with app.app_context():
        db.session.get(Payment, waiting.id).paid_at -= timedelta(hours=24)
        db.session.commit()
        stripe_api.invoice_status = "open"
        assert dict(card_payments.invoice_due(services.stripe_client())) == {"voided": 1}
        assert dict(card_payments.invoice_due(services.stripe_client())) == {}
    assert len(stripe_api.called("POST", "/v1/invoices/in_test_1/void")) == 1
    (voided,) = automatic(app, team_id)
    assert (voided.invoice_id, voided.draft_invoice_id) == (None, None)
    # Its link opens the charge's receipt instead.
    receipt = web.get(f"/billing/payments/{voided.id}/document")
    assert receipt.headers["Location"].endswith("/receipts/pi_auto_1")


def test_the_audit_tells_of_a_top_up_at_stripe_for_a_day_without_its_event(app, web, stripe_api):
    team_id = turned_on(app, web, credits=100)
    buy(app)
    (sent,) = automatic(app, team_id)
    with app.app_context():
        assert audit.audit().notices == []
        db.session.get(Payment, sent.id).created_at -= timedelta(days=2)
        db.session.commit()
        assert audit.audit().notices == [
            f"team {team_id}: automatic top-up {sent.idempotency_key} (pi_auto_1) at Stripe for over a day "
            "without its event"
        ]


def test_checkouts_customer_never_replaces_the_teams_own(app, web, client, stripe_api):
    team_id = owner(app, web)
    with_card(app, team_id)
    web.post("/billing/checkout", {"pack": "starter"})
    completed = checkout_session(team_id, session_id="cs_test_payment_1", customer="cus_someone_else")
    deliver(client, stripe_event("checkout.session.completed", completed))
    assert team_row(app, team_id).stripe_customer_id == FakeStripe.CUSTOMER


def test_a_team_with_a_top_up_in_flight_cannot_close_and_closing_turns_automatic_top_up_off(app, web, stripe_api):
    with app.app_context():
        ann = accounts.create_user("ann@example.com", "correct horse battery")
        ann.email_verified_at = utcnow()
        acme = teams.create("Acme", ann)
        db.session.flush()
        billing.grant(acme, 100, "start")
        db.session.commit()
        team_id = acme.id
    web.login("ann@example.com")
    web.get("/account")
    assert web.post("/teams/switch", {"team": team_id}).status_code == 302
    with_card(app, team_id)
    web.get("/billing")
    web.post("/billing/automatic", {"below": 5000, "pack": "starter", "monthly_limit": 5})
    assert len(automatic(app, team_id)) == 1
    buy(app)  # at Stripe now
    web.get("/team")
    refused = web.post("/team/close")
    assert team_row(app, team_id).closed_at is None, refused.status_code
    with app.app_context():
        payment = db.session.get(Payment, automatic(app, team_id)[0].id)
        payment.status, payment.paid_at = PaymentStatus.PAID, utcnow()
        db.session.get(Team, team_id).auto_topup_pending = False
        db.session.commit()
    web.get("/team")
    web.post("/team/close")
    team = team_row(app, team_id)
    assert team.closed_at is not None and team.auto_topup_below is None


def test_deleting_the_account_ends_automatic_top_up_and_waits_for_one_being_paid(app, web, stripe_api):
    team_id = turned_on(app, web, credits=100)
    buy(app)  # at Stripe now
    web.get("/account")
    refused = web.post("/account/delete", {"current": "correct horse battery", "understood": "y"})
    assert "being paid right now" in refused.get_data(as_text=True)
    assert team_row(app, team_id).auto_topup_below == 5000
    with app.app_context():
        payment = db.session.get(Payment, automatic(app, team_id)[0].id)
        payment.status, payment.paid_at = PaymentStatus.PAID, utcnow()
        db.session.get(Team, team_id).auto_topup_pending = False
        db.session.commit()
    spend(app, team_id, 10)  # below again: one queued, not yet taken
    web.get("/account")
    web.post("/account/delete", {"current": "correct horse battery", "understood": "y"})
    team = team_row(app, team_id)
    assert (team.auto_topup_below, team.card_payment_method, team.stripe_customer_id) == (None, None, None)
    assert automatic(app, team_id)[-1].status == PaymentStatus.EXPIRED
    assert buy(app) == {}


def test_a_debit_goes_on_when_a_top_up_is_in_flight_though_the_team_did_not_say_so(app, web, stripe_api, caplog):
    team_id = turned_on(app, web, credits=100)
    with app.app_context():
        db.session.get(Team, team_id).auto_topup_pending = False  # out of step, as only a bug could make it
        db.session.commit()
    spend(app, team_id, 10)  # below the threshold: it would queue a second
    assert factories.balance(app, team_id) == 90
    assert [p.status for p in automatic(app, team_id)] == [PaymentStatus.QUEUED]
    assert team_row(app, team_id).auto_topup_pending
    errors = [r.getMessage() for r in caplog.records if r.name == "app.autotopup" and r.levelno == logging.ERROR]
    assert errors == [f"team {team_id}: an automatic top-up is in flight already though none was pending; none queued"]
    with app.app_context():
        assert audit.audit().problems == []


@pytest.mark.parametrize(("credits", "queued"), [(5_000, 0), (4_999, 1)])
def test_turning_it_on_queues_one_only_when_the_balance_is_below_the_threshold(app, web, credits, queued):
    team_id = turned_on(app, web, credits=credits, below=5_000)
    assert len(automatic(app, team_id)) == queued


def test_a_balance_left_exactly_at_the_threshold_queues_no_top_up_and_one_credit_below_does(app, web):
    team_id = turned_on(app, web, credits=5_010, below=5_000)
    spend(app, team_id, 10)
    assert automatic(app, team_id) == []
    spend(app, team_id, 1)
    assert [p.status for p in automatic(app, team_id)] == [PaymentStatus.QUEUED]
