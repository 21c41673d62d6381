"""Top-ups: Stripe Checkout sessions, and the webhook events that move credits.

Credits come only from here, from a signed event: checkout.session.completed (or its async
success) for a Checkout purchase, payment_intent.succeeded for an automatic top-up
(app/card_payments.py sends those), each credited once whatever the order and number of
deliveries. Refunds and lost disputes of either are taken back the same way.
"""

import hashlib
import logging
import re
from datetime import datetime

import stripe
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError

from app import autotopup, billing, card_payments, cards, config
from app.extensions import db
from app.models import (
    LedgerKind,
    Payment,
    PaymentKind,
    PaymentReversal,
    PaymentStatus,
    ReversalKind,
    StripeEvent,
    Team,
    User,
    utcnow,
)
from app.packs import Pack

log = logging.getLogger(__name__)
# The most cents a BIGINT column holds; Stripe's own limits are far below it.
MAX_CENTS = 2**63 - 1


class MalformedEvent(ValueError):
    """A signed event not shaped as Stripe sends its type (a field missing or of another kind, an amount
    that is negative, "lots", 2.5 or true): refused, nothing stored."""


class AlreadyProcessed(Exception):
    """The event's id (its one argument) is recorded already: a redelivery, applied before."""


def start_checkout(
    client, team: Team, buyer: User, pack: Pack, currency: str, success_url: str, cancel_url: str
) -> str:
    """Create a Checkout Session for `pack`, bought by `buyer` for `team`, and record it; return the URL
    to send the browser to.

    The credits to grant are recorded here, from our own configuration: the webhook
    credits this number, never one taken from a request, and never one that depends on tax.
    Stripe makes an invoice of it (invoice_creation), for the team's Stripe Customer: the
    team's own once it has one, else one Checkout makes and the webhook keeps for the team.
    With STRIPE_AUTOMATIC_TAX, Stripe adds the tax of the buyer's address on top of the price.
    """
    description = f"{pack.credits:,} kokoro-pay credits"
    params = {
        "mode": "payment",
        "client_reference_id": str(team.id),
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": currency,
                    "unit_amount": pack.price_cents,
                    "product_data": {"name": description},
                    **({"tax_behavior": "exclusive"} if config.current().stripe_automatic_tax else {}),
                },
            }
        ],
        "metadata": {"team_id": str(team.id), "pack": pack.id, "credits": str(pack.credits)},
        "invoice_creation": {
            "enabled": True,
            "invoice_data": {"description": description, "metadata": {"team_id": str(team.id), "pack": pack.id}},
        },
        "success_url": success_url,
        "cancel_url": cancel_url,
    }
    if team.stripe_customer_id:
        params["customer"] = team.stripe_customer_id
    else:
        params |= {"customer_email": buyer.email, "customer_creation": "always"}
    if config.current().stripe_automatic_tax:
        params |= {
            "automatic_tax": {"enabled": True},
            "billing_address_collection": "required",
            "tax_id_collection": {"enabled": True},
        }
        if team.stripe_customer_id:
            params["customer_update"] = {"address": "auto", "name": "auto"}
    session = client.v1.checkout.sessions.create(params=params)
    db.session.add(
        Payment(
            team_id=team.id,
            bought_by_id=buyer.id,
            checkout_session_id=session.id,
            pack=pack.id,
            credits=pack.credits,
            amount_cents=pack.price_cents,
            currency=currency,
        )
    )
    return session.url


def record_event(event) -> None:
    """Claim the event id; AlreadyProcessed when it was handled already (its unique key is taken).

    Only this insert's conflict means a redelivery: a conflict anywhere else is a bug, and the
    webhook answers it 500 so that Stripe sends the event again.
    """
    db.session.add(StripeEvent(id=event.id, type=event.type, outcome="received"))
    try:
        db.session.flush()
    except IntegrityError:
        raise AlreadyProcessed(event.id) from None


