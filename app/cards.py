"""A team at Stripe: its Customer, the card it saved for automatic top-ups, the billing portal, its documents.

- **One Stripe Customer per team** (`teams.stripe_customer_id`), made the first time it is needed
  (saving a card, the portal), or taken from the Customer Checkout made for the team's first
  top-up. No team row is locked while Stripe is asked anything, so a team's requests never wait
  on Stripe. Checkout top-ups, their invoices, the saved card and the portal all
  belong to it.
- **Saving a card**: a Checkout Session in `setup` mode. Its checkout.session.completed event makes
  the card the team's (`ask_stripe`, then `keep`: the SetupIntent's PaymentMethod, kept by id; the pages
  show its brand, last four digits and expiry, nothing more) and the Customer's default. A card
  made the default in the portal becomes the team's too (customer.updated: the default as Stripe
  has it when the event is handled, so a late event never brings back a removed card); a card
  removed there stops automatic top-up (payment_method.detached). Either a saved card or a new default resumes it.
- **Documents**: a payment's link opens Stripe's hosted invoice when there is one (Checkout's
  invoice_creation, or the buyer's invoice for an automatic top-up), else the charge's receipt;
  looked up when followed, so the link never goes stale.
"""

import logging
from datetime import datetime, timezone

import stripe
from sqlalchemy import select, update

from app import card_payments
from app.extensions import db
from app.models import Payment, Team, User, utcnow

log = logging.getLogger(__name__)


def customer_of(client: stripe.StripeClient, team: Team, person: User) -> str:
    """The team's Stripe Customer, made now if it has none.

    No lock is held while Stripe is asked (a debit waits for none of it): two people asking at
    once send the same Idempotency-Key, made with the team, and get the same Customer back;
    the first to write it keeps it. It is committed at once, before the caller asks Stripe for
    more: the Customer exists at Stripe whatever comes next, and the row's lock is let go.
    """
    if team.stripe_customer_id is None:
        customer = client.v1.customers.create(
            params={"name": team.name, "email": person.email, "metadata": {"team_id": str(team.id)}},
            options={"idempotency_key": f"kp-team-{team.id}-customer-{team.created_at.timestamp():.6f}"},
        )
        db.session.execute(
            update(Team)
            .where(Team.id == team.id, Team.stripe_customer_id.is_(None))
            .values(stripe_customer_id=customer.id)
            .execution_options(synchronize_session=False)
        )
        db.session.commit()
        db.session.refresh(team)
    return team.stripe_customer_id


def start_card_setup(
    client: stripe.StripeClient, team: Team, person: User, currency: str, success_url: str, cancel_url: str
) -> str:
    """A Checkout Session that saves a card for the team's later payments; the URL to send the browser to."""
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "setup",
            "customer": customer_of(client, team, person),
            "currency": currency,
            "payment_method_types": ["card"],
            "client_reference_id": str(team.id),
            "metadata": {"team_id": str(team.id), "purpose": "save a card"},
            "setup_intent_data": {"metadata": {"team_id": str(team.id)}},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
    )
    return session.url


def _team_of_customer(customer_id: str | None) -> Team | None:
    if not customer_id:
        return None
    return db.session.scalar(select(Team).where(Team.stripe_customer_id == customer_id))


def _keep(team: Team, method) -> None:
    """Make `method` the team's card: its row locked only now, after every question to Stripe."""
    db.session.refresh(team, with_for_update=True)
    card = method.card
    team.card_payment_method = method.id
    team.card_brand = str(card.brand)[:32]
    team.card_last4 = str(card.last4)[:4]
    team.card_expires = f"{int(card.exp_month):02d}/{int(card.exp_year)}"
    team.card_saved_at = utcnow()
    # A card the customer just gave is a new chance: what paused automatic top-up was the old one's.
    team.auto_topup_paused = None
    team.auto_topup_paused_at = None


