"""Automatic top-ups at Stripe: the buyer that pays the queued ones with the team's saved card.

The buyer (`Buyer`: a thread in each gateway process, or `flask topups buy`) never runs inside a
request. For each queued automatic top-up (app/autotopup.py) it:

1. claims the row for CLAIM (several buyers never send one payment at once; a buyer that dies lets
   the claim lapse and another takes the row up again);
2. asks Stripe for an off-session PaymentIntent (`off_session`, `confirm`) with the row's
   Idempotency-Key. A crash between Stripe's answer and our commit, a timeout or a retry sends the
   same key again, and Stripe answers with the same PaymentIntent: one charge however often it is asked;
3. records what Stripe said: `processing` (the credits come with payment_intent.succeeded, in
   app/payments.py, and only there), or a failure. A declined card, one whose bank wants its holder
   (`authentication_required`, SCA) or a card that is gone pauses automatic top-up and mails the
   team's billing people; nothing is retried against it. Stripe out of reach is tried again with a
   doubling wait, for as long as Stripe keeps the key (a day), then given up as failed; a top-up no
   buyer took up within a day is called off unsent.

Once credited, an automatic top-up gets its invoice the same way, each step with a key of its own
(`invoice_due`): an invoice for the pack, finalised, with the payment attached, so it shows paid.
"""

import logging
from collections import Counter
from datetime import timedelta

import stripe
from flask import current_app, has_app_context
from flask_sqlalchemy.session import Session
from sqlalchemy import event, or_, select, update

from app import autotopup, billing
from app.extensions import db
from app.models import Payment, PaymentKind, PaymentStatus, Team, utcnow
from app.rounds import Rounds

log = logging.getLogger(__name__)

CLAIM = timedelta(minutes=2)
FIRST_RETRY_SECONDS = 30
LAST_RETRY_SECONDS = 1800
# Stripe keeps an idempotency key for 24 hours from its first use, which is after the queueing: no try
# is sent later than this after it (charge), so none goes under a key Stripe may have forgotten.
GIVE_UP_AFTER = timedelta(hours=23)
# Stripe's decline codes that need the card holder, not another try.
NEEDS_THE_CUSTOMER = ("authentication_required",)
METADATA_KEY = "kokoro_pay_auto_topup"


def failure_status(code: str | None) -> str:
    """What a declined payment is, by Stripe's decline code: one its bank wants the customer to confirm
    (SCA), or failed."""
    return PaymentStatus.ACTION_REQUIRED if code in NEEDS_THE_CUSTOMER else PaymentStatus.FAILED


def retry_delay(attempts: int) -> timedelta:
    return timedelta(seconds=min(FIRST_RETRY_SECONDS * 2 ** max(attempts - 1, 0), LAST_RETRY_SECONDS))


def _due_ids(limit: int) -> list[int]:
    now = utcnow()
    due = db.session.scalars(
        select(Payment.id)
        .where(
            Payment.kind == PaymentKind.AUTOMATIC,
            Payment.status == PaymentStatus.QUEUED,
            Payment.next_attempt_at <= now,
            or_(Payment.claimed_until.is_(None), Payment.claimed_until < now),
        )
        .order_by(Payment.id)
        .limit(limit)
    ).all()
    db.session.commit()
    return due


def _claim(payment_id: int) -> Payment | None:
    now = utcnow()
    claimed = db.session.execute(
        update(Payment)
        .where(
            Payment.id == payment_id,
            Payment.status == PaymentStatus.QUEUED,
            or_(Payment.claimed_until.is_(None), Payment.claimed_until < now),
        )
        .values(claimed_until=now + CLAIM, attempts=Payment.attempts + 1),
        execution_options={"synchronize_session": False},
    ).rowcount
    db.session.commit()
    return db.session.get(Payment, payment_id, populate_existing=True) if claimed else None