def handle_event(event, client=None) -> str:
    """Apply one verified event; return what happened, for the log and the event row.

    `client` (Stripe) is asked about the card a setup session or a customer's change saved;
    a StripeError then leaves the event unapplied, for Stripe to send again.

    Stripe does not guarantee the order of events: a refund or a lost dispute may arrive
    before the payment it reverses is credited. It is kept (payment_reversals) and applied
    when the payment is credited, so any order of arrival gives the same books.
    """
    check_shape(event)
    obj = event.data.object
    if db.session.get(StripeEvent, event.id) is not None:
        raise AlreadyProcessed(event.id)
    # Asked before anything is written: no lock is held while Stripe answers.
    card = cards.ask_stripe(client, event.type, obj)
    record_event(event)
    if isinstance(card, str):
        outcome = card
    elif card is not None:
        outcome = cards.keep(obj.customer if event.type != "customer.updated" else obj.id, card)
    elif event.type == "checkout.session.completed":
        outcome = _fulfill(obj) if obj.payment_status == "paid" else _set_status(obj, PaymentStatus.PENDING)
    elif event.type == "checkout.session.async_payment_succeeded":
        outcome = _fulfill(obj)
    elif event.type == "checkout.session.async_payment_failed":
        outcome = _set_status(obj, PaymentStatus.FAILED)
    elif event.type == "checkout.session.expired":
        outcome = _set_status(obj, PaymentStatus.EXPIRED)
    elif event.type == "payment_intent.succeeded":
        outcome = _credit_automatic(obj)
    elif event.type == "payment_intent.payment_failed":
        outcome = _automatic_failed(obj)
    elif event.type == "payment_method.detached":
        outcome = cards.removed(obj)
    elif event.type == "charge.refunded":
        # amount_refunded is the charge's running total, so a late, older event changes nothing.
        outcome = _record_reversal(
            obj.payment_intent, ReversalKind.REFUND, obj.amount_refunded, event.id, getattr(obj, "receipt_url", None)
        )
    elif event.type == "charge.dispute.closed" and obj.status == "lost":
        outcome = _record_reversal(obj.payment_intent, ReversalKind.DISPUTE, obj.amount, event.id)
    else:
        outcome = "ignored"
    db.session.get(StripeEvent, event.id).outcome = outcome[:200]
    log.info("stripe event %s (%s): %s", event.id, event.type, outcome)
    return outcome


# What handle_event reads of each type's object: a field's name and the kinds of value it may have.
_TEXT, _TEXT_OR_NULL, _CENTS, _CENTS_OR_NULL = (str,), (str, type(None)), "cents", "cents or null"
_SESSION = {"id": _TEXT, "payment_status": _TEXT, "client_reference_id": _TEXT_OR_NULL}
_SESSION |= {"payment_intent": _TEXT_OR_NULL, "amount_total": _CENTS_OR_NULL}
_INTENT = {"id": _TEXT, "metadata": "metadata"}
SHAPES = {
    "checkout.session.completed": _SESSION,
    "checkout.session.async_payment_succeeded": _SESSION,
    "checkout.session.async_payment_failed": _SESSION,
    "checkout.session.expired": _SESSION,
    "charge.refunded": {"payment_intent": _TEXT_OR_NULL, "amount_refunded": _CENTS},
    "charge.dispute.closed": {"payment_intent": _TEXT_OR_NULL, "amount": _CENTS, "status": _TEXT},
    "payment_intent.succeeded": _INTENT,
    "payment_intent.payment_failed": _INTENT,
    "payment_method.detached": {"id": _TEXT},
    "customer.updated": {"id": _TEXT},
}
# Fields read when they are there: absent, null, or of the kind Stripe sends.
OPTIONAL = {
    "checkout.session.completed": {
        "mode": _TEXT,
        "customer": _TEXT,
        "invoice": _TEXT,
        "setup_intent": _TEXT,
        "created": "timestamp",
    },
    "payment_intent.payment_failed": {"last_payment_error": "error"},
    "customer.updated": {"invoice_settings": (dict,)},
}


# Stripe's ids and types: short, printable ASCII. Anything else could not be stored (the columns
# hold 255 characters, a type 100; the database refuses NUL and lone surrogates) and is no event of Stripe's.
_STRIPE_TEXT = re.compile(r"[\x21-\x7e]{1,255}")


