"""Money: every change of a balance goes through here, with exactly one ledger row.

The functions change state inside the caller's transaction; the caller commits,
or rolls back on an exception, so a balance and its ledger row land together or
not at all.
"""

import uuid
from datetime import timedelta

from sqlalchemy import bindparam, insert, select, update

from app.extensions import db
from app.models import LedgerEntry, SpeechRequest, User, new_request_id, utcnow

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


_users, _ledger = User.__table__, LedgerEntry.__table__
# Built once, as plain table statements: a speech request runs them on the hot path, and building an
# ORM statement per call (cache keys, session synchronisation) cost more CPU than the database work.
_CHANGE = (
    update(_users)
    .where(_users.c.id == bindparam("user_id"))
    .values(balance=_users.c.balance + bindparam("amount"))
    .returning(_users.c.balance)
)
# A debit applies only where the balance covers it: no interleaving of debits can go below zero.
_DEBIT = _CHANGE.where(_users.c.balance + bindparam("amount") >= 0)
_WRITE_LEDGER = insert(_ledger)
_RECORD_SPEECH = insert(SpeechRequest.__table__)


def apply(user_id: int, amount: int, *, kind: str, reference: str, note: str | None = None) -> int:
    """Add `amount` (signed) to the balance and write its ledger row; return the new balance.

    A negative amount is one conditional UPDATE, so no interleaving of concurrent
    debits can take a balance below zero; the CHECK constraint on users backs it up.
    A reused reference violates the ledger's unique constraint (IntegrityError).
    User objects already loaded in the session see the new balance after the commit.
    """
    balance = db.session.execute(_DEBIT if amount < 0 else _CHANGE, {"user_id": user_id, "amount": amount}).scalar()
    if balance is None:
        current = db.session.scalar(select(User.balance).where(User.id == user_id))
        if current is None:
            raise LookupError(f"no user {user_id}")
        raise InsufficientCredits(current, -amount)
    db.session.execute(
        _WRITE_LEDGER,
        {
            "user_id": user_id,
            "amount": amount,
            "kind": kind,
            "reference": reference,
            "balance_after": balance,
            "note": note[:500] if note else None,
            "created_at": utcnow(),
        },
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
    user_id: int,
    key_id: int,
    *,
    unlimited: bool,
    characters: int,
    model: str,
    voice: str,
    response_format: str,
) -> str:
    """Record a speech request and debit `characters` credits for it; return the request's id.

    Unlimited accounts are recorded with a charge of 0 and no ledger row.
    Raises InsufficientCredits, with nothing written, when the balance is short.
    """
    credits = 0 if unlimited else characters
    request_id = new_request_id()
    if credits:
        apply(user_id, -credits, kind=DEBIT, reference=f"speech:{request_id}", note=f"{characters} characters")
    db.session.execute(
        _RECORD_SPEECH,
        {
            "id": request_id,
            "user_id": user_id,
            "api_key_id": key_id,
            "model": model,
            "voice": voice,
            "response_format": response_format,
            "characters": characters,
            "credits": credits,
            "state": CHARGED,
            "created_at": utcnow(),
        },
    )
    return request_id


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