def buy_due(client: stripe.StripeClient, limit: int = 50) -> Counter:
    """Send every due automatic top-up to Stripe; returns how many were sent, failed and left for later."""
    outcome = Counter()
    while due := _due_ids(limit):
        for payment_id in due:
            payment = _claim(payment_id)
            if payment is not None:
                outcome[charge(client, payment)] += 1
        if len(due) < limit:
            break
    return outcome


def charge(client: stripe.StripeClient, payment: Payment) -> str:
    """Ask Stripe for the claimed payment and record its answer; returns "sent", "failed" or "later".

    A try is never sent once Stripe may have forgotten the key (GIVE_UP_AFTER from the queueing,
    which is before any try): one that was never tried is called off (a later debit queues a new
    one), one that was is given up, as it may have reached Stripe.
    """
    tried_before = payment.attempts > 1
    if utcnow() - payment.created_at > GIVE_UP_AFTER:
        if not tried_before:
            return _called_off(payment)
        failed(
            payment,
            PaymentStatus.FAILED,
            "Stripe could not be reached for a day. Should an earlier try have gone through, its credits "
            "arrive when Stripe confirms it.",
            charged_nothing=False,
        )
        db.session.commit()
        return "failed"
    team = db.session.get(Team, payment.team_id)
    if team.card_payment_method is None or team.stripe_customer_id is None:
        failed(
            payment, PaymentStatus.FAILED, "No card is saved for automatic top-ups.", charged_nothing=not tried_before
        )
        db.session.commit()
        return "failed"
    try:
        intent = client.v1.payment_intents.create(
            params={
                "amount": payment.amount_cents,
                "currency": payment.currency,
                "customer": team.stripe_customer_id,
                "payment_method": team.card_payment_method,
                "off_session": True,
                "confirm": True,
                "description": f"{payment.credits:,} kokoro-pay credits (automatic top-up)",
                "metadata": {
                    METADATA_KEY: payment.idempotency_key,
                    "team_id": str(payment.team_id),
                    "pack": payment.pack,
                    "credits": str(payment.credits),
                },
            },
            options={"idempotency_key": payment.idempotency_key},
        )
    except stripe.CardError as error:
        intent = getattr(error.error, "payment_intent", None)
        status = failure_status(getattr(error.error, "decline_code", None) or error.code)
        failed(payment, status, _said(error), intent.id if intent is not None else None)
        db.session.commit()
        return "failed"
    except stripe.InvalidRequestError as error:
        # The card or customer is gone at Stripe, or the request cannot be made: no retry helps.
        failed(payment, PaymentStatus.FAILED, f"The saved card cannot be charged: {_said(error)}")
        db.session.commit()
        return "failed"
    except stripe.StripeError as error:
        return _later(payment, error)
    return _sent(payment, intent)


def _said(error: stripe.StripeError) -> str:
    return (error.user_message or str(error) or type(error).__name__)[:400]


