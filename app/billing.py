"""Money: every change of a balance goes through here, with exactly one ledger row.

The functions change state inside the caller's transaction; the caller commits,
or rolls back on an exception, so a balance and its ledger row land together or
not at all. A ledger row names its cause with a foreign key (the speech request,
the payment), and its reference, built here and only here, makes each money event
happen once. A speech request's own life (charged → delivered | refunded) is
app/metering.py's; the mail that money events cause is app/notifications.py's.
"""

import uuid

from sqlalchemy import bindparam, exists, insert, select, update

from app import autotopup, config
from app.extensions import db
from app.models import LedgerEntry, LedgerKind, Team, utcnow


class InsufficientCredits(Exception):
    def __init__(self, balance: int, cost: int):
        super().__init__(f"balance {balance} is short of {cost}")
        self.balance = balance
        self.cost = cost


_teams, _ledger = Team.__table__, LedgerEntry.__table__
# Built once, as plain table statements: a speech request runs them on the hot path, and building an
# ORM statement per call (cache keys, session synchronisation) cost more CPU than the database work.
_CHANGE = (
    update(_teams)
    .where(_teams.c.id == bindparam("team_id"))
    .values(balance=_teams.c.balance + bindparam("amount"))
    .returning(
        _teams.c.balance,
        _teams.c.low_balance_credits,
        _teams.c.low_balance_sent_at,
        _teams.c.auto_topup_below,
        _teams.c.auto_topup_pending,
        _teams.c.auto_topup_paused,
        _teams.c.auto_topup_capped_until,
    )
)
# A debit applies only where the balance covers it: no interleaving of debits can go below zero.
_DEBIT = _CHANGE.where(_teams.c.balance + bindparam("amount") >= 0)
_WRITE_LEDGER = insert(_ledger)


def apply(
    team_id: int,
    amount: int,
    *,
    kind: str,
    reference: str,
    note: str | None = None,
    speech_request_id: str | None = None,
    payment_id: int | None = None,
) -> int:
    """Add `amount` (signed) to the balance and write its ledger row; return the new balance.

    The row points at its cause: the speech request a debit or refund is for (its row may be
    written later in the same transaction: the key is checked at commit), or the payment a
    top-up or reversal is for.

    A negative amount is one conditional UPDATE, so no interleaving of concurrent
    debits can take a balance below zero; the CHECK constraint on teams backs it up.
    A reused reference violates the ledger's unique constraint (IntegrityError).
    Team objects already loaded in the session see the new balance after the commit.
    A debit that takes the balance below the team's alert threshold queues the
    low-balance mail in the same transaction (see _low_balance_alert); a speech debit that
    leaves it below the team's automatic top-up threshold queues one top-up the same way
    (app/autotopup.py).
    """
    row = db.session.execute(_DEBIT if amount < 0 else _CHANGE, {"team_id": team_id, "amount": amount}).first()
    if row is None:
        current = db.session.scalar(select(Team.balance).where(Team.id == team_id))
        if current is None:
            raise LookupError(f"no team {team_id}")
        raise InsufficientCredits(current, -amount)
    balance, threshold, alerted_at, topup_below, topup_pending, topup_paused, topup_capped_until = row
    db.session.execute(
        _WRITE_LEDGER,
        {
            "team_id": team_id,
            "amount": amount,
            "kind": kind,
            "reference": reference,
            "balance_after": balance,
            "note": note[:500] if note else None,
            "speech_request_id": speech_request_id,
            "payment_id": payment_id,
        },
    )
    own_threshold = threshold is not None
    if not own_threshold:
        threshold = config.current().low_balance_credits
    if alerted_at is None and balance < threshold <= balance - amount:
        # Asked only at the crossing, so the debit's hot path never pays for it.
        if own_threshold or funded(team_id):
            _low_balance_alert(team_id, balance, threshold)
    elif alerted_at is not None and kind in _REARMING and balance >= threshold:
        db.session.execute(update(_teams).where(_teams.c.id == team_id).values(low_balance_sent_at=None))
    if (
        topup_below is not None
        and balance < topup_below
        and kind == LedgerKind.DEBIT
        and not topup_pending
        and topup_paused is None
        and (topup_capped_until is None or utcnow() >= topup_capped_until)
    ):
        # The row lock this debit holds makes it the only one to see nothing pending (app/autotopup.py).
        autotopup.queue(team_id)
    return balance


def hold(team_id: int) -> int:
    """Lock the team's row until this transaction ends, as a debit would; its balance."""
    return db.session.execute(_CHANGE, {"team_id": team_id, "amount": 0}).scalar()