def check_shape(event) -> None:
    """The event has an id, a type and an object, and every field handle_event reads of its type is there
    and of the kind Stripe sends (ids and types as Stripe writes them); amounts are whole cents, at
    least 0 (bools are not). MalformedEvent before anything is recorded otherwise."""
    raw = event.to_dict()
    data = raw.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not _stripe_text(raw.get("id")) or not _stripe_text(raw.get("type"), 100) or not isinstance(obj, dict):
        raise MalformedEvent("not an event: it needs an id, a type and data.object")
    for field, kinds in SHAPES.get(raw["type"], {}).items():
        _check_field(raw["type"], obj, field, kinds, required=True)
    for field, kinds in OPTIONAL.get(raw["type"], {}).items():
        _check_field(raw["type"], obj, field, kinds, required=False)


def _check_field(event_type: str, obj: dict, field: str, kinds, required: bool) -> None:
    """One field as SHAPES (required: there, null only where its kinds allow) or OPTIONAL (absent or null
    pass) describe it; MalformedEvent otherwise."""
    value = obj.get(field)
    if value is None and not required:
        return
    if kinds == "timestamp":
        # Unix seconds, as Stripe writes them: within the years a date can hold.
        if type(value) is not int or not 0 <= value < 2**37:
            raise MalformedEvent(f"{field} is {value!r:.80}, not a time Stripe writes")
    elif kinds in ("metadata", "error"):
        _check_texts(event_type, field, value)
    elif kinds in (_CENTS, _CENTS_OR_NULL):
        if value is None and kinds == _CENTS_OR_NULL:
            return
        if type(value) is not int or not 0 <= value <= MAX_CENTS:
            raise MalformedEvent(f"{field} is {value!r}, not a whole number of cents")
    elif field not in obj or not isinstance(value, kinds) or (isinstance(value, str) and not _stripe_text(value)):
        raise MalformedEvent(f"{field} is {value!r:.80}, not what a {event_type} event carries")


def _check_texts(event_type: str, field: str, value) -> None:
    """A dict whose values are text (Stripe's metadata: text to text); of an error object, the code,
    decline_code and message are text or null."""
    if not isinstance(value, dict) or not all(
        isinstance(item, str) or (item is None and field != "metadata")
        for name, item in value.items()
        if field == "metadata" or name in ("code", "decline_code", "message")
    ):
        raise MalformedEvent(f"{field} is {value!r:.80}, not what a {event_type} event carries")


def _stripe_text(value, limit: int = 255) -> bool:
    return isinstance(value, str) and len(value) <= limit and _STRIPE_TEXT.fullmatch(value) is not None


def _lock_intent(payment_intent: str | None) -> None:
    """Serialise the events of one payment intent (PostgreSQL; SQLite has one writer anyway).

    The payment row alone cannot do it: a refund may arrive before the payment intent is
    linked to any payment, and must not slip between a concurrent credit and its check
    for waiting reversals.
    """
    if payment_intent and db.session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(payment_intent.encode()).digest()[:8], "big", signed=True)
        db.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _payment_for_session(session_obj) -> Payment | None:
    _lock_intent(session_obj.payment_intent)
    payment = db.session.scalar(select(Payment).where(Payment.checkout_session_id == session_obj.id).with_for_update())
    if payment is not None and str(payment.team_id) != str(session_obj.client_reference_id):
        log.warning("checkout session %s names another team; ignored", session_obj.id)
        return None
    if payment is not None and session_obj.payment_intent and payment.payment_intent_id is None:
        payment.payment_intent_id = session_obj.payment_intent
    if payment is not None and getattr(session_obj, "invoice", None) and payment.invoice_id is None:
        payment.invoice_id = session_obj.invoice
    return payment


def _fulfill(session_obj) -> str:
    payment = _payment_for_session(session_obj)
    if payment is None:
        return "unknown checkout session"
    customer = getattr(session_obj, "customer", None)
    if customer:
        # The Customer Checkout made for the team's first purchase becomes the team's, unless it has one.
        db.session.execute(
            update(Team)
            .where(Team.id == payment.team_id, Team.stripe_customer_id.is_(None))
            .values(stripe_customer_id=customer)
            .execution_options(synchronize_session=False)
        )
    return _credit(payment)


