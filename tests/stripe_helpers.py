"""Stripe stand-ins: a stubbed Checkout API and webhook payloads signed with Stripe's real scheme."""

import hashlib
import hmac
import json
import time
import uuid
from urllib.parse import parse_qs

from tests.conftest import STRIPE_API, STRIPE_CHECKOUT

WEBHOOK_SECRET = "whsec_kokoro_test"


def stub_checkout(mock, session_id="cs_test_1", status=200):
    """Answer Checkout Session creation; return a list that collects the sent form fields."""
    sent = []

    def callback(request):
        sent.append({key: values[0] for key, values in parse_qs(request.body).items()})
        if status != 200:
            return status, {}, json.dumps({"error": {"type": "api_error", "message": "Stripe is down"}})
        body = {"id": session_id, "object": "checkout.session", "url": f"{STRIPE_CHECKOUT}/c/pay/{session_id}"}
        return 200, {"Request-Id": "req_stub"}, json.dumps(body)

    mock.add_callback("POST", f"{STRIPE_API}/v1/checkout/sessions", callback=callback, content_type="application/json")
    return sent


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header: t=<unix time>,v1=HMAC-SHA256(secret, "<t>.<payload>")."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def event(event_type: str, obj: dict, event_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "id": event_id or f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "api_version": "2024-06-20",
            "created": int(time.time()),
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
            "data": {"object": obj},
        }
    ).encode()


def checkout_session(user_id, session_id="cs_test_1", payment_status="paid", payment_intent="pi_1", **extra):
    return {
        "id": session_id,
        "object": "checkout.session",
        "client_reference_id": str(user_id),
        "payment_status": payment_status,
        "payment_intent": payment_intent,
        "mode": "payment",
        "status": "complete",
        "amount_total": 500,
        "currency": "usd",
        **extra,
    }


def charge(payment_intent="pi_1", amount=500, amount_refunded=500):
    return {
        "id": "ch_1",
        "object": "charge",
        "payment_intent": payment_intent,
        "amount": amount,
        "amount_refunded": amount_refunded,
        "refunded": amount_refunded == amount,
    }


def dispute(payment_intent="pi_1", status="lost", amount=500):
    return {
        "id": "dp_1",
        "object": "dispute",
        "payment_intent": payment_intent,
        "charge": "ch_1",
        "amount": amount,
        "status": status,
    }


def deliver(client, payload: bytes, signature: str | None = None):
    headers = {
        "Content-Type": "application/json",
        "Stripe-Signature": signature if signature is not None else sign(payload),
    }
    return client.post("/stripe/webhook", data=payload, headers=headers)
