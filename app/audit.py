"""The books, checked: a set of named checks, each returning the offenders it finds.

`flask audit` runs them all and fails when any finds something. Notices (accounts
whose streams break off unusually often) are listed for the operator but do not fail.
"""

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, case, func, or_, select

from app import autotopup, config, keys
from app.extensions import db
from app.metering import kept_credits, stale_charges
from app.models import (
    ApiKey,
    LedgerEntry,
    LedgerKind,
    Membership,
    Payment,
    PaymentKind,
    PaymentReversal,
    PaymentStatus,
    SpeechRequest,
    SpeechState,
    Team,
    TeamRole,
    User,
    utcnow,
)
from app.payments import owed_credits, reversed_cents

# An account is named when at least this many of its recent streams broke off after audio went out,
LOOKBACK_DAYS = 30
MIN_BREAKS = 5
# and they are at least this share of its streams.
BREAK_SHARE = 0.2


# A team as the audit names it: its id, its name and its first owner's email, which the admin
# console's search finds (team and user ids are not the same numbers).
_FIRST_OWNER = (
    select(User.email)
    .join(Membership, Membership.user_id == User.id)
    .where(Membership.team_id == Team.id, Membership.role == TeamRole.OWNER)
    .order_by(Membership.id)
    .limit(1)
    .correlate(Team)
    .scalar_subquery()
)


def _team(team_id: int, name: str, owner: str | None) -> str:
    return f"team {team_id} ({name}, <{owner}>)" if owner else f"team {team_id} ({name}, no owner)"


def balances_match_ledgers() -> list[str]:
    ledger_sums = (
        select(LedgerEntry.team_id, func.sum(LedgerEntry.amount).label("total"))
        .group_by(LedgerEntry.team_id)
        .subquery()
    )
    total = func.coalesce(ledger_sums.c.total, 0)
    rows = db.session.execute(
        select(Team.id, Team.name, _FIRST_OWNER, Team.balance, total)
        .outerjoin(ledger_sums, ledger_sums.c.team_id == Team.id)
        .where((Team.balance != total) | (Team.balance < 0))
    )
    return [
        f"{_team(team_id, name, owner)}: balance {balance} but the ledger sums to {sums}"
        for team_id, name, owner, balance, sums in rows
    ]


def _ledger_sums(kind: str):
    """Per speech request, the sum of its ledger rows of `kind` (debits are negative)."""
    return (
        select(LedgerEntry.speech_request_id, func.sum(LedgerEntry.amount).label("amount"))
        .where(LedgerEntry.kind == kind)
        .group_by(LedgerEntry.speech_request_id)
        .subquery(kind)
    )


def speech_charges_match_ledger() -> list[str]:
    problems = []
    debit, refund = _ledger_sums(LedgerKind.DEBIT), _ledger_sums(LedgerKind.REFUND)
    rows = db.session.execute(
        select(
            SpeechRequest.id,
            SpeechRequest.state,
            SpeechRequest.credits,
            SpeechRequest.credits_refunded,
            debit.c.amount,
            refund.c.amount,
        )
        .outerjoin(debit, debit.c.speech_request_id == SpeechRequest.id)
        .outerjoin(refund, refund.c.speech_request_id == SpeechRequest.id)
    )
    for request_id, state, credits, credits_refunded, debited, refunded in rows:
        if credits and debited != -credits:
            problems.append(f"request {request_id}: charged {credits} credits but debited {debited}")
        if refunded is not None and state != SpeechState.REFUNDED:
            problems.append(f"request {request_id}: refunded {refunded} credits while {state}")
        if refunded is not None and debited is None:
            problems.append(f"request {request_id}: refunded without a charge")
        if state == SpeechState.REFUNDED and (refunded or 0) != credits_refunded:
            problems.append(f"request {request_id}: {credits_refunded} credits due back but {refunded or 0} refunded")
        if credits_refunded > credits:
            problems.append(f"request {request_id}: refunded {credits_refunded} of its {credits} credits")
    return problems


def refunds_cover_only_undelivered_audio() -> list[str]:
    """A refunded request keeps at least the share its delivered audio pays for."""
    rate = config.current().speech_chars_per_second
    rows = db.session.execute(
        select(
            SpeechRequest.id,
            SpeechRequest.credits,
            SpeechRequest.credits_refunded,
            SpeechRequest.characters,
            SpeechRequest.speed,
            SpeechRequest.audio_ms,
        ).where(SpeechRequest.state == SpeechState.REFUNDED, SpeechRequest.credits_refunded > 0)
    )
    problems = []
    for request_id, credits, refunded, characters, speed, audio_ms in rows:
        owed = kept_credits(credits, characters, speed, audio_ms, rate)
        if credits - refunded < owed:
            problems.append(
                f"request {request_id}: kept {credits - refunded} credits, but its {audio_ms} ms of "
                f"delivered audio pay for {owed}"
            )
    return problems


