"""Automatic top-up: its settings and the rule that queues one (app/card_payments.py makes the payment).

A team with a saved card may ask: "when the balance falls below T credits, buy pack P, at most
N times a calendar month (UTC)". The rules, all here:

- **Queued by the debit, never made by it.** A speech debit that leaves the balance below T
  (billing.apply) calls `queue` in its own transaction: one Payment row (kind automatic, status
  queued) with the idempotency key every try of it sends to Stripe. The debit's UPDATE holds the
  team's row lock until it commits, and it read `auto_topup_pending` under that lock, so of any
  number of concurrent debits exactly one queues; a rollback takes the row back with the debit.
- **At most one in flight per team.** `auto_topup_pending` stays set from the queueing until the
  payment is credited or fails; a partial unique index on payments backs it.
- **A monthly cap.** Payments that were made or are in flight count (failed ones do not). When the
  cap is reached nothing is queued, and `auto_topup_capped_until` (the next month's start) keeps
  the debits after it from counting again.
- **Paused after a failure** (a declined card, one that needs its holder to authenticate, a removed
  card): `auto_topup_paused` holds why; nothing is queued until someone with billing rights turns
  it on again or a new card is saved. Nothing is ever retried against a card that needs the customer.
- **Credits come only from Stripe's webhook** (payment_intent.succeeded, app/payments.py), once.
"""

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text, update

from app import config, packs
from app.extensions import db, insert
from app.models import AUTOMATIC_IN_FLIGHT, Payment, PaymentKind, PaymentStatus, Team, User, utcnow
from app.packs import Pack

log = logging.getLogger(__name__)

# Where a transaction notes that it queued a top-up, so that the buyer thread wakes after the commit.
QUEUED = "automatic top-up queued"
MONTHLY_LIMIT_MAX = 100
# Statuses of automatic top-ups that count towards the month's cap: made, or on their way.
COUNTED = (
    PaymentStatus.QUEUED,
    PaymentStatus.PROCESSING,
    PaymentStatus.PAID,
    PaymentStatus.REFUNDED,
    PaymentStatus.DISPUTED,
)
IN_FLIGHT = (PaymentStatus.QUEUED, PaymentStatus.PROCESSING)
# The partial unique index that keeps one in flight per team (models.Payment, migration 0013).
IN_FLIGHT_INDEX = text(AUTOMATIC_IN_FLIGHT)


class NotAllowed(ValueError):
    """Settings that cannot be saved; the message says why, for the person who sent them."""


@dataclass(frozen=True)
class Settings:
    below: int
    pack: str
    monthly_limit: int


def month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(moment: datetime) -> datetime:
    start = month_start(moment)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def pack_named(name: str | None) -> Pack | None:
    return packs.named(config.current().credit_packs, name)


def check(below: int | None, pack: str | None, monthly_limit: int | None) -> Settings:
    """The settings as given, or NotAllowed naming what is wrong."""
    if below is None or not 1 <= below <= 10**12:
        raise NotAllowed("The threshold must be a whole number of credits, at least 1.")
    if pack_named(pack) is None:
        raise NotAllowed("Choose one of the credit packs.")
    if monthly_limit is None or not 1 <= monthly_limit <= MONTHLY_LIMIT_MAX:
        raise NotAllowed(f"The monthly cap must be between 1 and {MONTHLY_LIMIT_MAX} top-ups.")
    return Settings(below, pack, monthly_limit)


def turn_on(team: Team, person: User, settings: Settings) -> Payment | None:
    """Save the settings (and resume after a pause); queue a top-up now if the balance is below the threshold.

    Needs a saved card. The team's row is locked first, as a debit locks it, so a debit running
    meanwhile and this never both queue one.
    """
    db.session.refresh(team, with_for_update=True)
    if team.card_payment_method is None:
        raise NotAllowed("Save a card first: automatic top-ups pay with it.")
    team.auto_topup_below = settings.below
    team.auto_topup_pack = settings.pack
    team.auto_topup_monthly_limit = settings.monthly_limit
    team.auto_topup_by_id = person.id
    team.auto_topup_paused = None
    team.auto_topup_paused_at = None
    team.auto_topup_capped_until = None
    db.session.flush()
    if not team.unlimited and team.balance < settings.below and not team.auto_topup_pending:
        return queue(team.id)
    return None


