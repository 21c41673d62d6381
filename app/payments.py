"""Stripe Checkout top-ups: packs, sessions, and the webhook events that move credits."""

import logging
from dataclasses import dataclass

from sqlalchemy import select

from app import billing
from app.extensions import db
from app.models import Payment, StripeEvent, User, utcnow

log = logging.getLogger(__name__)

TOPUP = "topup"
PAYMENT_REFUND = "payment_refund"
CHARGEBACK = "chargeback"


@dataclass(frozen=True)
class Pack:
    id: str
    credits: int
    price_cents: int

    @property
    def price(self) -> str:
        return f"{self.price_cents / 100:,.2f}"


def parse_packs(raw: str) -> list[Pack]:
    """`id:credits:price_cents, …` → packs. Raises ValueError, so a bad setting fails at start-up."""
    packs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            pack_id, credits, price = item.split(":")
            pack = Pack(pack_id.strip(), int(credits), int(price))
        except ValueError:
            raise ValueError(f"CREDIT_PACKS entry {item!r} is not id:credits:price_cents") from None
        if not pack.id or pack.credits <= 0 or pack.price_cents <= 0:
            raise ValueError(f"CREDIT_PACKS entry {item!r} needs a name and positive numbers")
        packs.append(pack)
    return packs


def start_checkout(client, user: User, pack: Pack, currency: str, success_url: str, cancel_url: str) -> str:
    """Create a Checkout Session for `pack` and record it; return the URL to send the browser to.

    The credits to grant are recorded here, from our own configuration: the webhook
    credits this number, never one taken from a request.
    """
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "client_reference_id": str(user.id),
            "customer_email": user.email,
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": currency,
                        "unit_amount": pack.price_cents,
                        "product_data": {"name": f"{pack.credits:,} kokoro-pay credits"},
                    },
                }
            ],
            "metadata": {"user_id": str(user.id), "pack": pack.id, "credits": str(pack.credits)},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
    )
    db.session.add(
        Payment(
            user_id=user.id,
            checkout_session_id=session.id,
            pack=pack.id,
            credits=pack.credits,
            amount_cents=pack.price_cents,
            currency=currency,
            status="open",
        )
    )
    return session.url


def record_event(event) -> None:
    """Claim the event id; IntegrityError at flush means it was handled already."""
    db.session.add(StripeEvent(id=event.id, type=event.type, outcome="received"))
    db.session.flush()


def handle_event(event) -> str:
    """Apply one verified event; return what happened, for the log and the event row."""
    record_event(event)
    obj = event.data.object
    if event.type == "checkout.session.completed":
        outcome = _fulfill(obj) if obj.payment_status == "paid" else _set_status(obj, "pending")
    elif event.type == "checkout.session.async_payment_succeeded":
        outcome = _fulfill(obj)
    elif event.type == "checkout.session.async_payment_failed":
        outcome = _set_status(obj, "failed")
    elif event.type == "charge.refunded":
        outcome = _reverse(obj.payment_intent, obj.amount_refunded, obj.amount, PAYMENT_REFUND, event.id, "refunded")
    elif event.type == "charge.dispute.closed" and obj.status == "lost":
        outcome = _reverse(obj.payment_intent, obj.amount, obj.amount, CHARGEBACK, event.id, "disputed")
    else:
        outcome = "ignored"
    db.session.get(StripeEvent, event.id).outcome = outcome[:200]
    log.info("stripe event %s (%s): %s", event.id, event.type, outcome)
    return outcome


def _payment_for_session(session_obj) -> Payment | None:
    payment = db.session.scalar(select(Payment).where(Payment.checkout_session_id == session_obj.id).with_for_update())
    if payment is not None and str(payment.user_id) != str(session_obj.client_reference_id):
        log.warning("checkout session %s names another user; ignored", session_obj.id)
        return None
    return payment


def _fulfill(session_obj) -> str:
    payment = _payment_for_session(session_obj)
    if payment is None:
        return "unknown checkout session"
    if payment.paid_at is not None:
        return "already credited"
    payment.status = "paid"
    payment.paid_at = utcnow()
    payment.payment_intent_id = session_obj.payment_intent
    balance = billing.apply(
        payment.user_id,
        payment.credits,
        kind=TOPUP,
        reference=f"topup:{payment.checkout_session_id}",
        note=f"{payment.pack} pack, {payment.amount_cents / 100:.2f} {payment.currency.upper()}",
    )
    return f"credited {payment.credits} to user {payment.user_id}; balance {balance}"


def _set_status(session_obj, status: str) -> str:
    payment = _payment_for_session(session_obj)
    if payment is None:
        return "unknown checkout session"
    if payment.paid_at is None:
        payment.status = status
    return f"payment {status}"


def _reverse(payment_intent: str | None, amount: int, total: int, kind: str, event_id: str, status: str) -> str:
    """Take back the credits of the refunded or disputed share of a paid top-up.

    Never below zero: what the balance cannot cover stays recorded in
    `credits_reversed` and the ledger note, for the operator.
    """
    payment = (
        db.session.scalar(select(Payment).where(Payment.payment_intent_id == payment_intent).with_for_update())
        if payment_intent
        else None
    )
    if payment is None or payment.paid_at is None:
        return "no credited payment for this charge"
    owed = payment.credits * min(amount, total) // total if total else payment.credits
    due = owed - payment.credits_reversed
    if due <= 0:
        return "already reversed"
    balance = db.session.scalar(select(User.balance).where(User.id == payment.user_id).with_for_update())
    taken = min(due, balance)
    payment.credits_reversed += due
    payment.status = status
    note = f"{status} payment {payment.checkout_session_id}"
    if taken < due:
        note += f"; {due - taken} credits already spent"
    if taken:
        billing.apply(payment.user_id, -taken, kind=kind, reference=f"{kind}:{event_id}", note=note)
    return f"took back {taken} of {due} credits from user {payment.user_id}"
