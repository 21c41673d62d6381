"""The books, checked: balances against ledgers, refunds against charges, payments against top-ups."""

from sqlalchemy import and_, func, literal, select

from app.extensions import db
from app.models import LedgerEntry, Payment, SpeechRequest, User


def _ledger_ref(prefix: str, column):
    return LedgerEntry.reference == literal(prefix) + column


def audit() -> tuple[list[str], dict]:
    """Every inconsistency found, as a line for the operator, and what was checked."""
    problems = []

    ledger_sums = (
        select(LedgerEntry.user_id, func.sum(LedgerEntry.amount).label("total"))
        .group_by(LedgerEntry.user_id)
        .subquery()
    )
    for user_id, email, balance, total in db.session.execute(
        select(User.id, User.email, User.balance, func.coalesce(ledger_sums.c.total, 0))
        .outerjoin(ledger_sums, ledger_sums.c.user_id == User.id)
        .where((User.balance != func.coalesce(ledger_sums.c.total, 0)) | (User.balance < 0))
    ):
        problems.append(f"user {user_id} <{email}>: balance {balance} but the ledger sums to {total}")

    debit = LedgerEntry.__table__.alias("debit")
    refund = LedgerEntry.__table__.alias("refund")
    rows = db.session.execute(
        select(SpeechRequest.id, SpeechRequest.state, SpeechRequest.credits, debit.c.amount, refund.c.amount)
        .outerjoin(debit, debit.c.reference == literal("speech:") + SpeechRequest.id)
        .outerjoin(refund, refund.c.reference == literal("refund:") + SpeechRequest.id)
    )
    for request_id, state, credits, debited, refunded in rows:
        if credits and debited != -credits:
            problems.append(f"request {request_id}: charged {credits} credits but debited {debited}")
        if refunded is not None and state != "refunded":
            problems.append(f"request {request_id}: refunded {refunded} credits while {state}")
        if refunded is not None and debited is None:
            problems.append(f"request {request_id}: refunded without a charge")
        if state == "refunded" and credits and refunded != credits:
            problems.append(f"request {request_id}: refunded {refunded} of its {credits} credits")

    for reference, amount in db.session.execute(
        select(LedgerEntry.reference, LedgerEntry.amount)
        .outerjoin(
            SpeechRequest,
            and_(
                LedgerEntry.kind.in_(("debit", "refund")),
                (LedgerEntry.reference == literal("speech:") + SpeechRequest.id)
                | (LedgerEntry.reference == literal("refund:") + SpeechRequest.id),
            ),
        )
        .where(LedgerEntry.kind.in_(("debit", "refund")), SpeechRequest.id.is_(None))
    ):
        problems.append(f"ledger {reference}: {amount:+} credits for no speech request")

    for session_id, credits, paid_at, topped_up, count in db.session.execute(
        select(
            Payment.checkout_session_id,
            Payment.credits,
            Payment.paid_at,
            func.coalesce(func.sum(LedgerEntry.amount), 0),
            func.count(LedgerEntry.id),
        )
        .outerjoin(LedgerEntry, _ledger_ref("topup:", Payment.checkout_session_id))
        .group_by(Payment.id)
    ):
        if paid_at is not None and (count != 1 or topped_up != credits):
            problems.append(f"payment {session_id}: {credits} credits paid, {count} top-ups of {topped_up} in all")
        if paid_at is None and count:
            problems.append(f"payment {session_id}: credited {topped_up} but not paid")

    for (reference,) in db.session.execute(
        select(LedgerEntry.reference)
        .outerjoin(Payment, _ledger_ref("topup:", Payment.checkout_session_id))
        .where(LedgerEntry.kind == "topup", Payment.id.is_(None))
    ):
        problems.append(f"ledger {reference}: a top-up for no payment")

    checked = {
        "users": db.session.scalar(select(func.count(User.id))),
        "ledger entries": db.session.scalar(select(func.count(LedgerEntry.id))),
        "speech requests": db.session.scalar(select(func.count(SpeechRequest.id))),
        "payments": db.session.scalar(select(func.count(Payment.id))),
    }
    return problems, checked
