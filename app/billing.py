"""Money: every change of a balance goes through here, with exactly one ledger row.

The functions change state inside the caller's transaction; the caller commits,
or rolls back on an exception, so a balance and its ledger row land together or
not at all.
"""

import uuid
from datetime import timedelta

from sqlalchemy import insert, select, update

from app.extensions import db
from app.models import ApiKey, LedgerEntry, SpeechRequest, User, new_request_id, utcnow

DEBIT = "debit"
REFUND = "refund"
GRANT = "grant"
DEDUCTION = "deduction"

CHARGED = "charged"
DELIVERED = "delivered"
REFUNDED = "refunded"


class InsufficientCredits(Exception):
    def __init__(self, balance: int, cost: int):
        super().__init__(f"balance {balance} is short of {cost}")
        self.balance = balance
        self.cost = cost


def apply(user_id: int, amount: int, *, kind: str, reference: str, note: str | None = None) -> int:
    """Add `amount` (signed) to the balance and write its ledger row; return the new balance.

    A negative amount is one conditional UPDATE, so no interleaving of concurrent
    debits can take a balance below zero; the CHECK constraint on users backs it up.
    A reused reference violates the ledger's unique constraint (IntegrityError).
    """
    stmt = update(User).where(User.id == user_id)
    if amount < 0:
        stmt = stmt.where(User.balance >= -amount)
    balance = db.session.execute(
        stmt.values(balance=User.balance + amount).returning(User.balance),
        execution_options={"synchronize_session": "fetch"},
    ).scalar()
    if balance is None:
        current = db.session.scalar(select(User.balance).where(User.id == user_id))
        if current is None:
            raise LookupError(f"no user {user_id}")
        raise InsufficientCredits(current, -amount)
    db.session.execute(
        insert(LedgerEntry).values(
            user_id=user_id,
            amount=amount,
            kind=kind,
            reference=reference,
            balance_after=balance,
            note=note[:500] if note else None,
            created_at=utcnow(),
        )
    )
    return balance


def grant(user: User, amount: int, reason: str) -> int:
    """Operator grant of `amount` (> 0) credits; returns the new balance."""
    if amount <= 0:
        raise ValueError("a grant must be a positive number of credits")
    return apply(user.id, amount, kind=GRANT, reference=f"grant:{uuid.uuid4().hex}", note=reason)


def deduct(user: User, amount: int, reason: str) -> int:
    """Operator deduction of `amount` (> 0) credits; InsufficientCredits if the balance is short."""
    if amount <= 0:
        raise ValueError("a deduction must be a positive number of credits")
    return apply(user.id, -amount, kind=DEDUCTION, reference=f"deduction:{uuid.uuid4().hex}", note=reason)


def charge_speech(
    user: User, key: ApiKey, *, characters: int, model: str, voice: str, response_format: str
) -> SpeechRequest:
    """Record a speech request and debit `characters` credits for it.

    Unlimited accounts are recorded with a charge of 0 and no ledger row.
    Raises InsufficientCredits, with nothing written, when the balance is short.
    """
    credits = 0 if user.unlimited else characters
    request_id = new_request_id()
    if credits:
        apply(user.id, -credits, kind=DEBIT, reference=f"speech:{request_id}", note=f"{characters} characters")
    speech = SpeechRequest(
        id=request_id,
        user_id=user.id,
        api_key_id=key.id,
        model=model,
        voice=voice,
        response_format=response_format,
        characters=characters,
        credits=credits,
        state=CHARGED,
    )
    db.session.add(speech)
    return speech


def _close_speech(request_id: str, state: str, details: dict):
    """Move a charged request to `state`; None when it was not in `charged` any more."""
    values = {"state": state, "finished_at": utcnow(), **details}
    if values.get("error"):
        values["error"] = values["error"][:500]
    return db.session.execute(
        update(SpeechRequest)
        .where(SpeechRequest.id == request_id, SpeechRequest.state == CHARGED)
        .values(**values)
        .returning(SpeechRequest.user_id, SpeechRequest.credits),
        execution_options={"synchronize_session": False},
    ).first()


def mark_delivered(request_id: str, **details) -> bool:
    """The audio went out: the charge stands. False if the request was already settled."""
    return _close_speech(request_id, DELIVERED, details) is not None


def refund_speech(request_id: str, reason: str, **details) -> bool:
    """Give a request's credits back, at most once and only after a charge.

    The state change from `charged` is the guard: a second call, or a call for a
    request already delivered, finds no charged row and does nothing.
    """
    row = _close_speech(request_id, REFUNDED, {**details, "error": reason})
    if row is None:
        return False
    user_id, credits = row
    if credits:
        apply(user_id, credits, kind=REFUND, reference=f"refund:{request_id}", note=reason)
    return True


STALE_REASON = "Never settled: the worker serving it stopped (crash or lost database connection)."


def stale_charges(older_than_seconds: int) -> list[str]:
    """Ids of requests still `charged` after `older_than_seconds`: their worker never settled them."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    return list(
        db.session.scalars(
            select(SpeechRequest.id)
            .where(SpeechRequest.state == CHARGED, SpeechRequest.created_at < cutoff)
            .order_by(SpeechRequest.created_at)
        )
    )