def _credit(payment: Payment) -> str:
    """Credit a paid payment, once: the caller holds its row lock."""
    if payment.paid_at is not None:
        return "already credited"
    payment.status = PaymentStatus.PAID
    payment.paid_at = utcnow()
    how = "automatic top-up, " if payment.kind == PaymentKind.AUTOMATIC else ""
    balance = billing.apply(
        payment.team_id,
        payment.credits,
        kind=LedgerKind.TOPUP,
        reference=billing.topup_reference(payment.name),
        note=f"{payment.pack} pack, {how}{payment.amount_cents / 100:.2f} {payment.currency.upper()}",
        payment_id=payment.id,
    )
    outcome = f"credited {payment.credits} to team {payment.team_id}; balance {balance}"
    billing.tell("receipt", payment.team_id, payment=payment, balance=balance)
    waiting = _apply_reversals(payment)
    return outcome if waiting is None else f"{outcome}; {waiting}"


def _automatic_payment(intent_obj) -> Payment | None:
    """The automatic top-up a PaymentIntent event is about (by the key in its metadata), locked; None for
    any other PaymentIntent (Checkout's are credited by their session's events)."""
    key = getattr(intent_obj.metadata, card_payments.METADATA_KEY, None)
    if not key:
        return None
    _lock_intent(intent_obj.id)
    payment = db.session.scalar(select(Payment).where(Payment.idempotency_key == key).with_for_update())
    if payment is None or str(payment.team_id) != str(getattr(intent_obj.metadata, "team_id", None)):
        log.warning("payment intent %s names no automatic top-up of ours (%s)", intent_obj.id, key)
        return None
    if payment.payment_intent_id is None:
        payment.payment_intent_id = intent_obj.id
    elif payment.payment_intent_id != intent_obj.id:
        log.warning("payment intent %s is not %s's (%s)", intent_obj.id, key, payment.payment_intent_id)
        return None
    return payment


def _credit_automatic(intent_obj) -> str:
    payment = _automatic_payment(intent_obj)
    if payment is None:
        return "ignored: not an automatic top-up"
    # Only the top-up in flight frees the team for the next; one called off or given up earlier that
    # Stripe took after all is credited, and leaves the one in flight now as it is.
    was_in_flight = payment.status in autotopup.IN_FLIGHT
    outcome = _credit(payment)
    if was_in_flight:
        autotopup.free(payment.team_id)
    return outcome


def _automatic_failed(intent_obj) -> str:
    payment = _automatic_payment(intent_obj)
    if payment is None:
        return "ignored: not an automatic top-up"
    error = getattr(intent_obj, "last_payment_error", None) or {}
    status = card_payments.failure_status(getattr(error, "decline_code", None) or getattr(error, "code", None))
    reason = (getattr(error, "message", None) or "The card was declined.")[:400]
    if card_payments.failed(payment, status, reason, intent_obj.id):
        return f"automatic top-up {payment.name} failed: {reason}"
    return "already ended"


# Checkout Sessions expire at Stripe after a day; a way back from one is no older.
CHECKOUT_HOURS = 24


def _cancel_tokens(secret: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret, salt="kokoro-pay checkout cancel")


def cancel_token(user: User, secret: str) -> str:
    """The token in the cancel_url of the checkout `user` is about to start: the user and this instant, signed.

    Only Stripe's Cancel redirect carries it, so only the real way back from that checkout can
    cancel it (any other GET of the page, such as an image on another site, changes nothing).
    The session's id is not known before Stripe creates it; the token names the instant
    instead, and checkout_left matches it to the payment recorded right after.
    """
    return _cancel_tokens(secret).dumps({"user": user.id, "at": utcnow().isoformat()})


def checkout_left(user: User, token: str, secret: str) -> Payment | None:
    """The checkout a valid cancel token of `user` was made for, while it is still open; else None.

    That is the first payment the user bought after the token's instant: once expired or
    paid, the same link (the back button, the history) cancels no later checkout.
    """
    try:
        claims = _cancel_tokens(secret).loads(token, max_age=CHECKOUT_HOURS * 3600)
        issued = datetime.fromisoformat(claims["at"])
    except (BadSignature, KeyError, TypeError, ValueError):
        return None
    if claims.get("user") != user.id:
        return None
    first = db.session.scalar(
        select(func.min(Payment.id)).where(
            Payment.bought_by_id == user.id, Payment.kind == PaymentKind.CHECKOUT, Payment.created_at >= issued
        )
    )
    payment = None if first is None else db.session.get(Payment, first)
    return payment if payment is not None and payment.status == PaymentStatus.OPEN else None