def turn_off(team: Team) -> None:
    """Stop queueing; a top-up queued and never tried is called off. One tried already stays in flight until
    Stripe's answer to its key settles it: the try may have reached Stripe, which nothing here can know."""
    db.session.refresh(team, with_for_update=True)
    team.auto_topup_below = None
    team.auto_topup_paused = None
    team.auto_topup_paused_at = None
    team.auto_topup_capped_until = None
    now = utcnow()
    called_off = db.session.execute(
        update(Payment)
        .where(
            Payment.team_id == team.id,
            Payment.kind == PaymentKind.AUTOMATIC,
            Payment.status == PaymentStatus.QUEUED,
            Payment.attempts == 0,
            (Payment.claimed_until.is_(None)) | (Payment.claimed_until < now),
        )
        .values(status=PaymentStatus.EXPIRED, failure="Called off: automatic top-up was turned off before it was sent.")
        .execution_options(synchronize_session=False)
    ).rowcount
    if called_off:
        team.auto_topup_pending = False


def free(team_id: int) -> None:
    """The team's top-up in flight has ended (credited, failed or called off): the next may be queued."""
    db.session.execute(
        update(Team)
        .where(Team.id == team_id)
        .values(auto_topup_pending=False)
        .execution_options(synchronize_session=False)
    )


def pause(team: Team, reason: str) -> None:
    team.auto_topup_paused = reason[:200]
    team.auto_topup_paused_at = utcnow()


def counted_this_month(team_id: int, now: datetime) -> int:
    return db.session.scalar(
        select(func.count())
        .select_from(Payment)
        .where(
            Payment.team_id == team_id,
            Payment.kind == PaymentKind.AUTOMATIC,
            Payment.status.in_(COUNTED),
            Payment.created_at >= month_start(now),
        )
    )


def queue(team_id: int) -> Payment | None:
    """Queue the team's automatic top-up; None when its monthly cap is reached or its pack is gone.

    The caller holds the team's row lock (the debit's UPDATE, or turn_on) and saw nothing pending.
    """
    db.session.flush()
    team = db.session.get(Team, team_id, populate_existing=True)
    now = utcnow()
    pack = pack_named(team.auto_topup_pack)
    if pack is None:
        log.warning("team %s: automatic top-up pack %r is not sold any more; paused", team_id, team.auto_topup_pack)
        pause(team, f"The pack {team.auto_topup_pack!r} is not sold any more: choose another.")
        return None
    if counted_this_month(team_id, now) >= team.auto_topup_monthly_limit:
        team.auto_topup_capped_until = next_month(now)
        log.info("team %s: automatic top-up cap of %s this month reached", team_id, team.auto_topup_monthly_limit)
        return None
    key = f"kp-auto-topup-{uuid.uuid4().hex}"
    # ON CONFLICT with the one-in-flight index: should a top-up be in flight though the team did not say
    # so (the audit names that), the debit goes on and nothing more is queued, never an error.
    queued = db.session.execute(
        insert(Payment)
        .values(
            kind=PaymentKind.AUTOMATIC,
            status=PaymentStatus.QUEUED,
            team_id=team_id,
            bought_by_id=team.auto_topup_by_id,
            pack=pack.id,
            credits=pack.credits,
            amount_cents=pack.price_cents,
            currency=config.current().stripe_currency,
            idempotency_key=key,
            attempts=0,
            created_at=now,
            next_attempt_at=now,
        )
        .on_conflict_do_nothing(index_elements=[Payment.team_id], index_where=IN_FLIGHT_INDEX)
        .returning(Payment.id)
    ).scalar()
    team.auto_topup_pending = True
    db.session.flush()
    if queued is None:
        log.error("team %s: an automatic top-up is in flight already though none was pending; none queued", team_id)
        return None
    db.session.info[QUEUED] = True
    log.info("team %s: automatic top-up %s queued (%s pack)", team_id, key, pack.id)
    return db.session.get(Payment, queued)


def in_flight(team_id: int) -> Payment | None:
    return db.session.scalar(
        select(Payment).where(
            Payment.team_id == team_id, Payment.kind == PaymentKind.AUTOMATIC, Payment.status.in_(IN_FLIGHT)
        )
    )
