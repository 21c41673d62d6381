"""`flask audit`: quiet on clean books, and names every kind of offender."""

from sqlalchemy import insert, update

from app import metering
from app.extensions import db
from app.models import LedgerEntry, Team, utcnow
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