def _sent(payment: Payment, intent) -> str:
    """Stripe answered with a PaymentIntent: it is processing or succeeded (credited by its webhook), or it failed."""
    if intent.status in ("succeeded", "processing"):
        sent = db.session.execute(
            update(Payment)
            .where(Payment.id == payment.id, Payment.status == PaymentStatus.QUEUED)
            .values(status=PaymentStatus.PROCESSING, payment_intent_id=intent.id, claimed_until=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        if not sent:
            # Its webhook came first (credited, or failed): the intent's id is all there is to add.
            _note_intent(payment.id, intent.id)
        db.session.commit()
        log.info("automatic top-up %s: payment intent %s %s", payment.idempotency_key, intent.id, intent.status)
        return "sent"
    status = PaymentStatus.ACTION_REQUIRED if intent.status == "requires_action" else PaymentStatus.FAILED
    failed(payment, status, f"Stripe did not take the payment ({intent.status}).", intent.id)
    db.session.commit()
    return "failed"


def _note_intent(payment_id: int, intent_id: str) -> None:
    """The PaymentIntent Stripe made for the payment, unless one is noted already."""
    db.session.execute(
        update(Payment)
        .where(Payment.id == payment_id, Payment.payment_intent_id.is_(None))
        .values(payment_intent_id=intent_id)
        .execution_options(synchronize_session=False)
    )


def _end(payment: Payment, status: str, why: str, only: tuple) -> bool:
    """End the payment with `status` if it is still in one of `only`, and free its team for the next top-up;
    False when something else ended it first."""
    ended = db.session.execute(
        update(Payment)
        .where(Payment.id == payment.id, Payment.status.in_(only))
        .values(status=status, failure=why[:500], claimed_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if ended:
        autotopup.free(payment.team_id)
    return bool(ended)


def _called_off(payment: Payment) -> str:
    """A top-up no buyer took up for a day (none ran): called off unsent; the team is not paused."""
    _end(payment, PaymentStatus.EXPIRED, "Called off: not sent within a day.", (PaymentStatus.QUEUED,))
    db.session.commit()
    log.warning("automatic top-up %s was not sent within a day: called off", payment.idempotency_key)
    return "called off"


def _later(payment: Payment, error: stripe.StripeError) -> str:
    payment.claimed_until = None
    payment.next_attempt_at = utcnow() + retry_delay(payment.attempts)
    payment.failure = f"Try {payment.attempts}: {_said(error)}"[:500]
    db.session.commit()
    log.warning("automatic top-up %s not sent (try %s): %s", payment.idempotency_key, payment.attempts, error)
    return "later"


def failed(
    payment: Payment, status: str, reason: str, intent_id: str | None = None, charged_nothing: bool = True
) -> bool:
    """The payment failed (the buyer's answer or Stripe's payment_intent.payment_failed, whichever comes
    first): pause automatic top-up and tell the team's billing people, once. False when it had ended already.

    `charged_nothing`: Stripe said so (its answer to this key), or nothing was ever sent; else the mail
    does not claim it."""
    ended = _end(payment, status, reason, autotopup.IN_FLIGHT)
    if intent_id:
        _note_intent(payment.id, intent_id)
    if not ended:
        return False
    team = db.session.get(Team, payment.team_id)
    db.session.refresh(team, with_for_update=True)
    db.session.refresh(payment)
    log.warning("automatic top-up %s of team %s failed (%s): %s", payment.idempotency_key, team.id, status, reason)
    if team.auto_topup_paused is None:
        # Paused already (its card removed, say): its people were told then.
        pause_and_tell(team, reason, payment, status == PaymentStatus.ACTION_REQUIRED, charged_nothing)
    return True


def pause_and_tell(
    team: Team,
    reason: str,
    payment: Payment | None = None,
    needs_authentication: bool = False,
    charged_nothing: bool = True,
) -> None:
    """Pause the team's automatic top-up (its row locked by the caller) and mail its billing people why."""
    autotopup.pause(team, reason)
    billing.tell(
        "auto_topup_paused",
        team.id,
        team_name=team.name,
        payment=payment,
        reason=reason,
        needs_authentication=needs_authentication,
        charged_nothing=charged_nothing,
    )


def invoice_due(client: stripe.StripeClient, limit: int = 50) -> Counter:
    """Give each credited automatic top-up its invoice at Stripe, shown paid; returns how many were made,
    left for later, and voided (an invoice not finished within a day is voided, so none is left to pay)."""
    outcome = Counter()
    now = utcnow()
    waiting = (
        Payment.kind == PaymentKind.AUTOMATIC,
        Payment.paid_at.is_not(None),
        Payment.invoice_id.is_(None),
        Payment.payment_intent_id.is_not(None),
    )
    due = db.session.scalars(
        select(Payment)
        .where(
            *waiting,
            Payment.paid_at > now - GIVE_UP_AFTER,
            Payment.next_attempt_at <= now,
        )
        .order_by(Payment.id)
        .limit(limit)
    ).all()
    for payment in due:
        try:
            _make_invoice(client, payment)
            outcome["invoiced"] += 1
        except stripe.StripeError as error:
            db.session.rollback()
            payment.next_attempt_at = now + timedelta(minutes=15)
            log.warning("automatic top-up %s: no invoice yet: %s", payment.idempotency_key, error)
            outcome["later"] += 1
        db.session.commit()
    unfinished = db.session.scalars(
        select(Payment).where(*waiting, Payment.paid_at <= now - GIVE_UP_AFTER, Payment.draft_invoice_id.is_not(None))
    ).all()
    for payment in unfinished:
        try:
            _void(client, payment.draft_invoice_id)
        except stripe.StripeError as error:
            log.warning(
                "automatic top-up %s: invoice %s not voided yet: %s",
                payment.idempotency_key,
                payment.draft_invoice_id,
                error,
            )
            continue
        log.warning(
            "automatic top-up %s: invoice %s never finished; voided", payment.idempotency_key, payment.draft_invoice_id
        )
        payment.draft_invoice_id = None
        db.session.commit()
        outcome["voided"] += 1
    return outcome


def _void(client: stripe.StripeClient, invoice_id: str) -> None:
    """An unfinished invoice goes: voided once finalised, deleted while a draft."""
    invoice = client.v1.invoices.retrieve(invoice_id)
    if invoice.status == "draft":
        client.v1.invoices.delete(invoice_id)
    elif invoice.status == "open":
        client.v1.invoices.void_invoice(invoice_id)


def _make_invoice(client: stripe.StripeClient, payment: Payment) -> None:
    """The invoice, each step with its own key; its id is kept as soon as Stripe made it (committed), so an
    invoice never finished can be voided."""
    key = payment.idempotency_key
    customer = db.session.get(Team, payment.team_id).stripe_customer_id
    description = f"{payment.credits:,} kokoro-pay credits (automatic top-up, {payment.pack} pack)"
    invoice = client.v1.invoices.create(
        params={
            "customer": customer,
            "collection_method": "charge_automatically",
            "auto_advance": False,
            "pending_invoice_items_behavior": "exclude",
            "description": description,
            "metadata": {METADATA_KEY: key, "team_id": str(payment.team_id)},
        },
        options={"idempotency_key": f"{key}-invoice"},
    )
    payment.draft_invoice_id = invoice.id
    db.session.commit()
    client.v1.invoice_items.create(
        params={
            "customer": customer,
            "invoice": invoice.id,
            "amount": payment.amount_cents,
            "currency": payment.currency,
            "description": description,
        },
        options={"idempotency_key": f"{key}-item"},
    )
    client.v1.invoices.finalize_invoice(
        invoice.id, params={"auto_advance": False}, options={"idempotency_key": f"{key}-finalize"}
    )
    client.v1.invoices.attach_payment(
        invoice.id, params={"payment_intent": payment.payment_intent_id}, options={"idempotency_key": f"{key}-attach"}
    )
    payment.invoice_id, payment.draft_invoice_id = invoice.id, None


class Buyer(Rounds):
    """One buyer thread per process (app/rounds.py): woken when this process queues a top-up, and every
    TOPUP_POLL_SECONDS for those other processes queued and for retries."""

    name = "topup-buyer"

    def __init__(self, app, poll_seconds: float, client: stripe.StripeClient):
        super().__init__(app, poll_seconds)
        self.client = client

    def work(self) -> None:
        buy_due(self.client)
        invoice_due(self.client)


@event.listens_for(Session, "after_commit")
def _wake_the_buyer(session):
    if session.info.pop(autotopup.QUEUED, False) and has_app_context():
        buyer = current_app.extensions.get("buyer")
        if buyer is not None:
            buyer.wake.set()


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back_queueing(session, _previous_transaction):
    session.info.pop(autotopup.QUEUED, None)
