"""Stripe stand-ins: a stubbed Checkout API and webhook payloads signed with Stripe's real scheme."""

import hashlib
import hmac
import json
import re
import time
import uuid
from urllib.parse import parse_qs, urlsplit

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


# FakeStripe.latest_charge's default: the PaymentIntent's charge, with its receipt.
RECEIPT = object()


class FakeStripe:
    """Stripe's API as saved cards, automatic top-ups, invoices and the billing portal use it, on a
    `responses` mock, answering in Stripe's shapes.

    PaymentIntents are idempotent as Stripe's are: a request with an Idempotency-Key seen before gets
    the first answer again and makes nothing new. `intent_outcome` is what a new one does:
    "succeeded" (answered with `intent_status`), "declined", "authentication_required",
    "declined_for_authentication" (a decline whose decline code asks for the card holder), "no_card" or
    "down" (HTTP 500). `error_message`, when set, is the message of the error answered instead.
    """

    CUSTOMER = "cus_test_1"
    CARD = {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030}
    PORTAL = "http://127.0.0.1:12113/p/session/bps_test_1"

    def __init__(self, mock=None, intent_outcome: str = "succeeded"):
        self.calls: list[tuple[str, str, dict, dict]] = []
        self.intents: dict[str, tuple[int, dict]] = {}
        self.intent_outcome = intent_outcome
        self.intent_status = "succeeded"
        # A SetupIntent's status and its payment method's type (None: no payment method).
        self.setup_status, self.setup_method = "succeeded", "card"
        self.error_message = None
        # Whether a card error names the PaymentIntent it made (Stripe's do when one was made).
        self.error_intent = True
        self.sessions = 0
        # Called with each request's path while Stripe "thinks": a test's look at our side meanwhile.
        self.meanwhile = None
        # The Customer's default card as Stripe has it now (a PaymentMethod id, or None).
        self.default_method = None
        # Attaching a payment to an invoice is refused (400), and the invoices' status as Stripe has it.
        self.refuse_attach = False
        self.invoice_status = "paid"
        # Whether an invoice has its hosted page yet (Stripe leaves the field out of a draft's answer).
        self.invoice_hosted = True
        # What a retrieved PaymentIntent's latest_charge is: RECEIPT, its charge with a receipt, or as set.
        self.latest_charge = RECEIPT
        # Invoices whose voiding is refused (400), and each invoice made, by its Idempotency-Key.
        self.refuse_void_of: set[str] = set()
        self.invoices: dict[str, str] = {}
        # Each answer's path and Request-Id header, in order.
        self.answered: list[dict] = []
        api = re.escape(STRIPE_API)
        routes = [
            ("POST", r"/v1/customers", self._customer),
            ("POST", r"/v1/customers/[\w]+", self._customer),
            ("GET", r"/v1/customers/[\w]+", self._customer_now),
            ("POST", r"/v1/checkout/sessions", self._checkout_session),
            ("GET", r"/v1/setup_intents/[\w]+", self._setup_intent),
            ("GET", r"/v1/payment_methods/[\w]+", self._payment_method),
            ("POST", r"/v1/payment_intents", self._payment_intent),
            ("GET", r"/v1/payment_intents/[\w]+", self._retrieve_intent),
            ("POST", r"/v1/invoices", self._invoice),
            ("POST", r"/v1/invoiceitems", self._invoice_item),
            ("POST", r"/v1/invoices/[\w]+/finalize", self._invoice),
            ("POST", r"/v1/invoices/[\w]+/attach_payment", self._attach),
            ("POST", r"/v1/invoices/[\w]+/void", self._invoice),
            ("DELETE", r"/v1/invoices/[\w]+", self._invoice),
            ("GET", r"/v1/invoices/[\w]+", self._invoice),
            ("POST", r"/v1/billing_portal/sessions", self._portal),
        ]
        self.routes = [(method, re.compile(path + "$"), self._recorded(handler)) for method, path, handler in routes]
        for method, path, handler in routes if mock is not None else ():
            mock.add_callback(
                method,
                re.compile(api + path + r"(\?.*)?$"),
                callback=self._recorded(handler),
                content_type="application/json",
            )

    def __call__(self, environ, start_response):
        """The same API as a WSGI app, for a process of its own to call over real HTTP (tests.servers.serve)."""
        from werkzeug.wrappers import Request

        request = Request(environ)
        for method, path, callback in self.routes:
            if request.method == method and path.match(request.path):
                status, headers, body = callback(_Sent(request))
                start_response(f"{status} ANSWER", [("Content-Type", "application/json"), *headers.items()])
                return [body.encode()]
        start_response("404 NOT FOUND", [("Content-Type", "application/json")])
        return [b'{"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}}']

    def _recorded(self, handler):
        def callback(request):
            url = urlsplit(request.url)
            body = request.body or ""
            body = body.decode() if isinstance(body, bytes) else body
            params = {key: values[0] for key, values in parse_qs(body or url.query).items()}
            self.calls.append((request.method, url.path, params, dict(request.headers)))
            if self.meanwhile is not None:
                self.meanwhile(url.path)
            status, answer = handler(url.path, params, request.headers)
            request_id = f"req_{len(self.calls)}"
            self.answered.append({"path": url.path, "Request-Id": request_id})
            return status, {"Request-Id": request_id}, json.dumps(answer)

        return callback

    def answered_to(self, fragment: str) -> list[dict]:
        """The answers (path, Request-Id) to the requests whose path holds `fragment`, in order."""
        return [answer for answer in self.answered if fragment in answer["path"]]

    def called(self, method: str, path: str) -> list[tuple[dict, dict]]:
        """The (params, headers) of each call of `method` on `path` (a prefix), in order."""
        return [(params, headers) for m, p, params, headers in self.calls if m == method and p.startswith(path)]

    def _customer(self, path, params, headers):
        return 200, {"id": self.CUSTOMER, "object": "customer", "invoice_settings": {}}

    def _customer_now(self, path, params, headers):
        method = self._payment_method(f"/v1/payment_methods/{self.default_method}", {}, {})[1]
        default = method if self.default_method else None
        return 200, {"id": self.CUSTOMER, "object": "customer", "invoice_settings": {"default_payment_method": default}}

    def _checkout_session(self, path, params, headers):
        self.sessions += 1
        session_id = f"cs_test_{params.get('mode', 'payment')}_{self.sessions}"
        return 200, {"id": session_id, "object": "checkout.session", "url": f"{STRIPE_CHECKOUT}/c/pay/{session_id}"}

    def _setup_intent(self, path, params, headers):
        method = {
            "id": "pm_test_1",
            "object": "payment_method",
            "type": self.setup_method,
            "card": self.CARD if self.setup_method == "card" else None,
            "customer": self.CUSTOMER,
        }
        return 200, {
            "id": path.rsplit("/", 1)[1],
            "object": "setup_intent",
            "status": self.setup_status,
            "payment_method": method if self.setup_method else None,
        }

    def _payment_method(self, path, params, headers):
        card = {"brand": "mastercard", "last4": "4444", "exp_month": 3, "exp_year": 2031}
        method_id = path.rsplit("/", 1)[1]
        return 200, {
            "id": method_id,
            "object": "payment_method",
            "type": "card",
            "card": card,
            "customer": self.CUSTOMER,
        }

    def _payment_intent(self, path, params, headers):
        key = headers.get("Idempotency-Key")
        if key in self.intents:
            return self.intents[key]
        intent_id = f"pi_auto_{len(self.intents) + 1}"
        intent = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": int(params["amount"]),
            "currency": params["currency"],
            "status": self.intent_status,
            "metadata": {},
        }
        if self.intent_outcome == "down":
            message = "Stripe is having a moment." if self.error_message is None else self.error_message
            return 500, {"error": {"type": "api_error", "message": message}}
        if self.intent_outcome == "no_card":
            return 400, {
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "message": "No such PaymentMethod: 'pm_test_1'",
                    "param": "payment_method",
                }
            }
        if self.intent_outcome in ("declined", "authentication_required", "declined_for_authentication"):
            code = "authentication_required" if self.intent_outcome == "authentication_required" else "card_declined"
            message = (
                "Your card has insufficient funds."
                if self.intent_outcome == "declined"
                else "Your card was declined. This transaction requires authentication."
            )
            decline = {
                "declined": {"decline_code": "insufficient_funds"},
                "declined_for_authentication": {"decline_code": "authentication_required"},
            }.get(self.intent_outcome, {})
            answer = {
                "error": {
                    "type": "card_error",
                    "code": code,
                    "message": message if self.error_message is None else self.error_message,
                    **decline,
                    **(
                        {"payment_intent": {**intent, "status": "requires_payment_method"}} if self.error_intent else {}
                    ),
                }
            }
            self.intents[key] = (402, answer)
        else:
            self.intents[key] = (200, intent)
        return self.intents[key]

    def _retrieve_intent(self, path, params, headers):
        intent_id = path.rsplit("/", 1)[1]
        charge = self.latest_charge
        if charge is RECEIPT:
            charge = {"id": "ch_auto_1", "object": "charge", "receipt_url": f"{STRIPE_CHECKOUT}/receipts/{intent_id}"}
        return 200, {"id": intent_id, "object": "payment_intent", "status": "succeeded", "latest_charge": charge}

    def _invoice(self, path, params, headers):
        parts = path.split("/")
        if len(parts) > 3:
            invoice_id = parts[3]
        else:
            # A new invoice for each key (in_test_1, in_test_2…); the same one for a key seen before.
            key = headers.get("Idempotency-Key")
            invoice_id = self.invoices.setdefault(key, f"in_test_{len(self.invoices) + 1}")
        if path.endswith("/void") and invoice_id in self.refuse_void_of:
            return 400, {"error": {"type": "invalid_request_error", "message": "This invoice cannot be voided."}}
        answer = {"id": invoice_id, "object": "invoice", "status": self.invoice_status}
        if self.invoice_hosted:
            answer["hosted_invoice_url"] = f"{STRIPE_CHECKOUT}/invoices/{invoice_id}"
        return 200, answer

    def _attach(self, path, params, headers):
        if self.refuse_attach:
            return 400, {"error": {"type": "invalid_request_error", "message": "This invoice cannot take payments."}}
        return self._invoice(path, params, headers)

    def _invoice_item(self, path, params, headers):
        return 200, {"id": "ii_test_1", "object": "invoiceitem"}

    def _portal(self, path, params, headers):
        return 200, {"id": "bps_test_1", "object": "billing_portal.session", "url": self.PORTAL}


class _Sent:
    """A request to the WSGI stand-in, shaped as `responses` hands one to a callback."""

    def __init__(self, request):
        self.method = request.method
        self.url = request.url
        self.body = request.get_data(as_text=True)
        self.headers = request.headers


def payment_intent(key: str, team_id: int, intent_id: str = "pi_auto_1", **extra) -> dict:
    """A PaymentIntent as its events carry it: one an automatic top-up made (its key in the metadata)."""
    return {
        "id": intent_id,
        "object": "payment_intent",
        "amount": 500,
        "currency": "usd",
        "status": "succeeded",
        "metadata": {"kokoro_pay_auto_topup": key, "team_id": str(team_id), "pack": "starter", "credits": "10000"},
        **extra,
    }
