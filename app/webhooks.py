"""Stripe's webhook: verified signatures only, each event applied once."""

import stripe
from flask import Blueprint, current_app, jsonify, request
from sqlalchemy.exc import IntegrityError

from app import metrics, payments
from app.extensions import csrf, db

bp = Blueprint("stripe", __name__, url_prefix="/stripe")


@bp.post("/webhook")
@csrf.exempt
def webhook():
    secret = current_app.config["STRIPE_WEBHOOK_SECRET"]
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
        outcome = payments.handle_event(event)
        db.session.commit()
    except payments.MalformedEvent as error:
        # Signed, but an amount no payment has: refused before anything is stored. Stripe retries
        # it for a few days, and the log says why each time.
        db.session.rollback()
        current_app.logger.warning("stripe event %r refused: %s", getattr(event, "id", None), error)
        return jsonify(detail="Malformed event."), 400
    except (AttributeError, KeyError, TypeError):
        # Signed, but not shaped like the event its type names.
        db.session.rollback()
        current_app.logger.warning("malformed stripe event %r", getattr(event, "id", None))
        return jsonify(detail="Malformed event."), 400
    except IntegrityError:
        # The event id (or the session's ledger reference) is taken: a redelivery, already applied.
        db.session.rollback()
        outcome = "already processed"
    metrics.WEBHOOK_EVENTS.labels(event.type, metrics.webhook_outcome(outcome)).inc()
    return jsonify(received=True, outcome=outcome)