# Credits that bring a balance back to its alert threshold or above arm the alert again.
_REARMING = (LedgerKind.TOPUP, LedgerKind.GRANT, LedgerKind.TRIAL)
# Credits a customer bought or an operator gave: unlike the free trial, they arm the default alert.
_FUNDING = (LedgerKind.TOPUP, LedgerKind.GRANT)


def funded(team_id: int) -> bool:
    """Whether the team ever had credits other than its free trial (bought, or an operator's grant)."""
    return db.session.scalar(select(exists().where(_ledger.c.team_id == team_id, _ledger.c.kind.in_(_FUNDING))))


def alert_threshold(team: Team) -> int:
    """The balance below which the team is alerted (0: never).

    Its own setting; else LOW_BALANCE_CREDITS once it has been funded. A team living on its
    free trial is not alerted by default: a trial as small as the threshold would cross it with
    its first sentence, and a visitor trying the service should not be greeted with an alarm.
    """
    if team.low_balance_credits is not None:
        return team.low_balance_credits
    return config.current().low_balance_credits if funded(team.id) else 0


# Where this transaction's money events that a team's people are told of are noted, as
# (kind of mail, team id, what it says), for app/notifications.py to queue before it commits.
TOLD = "money events to tell their teams"


def tell(kind: str, team_id: int, **facts) -> None:
    """Note a money event for its team's billing people: mailed if, and only if, this transaction commits."""
    db.session.info.setdefault(TOLD, []).append((kind, team_id, facts))


def _low_balance_alert(team_id: int, balance: int, threshold: int) -> None:
    """The one alert for a balance that crossed its threshold, noted with the debit that crossed it.

    The debit's UPDATE holds the team's row lock until this transaction ends, so the alert
    state it returned cannot change meanwhile: of any number of concurrent debits, exactly one
    sees the balance cross while the alert is armed. Its mail is queued in this transaction, before
    it commits (app/notifications.py): a rollback takes the alert and its mail together.
    """
    db.session.execute(update(_teams).where(_teams.c.id == team_id).values(low_balance_sent_at=utcnow()))
    tell("low_balance", team_id, balance=balance, threshold=threshold)


# The ledger's references, each built here and only here: the unique key that makes each money event
# happen once. "<kind>:<what caused it>"; a reversal's also names the running total it brings the
# payment to, so each step of a payment's reversal is applied once.
def speech_reference(request_id: str) -> str:
    return f"speech:{request_id}"


def refund_reference(request_id: str) -> str:
    return f"refund:{request_id}"


def topup_reference(payment_name: str) -> str:
    """A payment's credit; `payment_name` is its Checkout Session's id or its automatic top-up's key (Payment.name)."""
    return f"topup:{payment_name}"


def reversal_reference(kind: str, payment_name: str, owed: int) -> str:
    return f"{kind}:{payment_name}:{owed}"


def trial_reference(user_id: int) -> str:
    """The free trial of a person (once per person, on their personal team)."""
    return f"trial:{user_id}"


def take_back(team_id: int, due: int, *, kind: str, reference: str, note: str, payment_id: int) -> tuple[int, int]:
    """Take up to `due` credits back (a refunded or disputed payment); returns (taken, balance after).

    Never below zero: what the balance cannot cover is not taken, and the ledger note says how
    much was already spent. The team's row is locked first, so the amount read is the one taken.
    """
    balance = db.session.scalar(select(Team.balance).where(Team.id == team_id).with_for_update())
    taken = min(due, balance)
    if taken < due:
        note += f"; {due - taken} credits already spent"
    if taken:
        balance = apply(team_id, -taken, kind=kind, reference=reference, note=note, payment_id=payment_id)
    return taken, balance


def grant(team: Team, amount: int, reason: str) -> int:
    """Operator grant of `amount` (> 0) credits; returns the new balance."""
    if amount <= 0:
        raise ValueError("a grant must be a positive number of credits")
    return apply(team.id, amount, kind=LedgerKind.GRANT, reference=f"grant:{uuid.uuid4().hex}", note=reason)


def deduct(team: Team, amount: int, reason: str) -> int:
    """Operator deduction of `amount` (> 0) credits; InsufficientCredits if the balance is short."""
    if amount <= 0:
        raise ValueError("a deduction must be a positive number of credits")
    return apply(team.id, -amount, kind=LedgerKind.DEDUCTION, reference=f"deduction:{uuid.uuid4().hex}", note=reason)
