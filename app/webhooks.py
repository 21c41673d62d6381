"""Stripe's webhook: verified signatures only, each event applied once."""

import stripe
from flask import Blueprint, current_app, jsonify, request

from app import config, metrics, payments, services
from app.extensions import csrf, db

bp = Blueprint("stripe", __name__, url_prefix="/stripe")


@bp.post("/webhook")
@csrf.exempt
def webhook():
    secret = config.current().stripe_webhook_secret
    if not secret:
        return jsonify(detail="Webhooks are not configured."), 503
    try:
        event = stripe.Webhook.construct_event(request.get_data(), request.headers.get("Stripe-Signature", ""), secret)
    except (ValueError, stripe.SignatureVerificationError):
        metrics.WEBHOOK_EVENTS.labels("unverified", "refused").inc()
        return jsonify(detail="Invalid payload or signature."), 400
    except (AttributeError, TypeError):
        # Correctly signed JSON that is not an event object (null, a list, …).
        return jsonify(detail="Malformed event."), 400
    try:
        outcome = payments.handle_event(event, services.stripe_client())
        db.session.commit()
    except payments.MalformedEvent as error:
        # Signed, but not shaped as Stripe sends it: refused before anything is stored. Stripe retries
        # it for a few days, and the log says why each time.
        db.session.rollback()
        current_app.logger.warning("stripe event %r refused: %s", getattr(event, "id", None), error)
        return jsonify(detail="Malformed event."), 400
    except stripe.StripeError as error:
        # Stripe could not tell us about the card an event names: nothing is applied, and Stripe
        # sends the event again.
        db.session.rollback()
        current_app.logger.warning("stripe event %s not applied: Stripe could not be asked: %s", event.id, error)
        return jsonify(detail="Stripe could not be reached; send the event again."), 503
    except payments.AlreadyProcessed as redelivery:
        # Only the event id's own insert means this; any other failure is a bug, answered 500 (with
        # its traceback in the log) so that Stripe delivers the event again once it is fixed.
        db.session.rollback()
        current_app.logger.info("stripe event %s delivered again: already processed", *redelivery.args)
        outcome = "already processed"
    metrics.WEBHOOK_EVENTS.labels(event.type, metrics.webhook_outcome(outcome)).inc()
    return jsonify(received=True, outcome=outcome)
