"""The buyer of automatic top-ups (app/card_payments.py), to the field: what it asks Stripe for, what it
records of each answer, what it tells the team and what the log says.

tests/test_auto_topups.py walks the whole flow (queueing, paying, crediting, crashes and races); these
pin the words and numbers a customer, Stripe or an operator reads.
"""

import logging
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import card_payments, services
from app.extensions import db
from app.models import LedgerEntry, Payment, PaymentStatus, Team, utcnow
from tests import factories
from tests.stripe_helpers import FakeStripe
from tests.test_auto_topups import OWNER, a_day_passes, automatic, buy, spend, succeeded, team_row, turned_on

LOGGER = "app.card_payments"


def logged(caplog, level=logging.WARNING) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER and record.levelno == level]


def row(app, payment_id: int) -> Payment:
    with app.app_context():
        payment = db.session.get(Payment, payment_id)
        db.session.expunge(payment)
        return payment


def invoice(app, limit: int = 50) -> dict:
    """One call of the invoicer (rounds of `limit`): how many invoices it made, left for later and voided."""
    with app.app_context():
        return dict(card_payments.invoice_due(services.stripe_client(), limit))


def test_stripe_is_asked_for_exactly_this_top_up_and_its_invoice(app, web, client, stripe_api, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    key = queued.idempotency_key
    assert buy(app) == {"sent": 1}
    ((params, _),) = stripe_api.called("POST", "/v1/payment_intents")
    assert params == {
        "amount": "500",
        "currency": "usd",
        "customer": FakeStripe.CUSTOMER,
        "payment_method": "pm_test_1",
        "off_session": "true",
        "confirm": "true",
        "description": "10,000 kokoro-pay credits (automatic top-up)",
        "metadata[kokoro_pay_auto_topup]": key,
        "metadata[team_id]": str(team_id),
        "metadata[pack]": "starter",
        "metadata[credits]": "10000",
    }
    assert logged(caplog, logging.INFO) == [f"automatic top-up {key}: payment intent pi_auto_1 succeeded"]

    succeeded(client, queued)
    with app.app_context():
        (note,) = db.session.scalars(select(LedgerEntry.note).where(LedgerEntry.payment_id == queued.id))
    assert note == "starter pack, automatic top-up, 5.00 USD"
    assert invoice(app, limit=1) == {"invoiced": 1}
    description = "10,000 kokoro-pay credits (automatic top-up, starter pack)"
    ((created, _),) = stripe_api.called("POST", "/v1/invoices")[:1]
    assert created == {
        "customer": FakeStripe.CUSTOMER,
        "collection_method": "charge_automatically",
        "auto_advance": "false",
        "pending_invoice_items_behavior": "exclude",
        "description": description,
        "metadata[kokoro_pay_auto_topup]": key,
        "metadata[team_id]": str(team_id),
    }
    ((item, _),) = stripe_api.called("POST", "/v1/invoiceitems")
    assert item == {
        "customer": FakeStripe.CUSTOMER,
        "invoice": "in_test_1",
        "amount": "500",
        "currency": "usd",
        "description": description,
    }
    ((finalize, _),) = stripe_api.called("POST", "/v1/invoices/in_test_1/finalize")
    assert finalize == {"auto_advance": "false"}


@pytest.mark.parametrize(
    "status, ends, paused",
    [
        ("processing", PaymentStatus.PROCESSING, False),
        ("requires_action", PaymentStatus.ACTION_REQUIRED, True),
        ("requires_payment_method", PaymentStatus.FAILED, True),
    ],
)
def test_an_answer_without_an_error_is_taken_by_the_intents_status(app, web, stripe_api, caplog, status, ends, paused):
    stripe_api.intent_status = status
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    assert buy(app) == {("failed" if paused else "sent"): 1}
    payment = row(app, queued.id)
    assert (payment.status, payment.payment_intent_id, payment.claimed_until) == (ends, "pi_auto_1", None)
    team = team_row(app, team_id)
    if not paused:
        assert payment.failure is None and team.auto_topup_paused is None
        assert factories.mails(app, OWNER, "auto_topup_paused") == []
        return
    said = f"Stripe did not take the payment ({status})."
    assert payment.failure == team.auto_topup_paused == said
    (notice,) = factories.mails(app, OWNER, "auto_topup_paused")
    assert said in notice.body and "nothing was charged" in notice.body
    assert ("confirm" in notice.body.lower()) is (ends == PaymentStatus.ACTION_REQUIRED)
    assert logged(caplog) == [f"automatic top-up {queued.idempotency_key} of team {team_id} failed ({ends}): {said}"]


@pytest.mark.parametrize(
    "outcome, ends",
    [("declined", PaymentStatus.FAILED), ("declined_for_authentication", PaymentStatus.ACTION_REQUIRED)],
)
def test_a_declined_card_keeps_stripes_words_and_the_intent_its_error_names(app, web, stripe_api, outcome, ends):
    # The decline code (not only the error's code) says when the card holder must confirm.
    stripe_api.intent_outcome = outcome
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    assert buy(app) == {"failed": 1}
    payment = row(app, queued.id)
    said = "Your card has insufficient funds." if outcome == "declined" else "Your card was declined. This trans"
    assert payment.status == ends and payment.failure.startswith(said)
    assert payment.payment_intent_id == "pi_auto_1"


def test_stripes_words_are_kept_to_400_characters_and_a_missing_message_names_the_request(app, web, stripe_api):
    stripe_api.intent_outcome = "declined"
    stripe_api.error_message = "x" * 450
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    buy(app)
    assert row(app, queued.id).failure == "x" * 400

    stripe_api.intent_outcome, stripe_api.error_message = "down", ""
    other = owner_with_a_queued_top_up(app, web, "other@example.com")
    assert buy(app) == {"later": 1}
    (request_id,) = [headers["Request-Id"] for headers in stripe_api.answered[-1:]]
    assert row(app, other).failure == f"Try 1: Request {request_id}: <empty message>"


def owner_with_a_queued_top_up(app, web, email: str) -> int:
    """Another team, signed in as `web`, with a card and a queued automatic top-up; the payment's id."""
    web.post("/logout")
    (queued,) = automatic(app, turned_on(app, web, credits=100, email=email))
    return queued.id


def test_stripe_out_of_reach_is_tried_after_a_wait_that_doubles_to_half_an_hour(app, web, stripe_api, caplog):
    assert [card_payments.retry_delay(n).total_seconds() for n in range(9)] == [
        30,
        30,
        60,
        120,
        240,
        480,
        960,
        1800,
        1800,
    ]
    stripe_api.intent_outcome = "down"
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    for attempt, wait in ((1, 30), (2, 60), (3, 120)):
        before = utcnow()
        assert buy(app) == {"later": 1}
        payment = row(app, queued.id)
        assert payment.attempts == attempt and payment.claimed_until is None
        assert before + timedelta(seconds=wait) <= payment.next_attempt_at <= utcnow() + timedelta(seconds=wait)
        assert payment.failure == f"Try {attempt}: Stripe is having a moment."
        with app.app_context():
            db.session.get(Payment, queued.id).next_attempt_at = before
            db.session.commit()
    request_ids = [headers["Request-Id"] for headers in stripe_api.answered]
    assert logged(caplog) == [
        f"automatic top-up {queued.idempotency_key} not sent (try {attempt}): "
        f"Request {request_id}: Stripe is having a moment."
        for attempt, request_id in zip((1, 2, 3), request_ids, strict=True)
    ]


def test_a_claim_is_one_buyers_for_two_minutes_and_takes_only_its_own_row(app, web, stripe_api, monkeypatch):
    first = automatic(app, turned_on(app, web, credits=100))[0].id
    second = owner_with_a_queued_top_up(app, web, "other@example.com")
    now = utcnow()
    monkeypatch.setattr(card_payments, "utcnow", lambda: now)
    with app.app_context():
        claimed = card_payments._claim(first)
        assert (claimed.id, claimed.attempts, claimed.claimed_until) == (first, 1, now + timedelta(minutes=2))
        assert card_payments._claim(first) is None  # another buyer, meanwhile
        # Up to the very instant the claim ends.
        monkeypatch.setattr(card_payments, "utcnow", lambda: now + timedelta(minutes=2))
        assert card_payments._claim(first) is None
        monkeypatch.setattr(card_payments, "utcnow", lambda: now + timedelta(minutes=2, microseconds=1))
        assert card_payments._claim(first).attempts == 2
    untouched = row(app, second)
    assert (untouched.attempts, untouched.claimed_until) == (0, None)
    with app.app_context():
        db.session.get(Payment, second).status = PaymentStatus.PROCESSING
        db.session.commit()
        assert card_payments._claim(second) is None  # sent meanwhile: not queued any more


def test_a_top_up_is_sent_up_to_23_hours_after_it_was_queued_and_then_called_off(
    app, web, stripe_api, monkeypatch, caplog
):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    monkeypatch.setattr(card_payments, "utcnow", lambda: queued.created_at + timedelta(hours=23))
    assert buy(app) == {"sent": 1}

    other = owner_with_a_queued_top_up(app, web, "other@example.com")
    a_day_passes(app, other)
    monkeypatch.undo()
    assert buy(app) == {"called off": 1}
    called_off = row(app, other)
    assert (called_off.status, called_off.failure) == (PaymentStatus.EXPIRED, "Called off: not sent within a day.")
    assert logged(caplog) == [f"automatic top-up {called_off.idempotency_key} was not sent within a day: called off"]


def test_no_saved_card_says_nothing_was_charged_only_when_nothing_was_ever_sent(app, web, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (first,) = automatic(app, team_id)
    with app.app_context():
        db.session.get(Team, team_id).card_payment_method = None
        db.session.commit()
    assert buy(app) == {"failed": 1}
    assert row(app, first.id).failure == "No card is saved for automatic top-ups."
    (notice,) = factories.mails(app, OWNER, "auto_topup_paused")
    assert "nothing was charged" in notice.body

    stripe_api.intent_outcome = "down"
    other = owner_with_a_queued_top_up(app, web, "other@example.com")
    assert buy(app) == {"later": 1}  # tried once: it may have reached Stripe
    with app.app_context():
        payment = db.session.get(Payment, other)
        db.session.get(Team, payment.team_id).card_payment_method = None
        payment.next_attempt_at = payment.created_at
        db.session.commit()
    assert buy(app) == {"failed": 1}
    (notice,) = factories.mails(app, "other@example.com", "auto_topup_paused")
    assert "did not go through:" in notice.body and "nothing was charged" not in notice.body


def paid_top_ups(app, web, client, count: int) -> list[int]:
    """`count` teams' automatic top-ups, each sent and credited; their payments' ids."""
    ids = []
    for n in range(count):
        if n:
            ids.append(owner_with_a_queued_top_up(app, web, f"team{n}@example.com"))
        else:
            ids.append(automatic(app, turned_on(app, web, credits=100))[0].id)
    buy(app)
    for payment_id in ids:
        succeeded(client, row(app, payment_id), intent_id=row(app, payment_id).payment_intent_id)
    return ids


def test_invoices_are_made_oldest_first_a_round_at_a_time_and_tried_again_in_15_minutes(
    app, web, client, stripe_api, caplog
):
    ids = paid_top_ups(app, web, client, 3)
    with app.app_context():
        # The oldest row written last: PostgreSQL then keeps its new version after the others' (a scan
        # without an order would meet it last).
        db.session.get(Payment, ids[0]).next_attempt_at = utcnow() - timedelta(minutes=1)
        db.session.commit()
    assert invoice(app, limit=1) == {"invoiced": 1}  # a round of one
    assert [bool(row(app, payment_id).invoice_id) for payment_id in ids] == [True, False, False]

    stripe_api.refuse_attach = True
    before = utcnow()
    assert invoice(app) == {"later": 2}
    for payment_id in ids[1:]:
        waiting = row(app, payment_id)
        assert waiting.invoice_id is None
        assert before + timedelta(minutes=15) <= waiting.next_attempt_at <= utcnow() + timedelta(minutes=15)
    keys = [row(app, payment_id).idempotency_key for payment_id in ids[1:]]
    refused = [answer["Request-Id"] for answer in stripe_api.answered_to("attach_payment")[1:]]
    assert logged(caplog) == [
        f"automatic top-up {key}: no invoice yet: Request {request_id}: This invoice cannot take payments."
        for key, request_id in zip(keys, refused, strict=True)
    ]


def test_each_invoice_not_finished_within_a_day_is_voided_though_one_cannot_be_yet(
    app, web, client, stripe_api, caplog
):
    ids = paid_top_ups(app, web, client, 3)
    stripe_api.refuse_attach = True
    with app.app_context():
        assert dict(card_payments.invoice_due(services.stripe_client())) == {"later": 3}
        for payment in db.session.scalars(select(Payment).where(Payment.id.in_(ids))):
            payment.paid_at -= timedelta(hours=23)
        db.session.commit()
    drafts = [row(app, payment_id).draft_invoice_id for payment_id in ids]
    assert all(drafts)
    caplog.clear()
    # Finalised, open: voided (a draft would be deleted); Stripe refuses the first.
    stripe_api.invoice_status, stripe_api.refuse_void_of = "open", {drafts[0]}
    assert invoice(app) == {"voided": 2}
    assert [row(app, payment_id).draft_invoice_id for payment_id in ids] == [drafts[0], None, None]
    keys = [row(app, payment_id).idempotency_key for payment_id in ids]
    (refused,) = stripe_api.answered_to(f"{drafts[0]}")[-1:]
    assert logged(caplog) == [
        f"automatic top-up {keys[0]}: invoice {drafts[0]} not voided yet: "
        f"Request {refused['Request-Id']}: This invoice cannot be voided.",
        f"automatic top-up {keys[1]}: invoice {drafts[1]} never finished; voided",
        f"automatic top-up {keys[2]}: invoice {drafts[2]} never finished; voided",
    ]


def test_the_buyer_thread_also_makes_the_invoice_once_the_top_up_is_credited(make_app, stripe_api):
    app = make_app(TOPUP_WORKER=True, TOPUP_POLL_SECONDS=3600)
    web = factories.WebClient(app.test_client())
    team_id = turned_on(app, web, credits=100)  # below the threshold: queued at once, and the thread woken
    buyer = app.extensions["buyer"]

    def settled(check) -> bool:
        for _ in range(200):
            if check(automatic(app, team_id)[0]):
                return True
            threading.Event().wait(0.05)
        return False

    try:
        assert settled(lambda payment: payment.status == PaymentStatus.PROCESSING)
        succeeded(app.test_client(), automatic(app, team_id)[0])
        buyer.wake.set()
        assert settled(lambda payment: payment.invoice_id == "in_test_1")
    finally:
        buyer.stop()


def test_an_answer_that_comes_after_another_buyer_gave_the_top_up_up_still_notes_its_intent(app, web, stripe_api):
    # Buyer A asks Stripe a minute before the day is out; Stripe is slow, A's claim lapses, and buyer B,
    # past the day, gives the top-up up. A's answer then finds it ended, and notes the intent it names.
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)

    def meanwhile(path):
        if path == "/v1/payment_intents" and stripe_api.meanwhile is not None:
            stripe_api.meanwhile = None
            with app.app_context():
                payment = db.session.get(Payment, queued.id)
                payment.created_at -= timedelta(hours=24)
                payment.claimed_until = utcnow() - timedelta(seconds=1)
                db.session.commit()
                assert dict(card_payments.buy_due(services.stripe_client())) == {"failed": 1}

    stripe_api.meanwhile = meanwhile
    assert buy(app) == {"sent": 1}
    payment = row(app, queued.id)
    assert (payment.status, payment.payment_intent_id) == (PaymentStatus.FAILED, "pi_auto_1")
    assert payment.failure == (
        "Stripe could not be reached for a day. Should an earlier try have gone through, its credits "
        "arrive when Stripe confirms it."
    )


def test_an_unfinished_invoice_still_a_draft_is_deleted_not_voided(app, web, client, stripe_api):
    (payment_id,) = paid_top_ups(app, web, client, 1)
    stripe_api.refuse_attach = True
    with app.app_context():
        assert dict(card_payments.invoice_due(services.stripe_client())) == {"later": 1}
        db.session.get(Payment, payment_id).paid_at -= timedelta(hours=23)
        db.session.commit()
    draft = row(app, payment_id).draft_invoice_id
    stripe_api.invoice_status = "draft"
    assert invoice(app) == {"voided": 1}
    assert len(stripe_api.called("DELETE", f"/v1/invoices/{draft}")) == 1
    assert stripe_api.called("POST", f"/v1/invoices/{draft}/void") == []
    assert row(app, payment_id).draft_invoice_id is None


@pytest.mark.parametrize("outcome", ["succeeded", "declined"])
def test_what_stripe_answers_for_one_top_up_touches_no_other_teams(app, web, stripe_api, outcome):
    stripe_api.intent_outcome = outcome
    team_id = turned_on(app, web, credits=100)
    (mine,) = automatic(app, team_id)
    theirs = owner_with_a_queued_top_up(app, web, "other@example.com")
    with app.app_context():
        # Theirs waits for a later try: not due now.
        db.session.get(Payment, theirs).next_attempt_at = utcnow() + timedelta(hours=1)
        db.session.commit()
    assert buy(app) == {("sent" if outcome == "succeeded" else "failed"): 1}
    assert row(app, mine.id).payment_intent_id == "pi_auto_1"
    untouched = row(app, theirs)
    assert (untouched.status, untouched.payment_intent_id, untouched.failure, untouched.attempts) == (
        PaymentStatus.QUEUED,
        None,
        None,
        0,
    )


def test_a_card_error_that_names_no_payment_intent_fails_the_top_up_all_the_same(app, web, stripe_api):
    stripe_api.intent_outcome, stripe_api.error_intent = "declined", False
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    assert buy(app) == {"failed": 1}
    payment = row(app, queued.id)
    assert (payment.status, payment.payment_intent_id, payment.failure) == (
        PaymentStatus.FAILED,
        None,
        "Your card has insufficient funds.",
    )


def test_a_call_sends_every_due_top_up_oldest_first_whatever_the_rounds_size(app, web, stripe_api):
    # The oldest top-up is the later team's, and its row was written last: neither the teams' order (an index
    # on team_id) nor the order rows lie in (PostgreSQL keeps an updated row's new version after the others)
    # is the order they were queued in.
    first_team = turned_on(app, web, credits=6_000)
    first = owner_with_a_queued_top_up(app, web, "other@example.com")
    spend(app, first_team, 2_000)
    (second,) = [payment.id for payment in automatic(app, first_team)]
    with app.app_context():
        db.session.get(Payment, first).next_attempt_at = utcnow() - timedelta(minutes=1)
        db.session.commit()
    assert first < second
    assert buy(app, limit=1) == {"sent": 2}
    sent = [params["metadata[kokoro_pay_auto_topup]"] for params, _ in stripe_api.called("POST", "/v1/payment_intents")]
    assert sent == [row(app, first).idempotency_key, row(app, second).idempotency_key]


def test_rows_that_cannot_be_sent_now_end_a_call_at_once(app, web, stripe_api, monkeypatch):
    # One ended, one another buyer holds up to this very instant, one due later: nothing to send, and the
    # call returns (it does not go round them again and again).
    stripe_api.intent_outcome = "declined"
    ended = automatic(app, turned_on(app, web, credits=100))[0].id
    buy(app)
    held = owner_with_a_queued_top_up(app, web, "held@example.com")
    later = owner_with_a_queued_top_up(app, web, "later@example.com")
    now = utcnow()
    with app.app_context():
        db.session.get(Payment, held).claimed_until = now
        db.session.get(Payment, later).next_attempt_at = now + timedelta(microseconds=1)
        db.session.commit()
    monkeypatch.setattr(card_payments, "utcnow", lambda: now)
    assert buy(app, limit=1) == {}
    assert row(app, ended).status == PaymentStatus.FAILED
    # Due at this very instant: sent.
    monkeypatch.setattr(card_payments, "utcnow", lambda: now + timedelta(microseconds=1))
    assert buy(app, limit=1) == {"failed": 2}


def test_an_invoice_is_made_within_23_hours_of_the_payment_and_not_retried_before_15_minutes(
    app, web, client, stripe_api, monkeypatch
):
    ids = paid_top_ups(app, web, client, 3)
    with app.app_context():
        payments = [db.session.get(Payment, payment_id) for payment_id in ids]
        paid_at = payments[0].paid_at
        payments[1].paid_at = payments[2].paid_at = paid_at
        payments[2].paid_at -= timedelta(microseconds=1)
        db.session.commit()
    # 23 hours on: the first two are still due (a day's last instant), the third was paid a moment earlier:
    # left alone (nothing is asked of Stripe for it; with no invoice begun, nothing is voided either).
    monkeypatch.setattr(card_payments, "utcnow", lambda: paid_at + timedelta(hours=23) - timedelta(microseconds=1))
    assert invoice(app) == {"invoiced": 2}
    assert [bool(row(app, payment_id).invoice_id) for payment_id in ids] == [True, True, False]
    made = [
        h["Idempotency-Key"]
        for _, h in stripe_api.called("POST", "/v1/invoices")
        if h["Idempotency-Key"].endswith("-invoice")
    ]
    assert made == [f"{row(app, payment_id).idempotency_key}-invoice" for payment_id in ids[:2]]


def test_an_invoice_that_failed_waits_its_15_minutes_to_the_instant(app, web, client, stripe_api, monkeypatch):
    (payment_id,) = paid_top_ups(app, web, client, 1)
    stripe_api.refuse_attach = True
    now = utcnow()
    monkeypatch.setattr(card_payments, "utcnow", lambda: now)
    assert invoice(app) == {"later": 1}
    assert invoice(app) == {}  # not before its time
    stripe_api.refuse_attach = False
    monkeypatch.setattr(card_payments, "utcnow", lambda: now + timedelta(minutes=15))
    assert invoice(app) == {"invoiced": 1}


def test_an_unfinished_invoice_is_voided_from_the_23rd_hour_to_the_instant(app, web, client, stripe_api, monkeypatch):
    (payment_id,) = paid_top_ups(app, web, client, 1)
    stripe_api.refuse_attach = True
    assert invoice(app) == {"later": 1}
    paid_at = row(app, payment_id).paid_at
    monkeypatch.setattr(card_payments, "utcnow", lambda: paid_at + timedelta(hours=23))
    assert invoice(app) == {"voided": 1}
