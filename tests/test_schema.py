"""The schema: the models and the migrations describe the same one (`flask db check` finds nothing
to add), and a migration that fills new columns from existing rows fills them right."""

import logging

from flask_migrate import downgrade, upgrade
from sqlalchemy import select, text

from app import billing, metering
from app.audit import audit
from app.extensions import db
from app.models import LedgerEntry, LedgerKind, Team, utcnow
from tests import factories


def test_the_migrations_match_the_models(runner):
    # Alembic's check fails (exit 1, "New upgrade operations detected") on any difference.
    result = runner.invoke(args=["db", "check"])
    assert result.exit_code == 0, result.output


def causes(app) -> dict[str, tuple]:
    with app.app_context():
        rows = db.session.execute(select(LedgerEntry.reference, LedgerEntry.speech_request_id, LedgerEntry.payment_id))
        return {reference: (request_id, payment_id) for reference, request_id, payment_id in rows}


def test_ledger_rows_written_before_their_causes_were_kept_get_them_from_their_references(app, customer):
    # Books as the service writes them: a request delivered, one refunded, a top-up, its partial refund
    # and a lost dispute, an operator's grant; and a debit whose request no longer exists.
    with app.app_context():
        delivered = factories.charge_speech(customer.team_id, 10).id
        metering.mark_delivered(delivered)
        refunded = factories.charge_speech(customer.team_id, 20).id
        metering.refund_speech(refunded, "upstream down", audio_ms=0)
        payment = factories.starter_payment(customer.team_id, "cs_test_a1_b2", paid_at=utcnow(), status="paid")
        db.session.flush()
        topup = billing.topup_reference(payment.checkout_session_id)
        billing.apply(customer.team_id, 10_000, kind=LedgerKind.TOPUP, reference=topup, payment_id=payment.id)
        for kind, owed in ((LedgerKind.PAYMENT_REFUND, 2_000), (LedgerKind.CHARGEBACK, 10_000)):
            reference = billing.reversal_reference(kind, payment.checkout_session_id, owed)
            billing.take_back(customer.team_id, 500, kind=kind, reference=reference, note="", payment_id=payment.id)
        billing.grant(db.session.get(Team, customer.team_id), 5, "goodwill")
        db.session.commit()
        payment_id = payment.id
    written = causes(app)
    assert written[f"speech:{delivered}"] == (delivered, None)
    assert written[f"refund:{refunded}"] == (refunded, None)
    paid = ("topup:", "payment_refund:", "chargeback:")
    assert {cause for reference, cause in written.items() if reference.startswith(paid)} == {(None, payment_id)}
    with app.app_context():
        downgrade(revision="0008")
        # Rows whose request or payment is not there, as a bug or a hand edit could have left them.
        for kind, amount, reference in (("debit", -5, "speech:req_gone"), ("topup", 7, "topup:cs_gone")):
            db.session.execute(
                text(
                    "INSERT INTO ledger_entries (user_id, amount, kind, reference, balance_after, created_at)"
                    " VALUES (:user_id, :amount, :kind, :reference, 0, CURRENT_TIMESTAMP)"
                ),
                {"user_id": customer.user_id, "amount": amount, "kind": kind, "reference": reference},
            )
            db.session.execute(
                text("UPDATE users SET balance = balance + :amount WHERE id = :id"),
                {"amount": amount, "id": customer.user_id},
            )
        db.session.commit()
        upgrade()
    assert causes(app) == {**written, "speech:req_gone": (None, None), "topup:cs_gone": (None, None)}
    with app.app_context():
        assert audit().problems == [
            "ledger speech:req_gone: -5 credits for no speech request",
            "ledger topup:cs_gone: a top-up for no payment",
        ]


def test_migrating_inside_the_app_leaves_the_logging_it_found(app):
    """Alembic's stderr handler is set up only where nothing else logs (the `flask db` command): one set
    up inside a test would stay bound to that test's captured stderr, closed when it ends."""
    before = list(logging.getLogger().handlers)
    with app.app_context():
        downgrade(revision="0011")
        upgrade()
    assert logging.getLogger().handlers == before
