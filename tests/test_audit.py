"""`flask audit`: quiet on clean books, and names every kind of offender."""

from datetime import timedelta

import pytest
from sqlalchemy import insert, update

from app import audit, metering
from app.extensions import db
from app.models import ApiKey, LedgerEntry, Payment, PaymentKind, Team, utcnow
from tests import factories


def test_the_audit_passes_on_clean_books(app, runner, customer):
    stale = factories.charged(app, customer.team_id, count=3)
    with app.app_context():
        metering.refund_speech(stale[0], "upstream down")
        metering.mark_delivered(stale[1])
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 0 and "Audit passed: 1 users, 5 ledger entries, 3 speech requests" in result.output


def ledger_row(team_id: int, amount: int, kind: str, reference: str, **cause) -> None:
    """A ledger row written behind the billing module's back, as a bug or a hand edit would."""
    db.session.execute(
        insert(LedgerEntry).values(
            team_id=team_id,
            amount=amount,
            kind=kind,
            reference=reference,
            balance_after=0,
            created_at=utcnow(),
            **cause,
        )
    )


def test_the_audit_names_every_kind_of_offender_and_exits_1(app, runner, customer):
    delivered, refunded = factories.charged(app, customer.team_id, count=2)
    other = factories.customer(app, balance=50)
    with app.app_context():
        metering.mark_delivered(delivered)
        metering.refund_speech(refunded, "upstream down")
        # A balance changed behind the ledger's back.
        db.session.execute(update(Team).where(Team.id == other.team_id).values(balance=75))
        # A refund for a delivered request, and one for a request that was never charged.
        ledger_row(customer.team_id, 10, "refund", f"refund:{delivered}", speech_request_id=delivered)
        ledger_row(customer.team_id, 7, "refund", "refund:req_ghost")
        # A paid Stripe payment that was never credited, and a top-up with no payment.
        factories.starter_payment(customer.team_id, "cs_lost", status="paid", paid_at=utcnow())
        ledger_row(other.team_id, 5, "topup", "topup:cs_forged")
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 1
    output = result.output
    assert f"team {other.team_id} (Personal, <{other.email}>): balance 75 but the ledger sums to 55" in output
    assert f"team {customer.team_id} (Personal, <{customer.email}>): balance 990 but the ledger sums to 1007" in output
    assert f"request {delivered}: refunded 10 credits while delivered" in output
    assert "ledger refund:req_ghost: +7 credits for no speech request" in output
    assert "payment cs_lost: 10000 credits paid, 0 top-ups of 0 in all" in output
    assert "ledger topup:cs_forged: a top-up for no payment" in output
    # The forged refund of a delivered request: the key's use no longer matches its books.
    prefix = customer.secret[:12]
    assert f"key {customer.key_id} ({prefix}…): 10 credits recorded as used in lifetime, the ledger says 0" in output
    assert "AUDIT FAILED: 7 problems" in output


def test_a_ledger_row_naming_a_request_its_kind_has_not_is_named(app, customer):
    """Only debits and refunds name a speech request; a grant naming one is a hand edit or a bug."""
    (request_id,) = factories.charged(app, customer.team_id)
    with app.app_context():
        ledger_row(customer.team_id, 5, "grant", "grant:goodwill", speech_request_id=request_id)
        db.session.execute(update(Team).where(Team.id == customer.team_id).values(balance=Team.balance + 5))
        db.session.commit()
        # Named once, as what it is: not as the key's use, which only debits and refunds are.
        assert audit.audit().problems == [f"ledger grant:goodwill: a grant of +5 credits naming request {request_id}"]


def test_the_audit_names_keys_in_the_order_they_were_made(app):
    first, second = factories.customer(app), factories.customer(app)
    with app.app_context():
        # The first key's row is written last: PostgreSQL then reads it last, unless asked for an order.
        for customer in (second, first):
            db.session.execute(update(ApiKey).where(ApiKey.id == customer.key_id).values(spent=7))
            db.session.commit()
        assert audit.audit().problems == [
            f"key {c.key_id} ({c.secret[:12]}…): 7 credits recorded as used in lifetime, the ledger says 0"
            for c in (first, second)
        ]


def automatic_payment(team_id: int, idempotency_key: str | None, **fields) -> Payment:
    """An automatic top-up's row as the worker writes it (or as a bug or a hand edit would), in the session."""
    session_id = fields.pop("checkout_session_id", None)
    fields = {"kind": PaymentKind.AUTOMATIC, "idempotency_key": idempotency_key, "next_attempt_at": utcnow(), **fields}
    return factories.starter_payment(team_id, session_id, **fields)


def test_the_audit_names_automatic_top_ups_out_of_step_with_their_teams(app):
    waiting, lost, sent, bought = (factories.customer(app).team_id for _ in range(4))
    with app.app_context():
        # Pending with nothing queued or at Stripe; queued while not pending; at Stripe while pending (in step).
        db.session.execute(update(Team).where(Team.id.in_((waiting, sent))).values(auto_topup_pending=True))
        automatic_payment(lost, "auto_lost", status="queued")
        automatic_payment(sent, "auto_sent", status="processing", payment_intent_id="pi_sent")
        # A Checkout purchase still open, which is no automatic top-up; and two failed automatic top-ups,
        # one without its own idempotency key, one with a Checkout Session.
        factories.starter_payment(bought, "cs_open")
        automatic_payment(bought, None, status="failed")
        automatic_payment(bought, "auto_checked_out", status="failed", checkout_session_id="cs_auto")
        db.session.commit()
        problems = audit.audit().problems
    assert sorted(problems) == sorted(
        [
            f"team {waiting}: automatic top-up pending, but 0 in flight",
            f"team {lost}: automatic top-up not pending, but 1 in flight",
            "2 automatic top-ups without their own idempotency key",
        ]
    )


def test_an_automatic_top_up_paid_and_never_credited_is_named_by_its_idempotency_key(app):
    team_id = factories.customer(app).team_id
    with app.app_context():
        automatic_payment(team_id, "auto_lost", status="paid", paid_at=utcnow(), payment_intent_id="pi_lost")
        db.session.commit()
        assert audit.audit().problems == ["payment auto_lost: 10000 credits paid, 0 top-ups of 0 in all"]


@pytest.mark.parametrize(("age", "told"), [(timedelta(days=1), False), (timedelta(days=1, microseconds=1), True)])
def test_a_top_up_at_stripe_is_told_of_once_a_whole_day_passed_without_its_event(app, monkeypatch, age, told):
    """A frozen clock: a day to the microsecond is still within time; one more is not."""
    now = utcnow()
    monkeypatch.setattr(audit, "utcnow", lambda: now)
    team_id = factories.customer(app).team_id
    with app.app_context():
        automatic_payment(team_id, "auto_waiting", status="processing", payment_intent_id="pi_1", created_at=now - age)
        # An older one that had its answer is not waiting for one.
        automatic_payment(team_id, "auto_failed", status="failed", payment_intent_id="pi_0", created_at=now - 3 * age)
        db.session.commit()
        notices = audit.audit().notices
    waiting = f"team {team_id}: automatic top-up auto_waiting (pi_1) at Stripe for over a day without its event"
    assert notices == ([waiting] if told else [])