_SPEECH_KINDS = (LedgerKind.DEBIT, LedgerKind.REFUND)


def ledger_rows_have_requests() -> list[str]:
    """Debits and refunds name their speech request, and no other row names one."""
    rows = db.session.execute(
        select(LedgerEntry.reference, LedgerEntry.amount).where(
            LedgerEntry.kind.in_(_SPEECH_KINDS), LedgerEntry.speech_request_id.is_(None)
        )
    )
    problems = [f"ledger {reference}: {amount:+} credits for no speech request" for reference, amount in rows]
    rows = db.session.execute(
        select(LedgerEntry.reference, LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.speech_request_id).where(
            LedgerEntry.kind.not_in(_SPEECH_KINDS), LedgerEntry.speech_request_id.is_not(None)
        )
    )
    problems.extend(
        f"ledger {reference}: a {kind} of {amount:+} credits naming request {request_id}"
        for reference, kind, amount, request_id in rows
    )
    return problems


def ledger_causes_are_the_accounts_own() -> list[str]:
    """A ledger row's request or payment belongs to the row's own team."""
    problems = []
    causes = ((SpeechRequest, LedgerEntry.speech_request_id, "request"), (Payment, LedgerEntry.payment_id, "payment"))
    for cause, key, owner in causes:
        rows = db.session.execute(
            select(LedgerEntry.reference, LedgerEntry.amount, LedgerEntry.team_id, cause.team_id)
            .join(cause, key == cause.id)
            .where(LedgerEntry.team_id != cause.team_id)
        )
        problems.extend(
            f"ledger {reference}: {amount:+} credits of team {team_id} for a {owner} of team {other}"
            for reference, amount, team_id, other in rows
        )
    return problems


def no_stale_charges() -> list[str]:
    """No request is left `charged` by a gateway process that is gone (metering.stale_charges): settle has run."""
    stale = stale_charges(config.current().stale_charge_seconds)
    last_seen = func.coalesce(SpeechRequest.progress_at, SpeechRequest.created_at)
    rows = db.session.execute(select(SpeechRequest.id, last_seen).where(SpeechRequest.id.in_(stale)))
    return [
        f"request {request_id}: still charged, no progress since {seen:%Y-%m-%d %H:%M:%S} (run `flask speech settle`)"
        for request_id, seen in sorted(rows)
    ]


def payments_credited_once() -> list[str]:
    problems = []
    rows = db.session.execute(
        select(
            func.coalesce(Payment.checkout_session_id, Payment.idempotency_key),
            Payment.credits,
            Payment.paid_at,
            func.coalesce(func.sum(LedgerEntry.amount), 0),
            func.count(LedgerEntry.id),
        )
        .outerjoin(LedgerEntry, and_(LedgerEntry.payment_id == Payment.id, LedgerEntry.kind == LedgerKind.TOPUP))
        .group_by(Payment.id)
    )
    for session_id, credits, paid_at, topped_up, count in rows:
        if paid_at is not None and (count != 1 or topped_up != credits):
            problems.append(f"payment {session_id}: {credits} credits paid, {count} top-ups of {topped_up} in all")
        if paid_at is None and count:
            problems.append(f"payment {session_id}: credited {topped_up} but not paid")
    rows = db.session.execute(
        select(LedgerEntry.reference, LedgerEntry.kind).where(
            LedgerEntry.kind.in_(_PAYMENT_KINDS), LedgerEntry.payment_id.is_(None)
        )
    )
    problems.extend(f"ledger {reference}: {_PAYMENT_KINDS[kind]} for no payment" for reference, kind in rows)
    return problems


# The ledger rows a payment causes, as the audit names them.
_PAYMENT_KINDS = {
    LedgerKind.TOPUP: "a top-up",
    LedgerKind.PAYMENT_REFUND: "a refund's take-back",
    LedgerKind.CHARGEBACK: "a chargeback",
}


def reversals_applied() -> list[str]:
    """Every refund and lost dispute of a credited payment has taken its credits back."""
    payments = db.session.scalars(
        select(Payment).where(
            Payment.paid_at.is_not(None),
            Payment.payment_intent_id.in_(select(PaymentReversal.payment_intent_id)),
        )
    )
    problems = []
    for payment in payments:
        owed = owed_credits(payment, *reversed_cents(payment.payment_intent_id))
        if owed != payment.credits_reversed:
            problems.append(
                f"payment {payment.name}: its refunds and disputes owe {owed} credits "
                f"back but {payment.credits_reversed} were taken"
            )
    return problems