def cancel_checkout(client, payment: Payment) -> None:
    """The customer came back from Checkout with Cancel: expire the open session at Stripe, so it can
    no longer be paid, and show the payment as such. Nothing changes when Stripe refuses, e.g.
    because it was paid meanwhile in another tab; its webhook then tells the truth."""
    try:
        client.v1.checkout.sessions.expire(payment.checkout_session_id)
    except stripe.StripeError as error:
        log.info("checkout session %s not expired: %s", payment.checkout_session_id, error)
        return
    payment.status = PaymentStatus.EXPIRED


def _set_status(session_obj, status: str) -> str:
    payment = _payment_for_session(session_obj)
    if payment is None:
        return "unknown checkout session"
    if payment.paid_at is None:
        payment.status = status
    return f"payment {status}"


def _record_reversal(
    payment_intent: str | None, kind: str, amount_cents: int, event_id: str, receipt_url: str | None = None
) -> str:
    if not payment_intent:
        return "no payment intent on this event"
    _lock_intent(payment_intent)
    db.session.add(
        PaymentReversal(payment_intent_id=payment_intent, kind=kind, amount_cents=amount_cents, event_id=event_id)
    )
    db.session.flush()
    payment = db.session.scalar(select(Payment).where(Payment.payment_intent_id == payment_intent).with_for_update())
    if payment is None or payment.paid_at is None:
        return f"kept: a {kind} of {amount_cents} cents, applied when its payment is credited"
    return _apply_reversals(payment, receipt_url) or "already reversed"


def reversed_cents(payment_intent: str | None) -> tuple[int, int]:
    """(refunded, disputed) cents Stripe has reported for a payment intent so far."""
    if not payment_intent:
        return 0, 0
    rows = db.session.execute(
        select(PaymentReversal.kind, func.max(PaymentReversal.amount_cents))
        .where(PaymentReversal.payment_intent_id == payment_intent)
        .group_by(PaymentReversal.kind)
    )
    amounts = dict(rows.all())
    return amounts.get(ReversalKind.REFUND, 0), amounts.get(ReversalKind.DISPUTE, 0)


def owed_credits(payment: Payment, refunded: int, disputed: int) -> int:
    """The credits refunds and lost disputes take back from a payment: their share of what was paid."""
    if not payment.amount_cents:
        return 0
    return payment.credits * min(refunded + disputed, payment.amount_cents) // payment.amount_cents


def _apply_reversals(payment: Payment, receipt_url: str | None = None) -> str | None:
    """Take back what the payment's reversals owe and was not taken yet; None when nothing is due.

    Never below zero: what the balance cannot cover stays recorded in `credits_reversed`
    and the ledger note, for the operator.
    """
    refunded, disputed = reversed_cents(payment.payment_intent_id)
    owed = owed_credits(payment, refunded, disputed)
    due = owed - payment.credits_reversed
    if due <= 0:
        return None
    kind, status = (
        (LedgerKind.CHARGEBACK, PaymentStatus.DISPUTED)
        if disputed
        else (LedgerKind.PAYMENT_REFUND, PaymentStatus.REFUNDED)
    )
    payment.credits_reversed = owed
    payment.status = status
    taken, balance = billing.take_back(
        payment.team_id,
        due,
        kind=kind,
        reference=billing.reversal_reference(kind, payment.name, owed),
        note=f"{status} payment {payment.name}",
        payment_id=payment.id,
    )
    billing.tell(
        "reversal",
        payment.team_id,
        payment=payment,
        disputed=bool(disputed),
        refunded_cents=min(refunded + disputed, payment.amount_cents),
        due=due,
        taken=taken,
        balance=balance,
        receipt_url=receipt_url,
    )
    return f"took back {taken} of {due} credits from team {payment.team_id}"