def ask_stripe(client: stripe.StripeClient | None, event_type: str, obj):
    """What a card event needs from Stripe, asked before the webhook writes anything (on SQLite a write
    holds the whole database, and a team's requests must not wait on Stripe): the card to keep, or the
    outcome when there is none. None for events that need nothing from Stripe.

    checkout.session.completed in setup mode: the card it saved becomes the Customer's default (at
    Stripe, here) and the team's (`keep`). customer.updated: the Customer's default card as Stripe has
    it now, not as the event says (events come in no fixed order, and an old one may name a card
    removed since).
    """
    setup = event_type == "checkout.session.completed" and getattr(obj, "mode", None) == "setup"
    if not setup and event_type != "customer.updated":
        return None
    customer_id = getattr(obj, "customer", None) if setup else obj.id
    team = _team_of_customer(customer_id)
    if team is None or (setup and str(team.id) != str(obj.client_reference_id)):
        return "a customer of no team of ours"
    if client is None:
        return "not applied: STRIPE_SECRET_KEY is not set, so the card cannot be looked up"
    if setup:
        if not getattr(obj, "setup_intent", None):
            return "setup session without a setup intent"
        created = getattr(obj, "created", None)
        if (
            created is not None
            and team.card_saved_at is not None
            and (datetime.fromtimestamp(created, timezone.utc) < team.card_saved_at)
        ):
            # A late event of an older setup: the card saved since stays, at Stripe and here.
            return "a setup older than the card saved since: not applied"
        intent = client.v1.setup_intents.retrieve(obj.setup_intent, params={"expand": ["payment_method"]})
        method = intent.payment_method
        if intent.status != "succeeded" or method is None or method.type != "card":
            return f"setup intent {intent.id} saved no card ({intent.status})"
    else:
        customer = client.v1.customers.retrieve(
            customer_id, params={"expand": ["invoice_settings.default_payment_method"]}
        )
        method = getattr(getattr(customer, "invoice_settings", None), "default_payment_method", None)
        if method is None or isinstance(method, str) or method.id == team.card_payment_method:
            return "no new default card"
        if method.type != "card":
            return f"default payment method {method.id} is not a card"
    if getattr(method, "customer", None) != customer_id:
        # Removed since (a late event): not brought back.
        return f"card {method.id} is not the customer's any more"
    if setup:
        client.v1.customers.update(customer_id, params={"invoice_settings": {"default_payment_method": method.id}})
    return method


def keep(customer_id: str, method) -> str:
    """Make the card `ask_stripe` found the team's, and resume automatic top-up."""
    team = _team_of_customer(customer_id)
    if team is None:
        return "a customer of no team of ours"
    _keep(team, method)
    return f"card {team.card_brand} {team.card_last4} saved for team {team.id}"


def removed(method_obj) -> str:
    """payment_method.detached: the team's saved card was removed; automatic top-up stops until another is saved."""
    team = db.session.scalar(select(Team).where(Team.card_payment_method == method_obj.id))
    if team is None:
        return "not a saved card"
    db.session.refresh(team, with_for_update=True)
    if team.card_payment_method != method_obj.id:
        return "not the saved card any more"
    team.card_payment_method = team.card_brand = team.card_last4 = team.card_expires = None
    if team.auto_topup_below is None or team.auto_topup_paused is not None:
        return f"card of team {team.id} removed"
    card_payments.pause_and_tell(team, "The saved card was removed.")
    return f"card of team {team.id} removed; automatic top-up paused"


def portal_url(client: stripe.StripeClient, team: Team, person: User, return_url: str) -> str:
    """A Stripe Billing Portal session for the team's Customer (cards, invoices), coming back to `return_url`."""
    session = client.v1.billing_portal.sessions.create(
        params={"customer": customer_of(client, team, person), "return_url": return_url}
    )
    return session.url


def document_url(client: stripe.StripeClient, payment: Payment) -> str | None:
    """Stripe's hosted invoice for the payment, else its charge's receipt; None when Stripe has neither yet."""
    if payment.invoice_id:
        invoice = client.v1.invoices.retrieve(payment.invoice_id)
        if getattr(invoice, "hosted_invoice_url", None):
            return invoice.hosted_invoice_url
    if payment.payment_intent_id:
        intent = client.v1.payment_intents.retrieve(payment.payment_intent_id, params={"expand": ["latest_charge"]})
        charge = getattr(intent, "latest_charge", None)
        if charge is not None and not isinstance(charge, str) and getattr(charge, "receipt_url", None):
            return charge.receipt_url
    return None