def key_use_matches_books() -> list[str]:
    """Each key's recorded use (`spent`, for the window it names) is what its requests since that window
    began were debited less what was refunded, by the ledger. A request of a later window would have
    moved the count on to it (keys.count_use), so one there that it never took in is named too."""
    problems = []
    for key_id, prefix, spent, window in db.session.execute(
        select(ApiKey.id, ApiKey.prefix, ApiKey.spent, ApiKey.spent_window).order_by(ApiKey.id)
    ):
        start, _ = keys.window_range(window)
        requests = select(SpeechRequest.id).where(SpeechRequest.api_key_id == key_id)
        if start is not None:
            requests = requests.where(SpeechRequest.created_at >= start)
        booked = -db.session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                LedgerEntry.kind.in_(_SPEECH_KINDS),
                LedgerEntry.speech_request_id.in_(requests),
            )
        )
        if booked != spent:
            problems.append(
                f"key {key_id} ({prefix}…): {spent} credits recorded as used in {window}, the ledger says {booked}"
            )
    return problems


def automatic_top_ups_in_step() -> list[str]:
    """Automatic top-ups (app/autotopup.py): a team says one is pending exactly when one is queued or at
    Stripe (at most one is: the database's unique index refuses a second), and each has its own
    idempotency key and no Checkout Session."""
    problems = []
    # One statement, so a credit committing meanwhile cannot show a team half-way.
    in_flight = (
        select(func.count())
        .where(
            Payment.team_id == Team.id, Payment.kind == PaymentKind.AUTOMATIC, Payment.status.in_(autotopup.IN_FLIGHT)
        )
        .scalar_subquery()
    )
    rows = db.session.execute(
        select(Team.id, Team.auto_topup_pending, in_flight).where(or_(Team.auto_topup_pending, in_flight > 0))
    )
    for team_id, pending, count in rows:
        if pending != (count > 0):
            state = "pending" if pending else "not pending"
            problems.append(f"team {team_id}: automatic top-up {state}, but {count} in flight")
    unnamed = db.session.scalar(
        select(func.count()).where(
            Payment.kind == PaymentKind.AUTOMATIC,
            or_(Payment.idempotency_key.is_(None), Payment.checkout_session_id.is_not(None)),
        )
    )
    if unnamed:
        problems.append(f"{unnamed} automatic top-ups without their own idempotency key")
    return problems


CHECKS = (
    balances_match_ledgers,
    speech_charges_match_ledger,
    refunds_cover_only_undelivered_audio,
    ledger_rows_have_requests,
    ledger_causes_are_the_accounts_own,
    no_stale_charges,
    payments_credited_once,
    reversals_applied,
    key_use_matches_books,
    automatic_top_ups_in_step,
)


def automatic_top_ups_without_an_answer() -> list[str]:
    """Automatic top-ups Stripe took more than a day ago whose payment_intent.succeeded (or failure) never
    came: the card may be charged and nothing credited. Check the webhook's events in Stripe."""
    rows = db.session.execute(
        select(Payment.team_id, Payment.idempotency_key, Payment.payment_intent_id).where(
            Payment.kind == PaymentKind.AUTOMATIC,
            Payment.status == PaymentStatus.PROCESSING,
            Payment.created_at < utcnow() - timedelta(days=1),
        )
    )
    return [
        f"team {team_id}: automatic top-up {key} ({intent}) at Stripe for over a day without its event"
        for team_id, key, intent in rows
    ]


def frequent_mid_stream_breaks() -> list[str]:
    """Teams whose streams often break off after audio went out (worth a look, not an error)."""
    since = utcnow() - timedelta(days=LOOKBACK_DAYS)
    broken = func.sum(
        case((and_(SpeechRequest.state == SpeechState.REFUNDED, SpeechRequest.bytes_sent > 0), 1), else_=0)
    )
    rows = db.session.execute(
        select(Team.id, Team.name, _FIRST_OWNER, broken, func.count(SpeechRequest.id))
        .join(SpeechRequest, SpeechRequest.team_id == Team.id)
        .where(SpeechRequest.created_at >= since)
        .group_by(Team.id, Team.name)
        .having(broken >= MIN_BREAKS)
    )
    return [
        f"{_team(team_id, name, owner)}: {breaks} of {total} streams in {LOOKBACK_DAYS} days broke off "
        "after audio went out"
        for team_id, name, owner, breaks, total in rows
        if breaks >= BREAK_SHARE * total
    ]


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)


def audit() -> Report:
    """Run every check; the offenders found, notices for the operator, and what was checked."""
    report = Report()
    for check in CHECKS:
        report.problems.extend(check())
    report.notices = frequent_mid_stream_breaks() + automatic_top_ups_without_an_answer()
    report.checked = {
        "users": db.session.scalar(select(func.count(User.id))),
        "ledger entries": db.session.scalar(select(func.count(LedgerEntry.id))),
        "speech requests": db.session.scalar(select(func.count(SpeechRequest.id))),
        "payments": db.session.scalar(select(func.count(Payment.id))),
    }
    return report
