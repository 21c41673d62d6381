"""Top-ups: the Checkout Session we ask Stripe for, and webhook events credited exactly once."""

import csv
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from sqlalchemy import func, select, update

from app import payments
from app.extensions import db
from app.models import LedgerEntry, Payment, PaymentKind, PaymentReversal, PaymentStatus, StripeEvent, User, utcnow
from tests import factories
from tests.conftest import STRIPE_CHECKOUT
from tests.stripe_helpers import charge, checkout_session, deliver, dispute, event, sign, stub_checkout


@pytest.fixture
def stripe_api():
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def buyer(app, web):
    """A signed-in customer with 100 credits; returns the id of their personal team, which pays."""
    return factories.signed_up(app, web, "buyer@example.com", 100)


def buy(web, stripe_api, pack="starter", session_id="cs_test_1"):
    sent = stub_checkout(stripe_api, session_id)
    web.get("/billing")
    return web.post("/billing/checkout", {"pack": pack}), sent


def payment(app, session_id="cs_test_1"):
    with app.app_context():
        row = db.session.scalar(select(Payment).where(Payment.checkout_session_id == session_id))
        db.session.expunge_all()
        return row


# Checkout


def test_buying_a_pack_creates_a_checkout_session_and_redirects_to_stripe(app, web, buyer, stripe_api):
    response, sent = buy(web, stripe_api)
    assert response.status_code == 303
    assert response.headers["Location"] == f"{STRIPE_CHECKOUT}/c/pay/cs_test_1"
    [params] = sent
    assert params["mode"] == "payment"
    assert params["client_reference_id"] == str(buyer)
    assert params["metadata[credits]"] == "10000" and params["metadata[pack]"] == "starter"
    assert params["metadata[team_id]"] == str(buyer) and params["customer_email"] == "buyer@example.com"
    assert params["line_items[0][price_data][product_data][name]"] == "10,000 kokoro-pay credits"
    assert params["line_items[0][price_data][unit_amount]"] == "500"
    assert params["line_items[0][price_data][currency]"] == "usd"
    assert params["line_items[0][quantity]"] == "1"
    assert params["success_url"] == "http://localhost/billing/success?session_id={CHECKOUT_SESSION_ID}"
    assert params["cancel_url"].startswith("http://localhost/billing/cancelled?token=")
    assert stripe_api.calls[0].request.headers["Authorization"] == "Bearer sk_test_kokoro"
    row = payment(app)
    assert (row.team_id, row.credits, row.amount_cents, row.status) == (buyer, 10000, 500, "open")
    assert factories.balance(app, buyer) == 100


def test_an_unknown_pack_asks_stripe_nothing(app, web, buyer, stripe_api):
    web.get("/billing")
    response = web.post("/billing/checkout", {"pack": "free-money"}, follow_redirects=True)
    assert "Choose one of the credit packs." in response.get_data(as_text=True)
    assert len(stripe_api.calls) == 0


def test_stripe_down_means_a_clear_message_and_no_payment(app, web, buyer, stripe_api):
    stub_checkout(stripe_api, status=500)
    web.get("/billing")
    response = web.post("/billing/checkout", {"pack": "starter"}, follow_redirects=True)
    assert "Stripe could not start the payment" in response.get_data(as_text=True)
    assert payment(app) is None


def test_buying_needs_the_csrf_token(app, web, buyer, stripe_api):
    web.get("/billing")
    assert web.post("/billing/checkout", {"pack": "starter"}, csrf=False).status_code == 400
    assert len(stripe_api.calls) == 0


def test_without_stripe_keys_the_packs_are_shown_but_disabled(make_app):
    web = factories.WebClient(make_app(STRIPE_SECRET_KEY=None).test_client())
    web.signup()
    page = web.get("/billing").get_data(as_text=True)
    assert "Payments are not configured" in page and "disabled" in page


# Webhook: credit exactly once


def test_a_paid_session_credits_the_recorded_pack_once(app, web, buyer, stripe_api, client):
    buy(web, stripe_api)
    # The event claims more credits in its metadata; only the recorded pack counts.
    payload = event("checkout.session.completed", checkout_session(buyer, metadata={"credits": "99999999"}), "evt_paid")
    assert deliver(client, payload).status_code == 200
    assert factories.balance(app, buyer) == 10100
    assert factories.ledger(app, buyer)[-1] == ("topup", 10000, 10100)
    assert payment(app).status == "paid" and payment(app).payment_intent_id == "pi_1"
    # Stripe retries, and sends the async success for the same session too.
    assert deliver(client, payload).status_code == 200
    assert (
        deliver(client, event("checkout.session.async_payment_succeeded", checkout_session(buyer))).status_code == 200
    )
    assert factories.balance(app, buyer) == 10100
    factories.assert_books_balance(app, buyer)
    page = web.get("/billing/success?session_id=cs_test_1").get_data(as_text=True)
    assert "Payment received" in page and "10,100" in page


def test_the_success_page_never_credits_and_waits_for_the_webhook(app, web, buyer, stripe_api):
    buy(web, stripe_api)
    page = web.get("/billing/success?session_id=cs_test_1")
    assert "Confirming your payment" in page.get_data(as_text=True)
    assert '<meta http-equiv="refresh"' in page.get_data(as_text=True)
    assert factories.balance(app, buyer) == 100
    assert web.get("/billing/success?session_id=cs_someone_else").status_code == 404


def test_concurrent_duplicate_deliveries_credit_once(app, web, buyer, stripe_api):
    buy(web, stripe_api)
    payload = event("checkout.session.completed", checkout_session(buyer), "evt_dup")
    barrier = threading.Barrier(8, timeout=30)

    def post(_):
        client = app.test_client()
        barrier.wait()
        return deliver(client, payload).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, range(8)))
    assert statuses == [200] * 8
    assert factories.balance(app, buyer) == 10100
    assert [kind for kind, _, _ in factories.ledger(app, buyer)].count("topup") == 1
    factories.assert_books_balance(app, buyer)


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "t=1,v1=deadbeef",
        sign(b"{}"),  # signs another payload
        sign(b"", secret="whsec_wrong"),
    ],
    # Named, not shown: a signature holds the time it was made, and both xdist workers must collect the same ids.
    ids=["missing", "malformed", "another payload", "another secret"],
)
def test_a_bad_or_missing_signature_is_400_and_changes_nothing(app, web, buyer, stripe_api, client, signature):
    buy(web, stripe_api)
    payload = event("checkout.session.completed", checkout_session(buyer))
    if signature == sign(b"", secret="whsec_wrong"):
        signature = sign(payload, secret="whsec_wrong")
    response = deliver(client, payload, signature)
    assert response.status_code == 400 and response.get_json() == {"detail": "Invalid payload or signature."}
    assert factories.balance(app, buyer) == 100
    with app.app_context():
        assert db.session.scalars(select(StripeEvent)).all() == []


def test_a_stale_timestamp_is_refused(app, web, buyer, stripe_api, client):
    buy(web, stripe_api)
    payload = event("checkout.session.completed", checkout_session(buyer))
    response = deliver(client, payload, sign(payload, timestamp=int(time.time()) - 600))
    assert response.status_code == 400
    assert factories.balance(app, buyer) == 100


def test_garbage_is_400(client):
    assert deliver(client, b"not json").status_code == 400


def test_an_unpaid_session_credits_nothing_until_the_async_payment_succeeds(app, web, buyer, stripe_api, client):
    buy(web, stripe_api)
    deliver(client, event("checkout.session.completed", checkout_session(buyer, payment_status="unpaid")))
    assert factories.balance(app, buyer) == 100 and payment(app).status == "pending"
    deliver(client, event("checkout.session.async_payment_succeeded", checkout_session(buyer)))
    assert factories.balance(app, buyer) == 10100 and payment(app).status == "paid"


def test_a_failed_async_payment_is_recorded_and_credits_nothing(app, web, buyer, stripe_api, client):
    buy(web, stripe_api)
    deliver(client, event("checkout.session.completed", checkout_session(buyer, payment_status="unpaid")))
    deliver(client, event("checkout.session.async_payment_failed", checkout_session(buyer, payment_status="unpaid")))
    assert factories.balance(app, buyer) == 100 and payment(app).status == "failed"
    assert "Payment failed" in web.get("/billing/success?session_id=cs_test_1").get_data(as_text=True)


def test_a_session_of_another_user_or_unknown_credits_nothing(app, web, buyer, stripe_api, client):
    buy(web, stripe_api)
    other = factories.customer(app, balance=0)
    assert deliver(client, event("checkout.session.completed", checkout_session(other.team_id))).status_code == 200
    assert (
        deliver(
            client, event("checkout.session.completed", checkout_session(buyer, session_id="cs_unknown"))
        ).status_code
        == 200
    )
    assert factories.balance(app, buyer) == 100 and factories.balance(app, other.team_id) == 0


def test_unknown_event_types_are_acknowledged_and_ignored(app, client):
    response = deliver(client, event("customer.created", {"id": "cus_1", "object": "customer"}))
    assert response.status_code == 200 and response.get_json()["outcome"] == "ignored"


def test_without_a_webhook_secret_nothing_is_credited(make_app):
    client = make_app(STRIPE_WEBHOOK_SECRET=None).test_client()
    assert deliver(client, event("checkout.session.completed", checkout_session(1))).status_code == 503


# Refunds and disputes take credits back


def paid(app, web, buyer, stripe_api, client):
    buy(web, stripe_api)
    deliver(client, event("checkout.session.completed", checkout_session(buyer)))
    assert factories.balance(app, buyer) == 10100


def test_a_full_refund_takes_the_credits_back_once(app, web, buyer, stripe_api, client):
    paid(app, web, buyer, stripe_api, client)
    payload = event("charge.refunded", charge(amount_refunded=500))
    deliver(client, payload)
    deliver(client, payload)
    deliver(client, event("charge.refunded", charge(amount_refunded=500)))
    assert factories.balance(app, buyer) == 100
    assert factories.ledger(app, buyer)[-1] == ("payment_refund", -10000, 100)
    assert payment(app).status == "refunded"
    factories.assert_books_balance(app, buyer)


def test_partial_refunds_take_back_their_share(app, web, buyer, stripe_api, client):
    paid(app, web, buyer, stripe_api, client)
    deliver(client, event("charge.refunded", charge(amount_refunded=125)))
    assert factories.balance(app, buyer) == 10100 - 2500
    deliver(client, event("charge.refunded", charge(amount_refunded=500)))
    assert factories.balance(app, buyer) == 100
    factories.assert_books_balance(app, buyer)


def test_a_refund_after_the_credits_were_spent_stops_at_zero_and_says_so(app, web, buyer, stripe_api, client):
    paid(app, web, buyer, stripe_api, client)
    with app.app_context():
        from app import billing
        from app.models import Team

        billing.deduct(db.session.get(Team, buyer), 6100, "spent")
        db.session.commit()
    deliver(client, event("charge.refunded", charge(amount_refunded=500)))
    assert factories.balance(app, buyer) == 0
    assert factories.ledger(app, buyer)[-1] == ("payment_refund", -4000, 0)
    assert payment(app).credits_reversed == 10000
    factories.assert_books_balance(app, buyer)


def test_a_lost_dispute_is_a_chargeback_and_a_won_one_changes_nothing(app, web, buyer, stripe_api, client):
    paid(app, web, buyer, stripe_api, client)
    deliver(client, event("charge.dispute.closed", dispute(status="won")))
    assert factories.balance(app, buyer) == 10100
    deliver(client, event("charge.dispute.closed", dispute(status="lost")))
    assert factories.balance(app, buyer) == 100
    assert factories.ledger(app, buyer)[-1][0] == "chargeback"
    assert payment(app).status == "disputed"


def test_each_row_a_payment_caused_links_to_that_payment_and_names_it_in_the_csv(app, web, buyer, stripe_api, client):
    paid(app, web, buyer, stripe_api, client)
    deliver(client, event("charge.refunded", charge(amount_refunded=125)))
    deliver(client, event("charge.dispute.closed", dispute(status="lost")))
    page = web.get("/ledger").get_data(as_text=True)
    # The top-up, the refund's share and the chargeback: each row links to the payment on the billing page.
    assert page.count('<a href="/billing#payment-cs_test_1">payment →</a>') == 3
    csv_rows = csv.DictReader(io.StringIO(web.get("/ledger.csv").get_data(as_text=True)))
    # Each names the payment, and the member who bought it.
    caused = {row["reference"]: row["member"] for row in csv_rows if row["kind"] != "grant"}
    assert caused == {
        "topup:cs_test_1": "buyer@example.com",
        "payment_refund:cs_test_1:2500": "buyer@example.com",
        "chargeback:cs_test_1:10000": "buyer@example.com",
    }


def test_a_refund_for_an_unknown_charge_changes_nothing(app, web, buyer, stripe_api, client):
    paid(app, web, buyer, stripe_api, client)
    deliver(client, event("charge.refunded", charge(payment_intent="pi_other")))
    assert factories.balance(app, buyer) == 10100


# Checkouts that end without a payment


def expire_at_stripe(stripe_api, session_id="cs_test_1"):
    return stripe_api.post(
        f"http://127.0.0.1:12111/v1/checkout/sessions/{session_id}/expire",
        json={"id": session_id, "object": "checkout.session", "status": "expired"},
    )


def cancel_link(sent) -> str:
    """Where Checkout's Cancel sends the customer back to: the cancel_url we gave Stripe, as a path."""
    return sent[-1]["cancel_url"].removeprefix("http://localhost")


def test_cancel_in_checkout_expires_the_session_and_says_nothing_was_charged(app, web, buyer, stripe_api):
    _, sent = buy(web, stripe_api)
    expired = expire_at_stripe(stripe_api)
    response = web.get(cancel_link(sent), headers={"Sec-Fetch-Site": "cross-site"})
    assert response.headers["Location"] == "/billing" and expired.call_count == 1
    page = web.get("/billing").get_data(as_text=True)
    assert "Checkout was cancelled: nothing was charged." in page
    assert payment(app).status == "expired" and '<span class="tag expired">expired</span>' in page
    assert factories.balance(app, buyer) == 100


def test_a_cancel_stripe_refuses_leaves_the_payment_to_its_webhook(app, web, buyer, stripe_api, caplog):
    _, sent = buy(web, stripe_api)
    stripe_api.post(
        "http://127.0.0.1:12111/v1/checkout/sessions/cs_test_1/expire",
        status=400,
        json={"error": {"message": "Only Checkout Sessions with a status in ['open'] can be expired."}},
    )
    caplog.set_level("INFO", logger="app.payments")
    web.get(cancel_link(sent))
    assert payment(app).status == "open"
    # The operator's log names the session and Stripe's reason.
    [refused] = [message for message in caplog.messages if "not expired" in message]
    assert refused.startswith("checkout session cs_test_1 not expired: ")
    assert refused.endswith("Only Checkout Sessions with a status in ['open'] can be expired.")
    # Paid meanwhile in another tab: the webhook credits it as usual.
    deliver(app.test_client(), event("checkout.session.completed", checkout_session(buyer)))
    assert payment(app).status == "paid" and factories.balance(app, buyer) == 10_100


@pytest.mark.parametrize(
    "query",
    ["", "?token=", "?token=forged", "?token=eyJ1c2VyIjoxfQ.forged.signature", "?token=%C2%B2&token=x"],
)
def test_a_cross_site_get_of_the_cancel_page_shows_the_message_and_changes_nothing(app, web, buyer, stripe_api, query):
    buy(web, stripe_api)
    # An <img> on another site, loaded while the customer is signed in here.
    response = web.get("/billing/cancelled" + query, headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=True)
    assert "Checkout was cancelled: nothing was charged." in response.get_data(as_text=True)
    assert payment(app).status == "open"
    assert [call.request.url for call in stripe_api.calls] == ["http://127.0.0.1:12111/v1/checkout/sessions"]


def test_a_cancel_link_cancels_only_its_own_checkout_and_only_for_its_customer(app, web, buyer, stripe_api):
    _, first = buy(web, stripe_api, session_id="cs_test_1")
    expire_at_stripe(stripe_api, "cs_test_1")
    web.get(cancel_link(first))
    assert payment(app, "cs_test_1").status == "expired"
    # A new checkout, then the first one's link again (the back button, the history): the new one stays open.
    buy(web, stripe_api, session_id="cs_test_2")
    web.get(cancel_link(first))
    assert payment(app, "cs_test_2").status == "open"
    # Another signed-in customer given this customer's link changes nothing either.
    _, second = buy(web, stripe_api, session_id="cs_test_3")
    other = factories.WebClient(app.test_client())
    factories.signed_up(app, other, "other@example.com")
    other.get(cancel_link(second))
    assert payment(app, "cs_test_3").status == "open"
    assert [call.request.url.rsplit("/", 2)[-2:] for call in stripe_api.calls].count(["cs_test_1", "expire"]) == 1
    assert len(stripe_api.calls) == 4  # three checkouts created, one expired


def test_a_cancel_link_cancels_the_checkout_it_was_made_for_not_an_older_one_left_open(app, web, buyer, stripe_api):
    buy(web, stripe_api, session_id="cs_test_1")  # left open: the customer went elsewhere
    _, sent = buy(web, stripe_api, session_id="cs_test_2")
    expire_at_stripe(stripe_api, "cs_test_2")
    web.get(cancel_link(sent))
    assert payment(app, "cs_test_2").status == "expired" and payment(app, "cs_test_1").status == "open"


def test_a_cancel_link_cancels_its_checkout_not_an_automatic_top_up_its_buyer_turned_on(app, web, buyer, stripe_api):
    # The team's automatic top-up, queued with this customer as its buyer: recorded before the checkout (a
    # lower id) but stamped after the link's instant, as one the worker queues meanwhile would be.
    with app.app_context():
        user_id = db.session.scalar(select(User.id).where(User.email == "buyer@example.com"))
        db.session.add(
            Payment(
                kind=PaymentKind.AUTOMATIC,
                status=PaymentStatus.QUEUED,
                team_id=buyer,
                bought_by_id=user_id,
                pack="starter",
                credits=10000,
                amount_cents=1000,
                currency="usd",
                idempotency_key="kp-auto-topup-meanwhile",
                attempts=0,
                created_at=utcnow() + timedelta(hours=1),
            )
        )
        db.session.commit()
    _, sent = buy(web, stripe_api)
    expire_at_stripe(stripe_api)
    web.get(cancel_link(sent))
    assert payment(app).status == "expired"


def test_a_cancel_link_never_reaches_another_customers_checkout(app, web, buyer, stripe_api):
    # Another customer's open checkout, recorded before this one's (a lower id) but stamped later.
    with app.app_context():
        other = factories.customer(app)
        db.session.add(
            Payment(
                team_id=other.team_id,
                bought_by_id=other.user_id,
                checkout_session_id="cs_other",
                pack="starter",
                credits=10000,
                amount_cents=1000,
                currency="usd",
                created_at=utcnow() + timedelta(hours=1),
            )
        )
        db.session.commit()
    _, sent = buy(web, stripe_api, session_id="cs_test_1")
    expire_at_stripe(stripe_api, "cs_test_1")
    web.get(cancel_link(sent))
    assert payment(app, "cs_test_1").status == "expired" and payment(app, "cs_other").status == "open"


def test_a_checkout_recorded_in_the_same_instant_as_its_cancel_link_is_the_one_it_cancels(app, web, buyer, stripe_api):
    _, sent = buy(web, stripe_api)
    token = parse_qs(urlsplit(cancel_link(sent)).query)["token"][0]
    with app.app_context():
        # The clock did not move between the link's instant and the payment's record (a coarse clock).
        issued = datetime.fromisoformat(payments._cancel_tokens(app.secret_key).loads(token)["at"])
        db.session.execute(update(Payment).values(created_at=issued))
        db.session.commit()
    expire_at_stripe(stripe_api)
    web.get(cancel_link(sent))
    assert payment(app).status == "expired"


def signing_clock(monkeypatch):
    """Sets the clock itsdangerous signs and checks timed tokens by (the cancel link's, CSRF's) to a second."""
    now = int(time.time())

    def set_to(second):
        monkeypatch.setattr("itsdangerous.timed.TimestampSigner.get_timestamp", lambda signer: second)

    set_to(now)
    return now, set_to


def test_a_cancel_link_a_day_old_still_cancels_its_checkout(app, web, buyer, stripe_api, monkeypatch):
    signed_at, set_clock = signing_clock(monkeypatch)
    _, sent = buy(web, stripe_api)
    expired = expire_at_stripe(stripe_api)
    set_clock(signed_at + 24 * 3600)
    web.get(cancel_link(sent))
    assert payment(app).status == "expired" and expired.call_count == 1


def test_a_cancel_link_older_than_a_checkout_can_live_cancels_nothing(app, web, buyer, stripe_api, monkeypatch):
    signed_at, set_clock = signing_clock(monkeypatch)
    _, sent = buy(web, stripe_api)
    # The customer comes back a day and a second later (Checkout Sessions expire at Stripe after 24 hours).
    set_clock(signed_at + 24 * 3600 + 1)
    page = web.get(cancel_link(sent), follow_redirects=True).get_data(as_text=True)
    assert "Checkout was cancelled: nothing was charged." in page
    assert payment(app).status == "open"
    assert [call.request.url for call in stripe_api.calls if "/expire" in call.request.url] == []


def test_a_checkout_session_that_expires_unpaid_shows_as_expired(app, web, buyer, stripe_api):
    buy(web, stripe_api)
    expired = checkout_session(buyer, payment_status="unpaid", status="expired", payment_intent=None)
    response = deliver(app.test_client(), event("checkout.session.expired", expired))
    assert response.status_code == 200
    assert payment(app).status == "expired" and factories.balance(app, buyer) == 100
    page = web.get("/billing/success?session_id=cs_test_1").get_data(as_text=True)
    assert 'data-state="expired"' in page and 'http-equiv="refresh"' not in page
    # A late expiry of a session already paid changes nothing.
    buy(web, stripe_api, session_id="cs_test_2")
    deliver(
        app.test_client(),
        event("checkout.session.completed", checkout_session(buyer, "cs_test_2", payment_intent="pi_2")),
    )
    deliver(
        app.test_client(),
        event("checkout.session.expired", checkout_session(buyer, "cs_test_2", payment_intent="pi_2")),
    )
    assert payment(app, "cs_test_2").status == "paid"


# Amounts Stripe's events carry: whole, non-negative numbers of cents, or the event is refused


def stored(app) -> tuple:
    """What an event can leave behind: its row, reversals, ledger lines, payment states."""
    with app.app_context():
        return (
            db.session.scalars(select(StripeEvent.id).order_by(StripeEvent.id)).all(),
            db.session.scalars(select(PaymentReversal.amount_cents)).all(),
            db.session.scalar(select(func.count(LedgerEntry.id))),
            db.session.scalars(select(Payment.status).order_by(Payment.id)).all(),
        )


BAD_AMOUNTS = [-500, -1, "lots", "500", 2.5, 500.0, True, False, None, [500], {"value": 500}, 10**30]


@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
@pytest.mark.parametrize("kind", ["refund", "dispute"])
def test_a_signed_reversal_whose_amount_is_not_whole_cents_is_refused_logged_and_not_stored(
    app, web, buyer, stripe_api, client, caplog, kind, amount
):
    paid(app, web, buyer, stripe_api, client)
    before = stored(app)
    caplog.set_level("WARNING")
    if kind == "refund":
        payload = event("charge.refunded", charge(amount_refunded=amount), "evt_bad_amount")
    else:
        payload = event("charge.dispute.closed", dispute(amount=amount), "evt_bad_amount")
    response = deliver(client, payload)
    assert response.status_code == 400 and response.get_json() == {"detail": "Malformed event."}
    assert any("evt_bad_amount" in message and "cents" in message for message in caplog.messages)
    assert stored(app) == before and factories.balance(app, buyer) == 10100
    audit = app.test_cli_runner().invoke(args=["audit"])
    assert audit.exit_code == 0 and "Audit passed" in audit.output


@pytest.mark.parametrize("amount", [-500, "lots", 2.5, True, 10**30], ids=repr)
def test_a_paid_checkout_whose_amount_total_is_not_whole_cents_is_refused_and_credits_nothing(
    app, web, buyer, stripe_api, client, amount
):
    buy(web, stripe_api)
    before = stored(app)
    response = deliver(client, event("checkout.session.completed", checkout_session(buyer, amount_total=amount)))
    assert response.status_code == 400 and stored(app) == before and factories.balance(app, buyer) == 100


def test_a_checkout_without_an_amount_total_is_credited_as_recorded(app, web, buyer, stripe_api, client):
    buy(web, stripe_api)
    response = deliver(client, event("checkout.session.completed", checkout_session(buyer, amount_total=None)))
    assert response.status_code == 200 and factories.balance(app, buyer) == 10100


def test_a_zero_refund_is_a_whole_amount_and_takes_nothing(app, web, buyer, stripe_api, client):
    paid(app, web, buyer, stripe_api, client)
    assert deliver(client, event("charge.refunded", charge(amount_refunded=0))).status_code == 200
    assert factories.balance(app, buyer) == 10100


# What the webhook catches: only what it means.


def test_a_bug_while_applying_an_event_is_answered_500_with_its_traceback_and_applies_when_sent_again(
    app, web, buyer, stripe_api, client, monkeypatch, caplog
):
    from app import payments

    # As in production: an unhandled error is answered 500 (tests otherwise let it propagate).
    app.config["PROPAGATE_EXCEPTIONS"] = False
    buy(web, stripe_api)
    before = stored(app)

    def planted(session_obj):
        raise KeyError("a bug planted in the fulfilment")

    monkeypatch.setattr(payments, "_fulfill", planted)
    payload = event("checkout.session.completed", checkout_session(buyer), "evt_bug")
    response = deliver(client, payload)
    # Not "Malformed event." (Stripe would give up on an event it sent as it always does), and not
    # "already processed": Stripe sends a 5xx again, and the log holds the traceback.
    assert response.status_code == 500
    assert any(record.exc_info and "a bug planted" in str(record.exc_info[1]) for record in caplog.records)
    assert stored(app) == before and factories.balance(app, buyer) == 100
    monkeypatch.undo()
    again = deliver(client, payload)
    assert again.status_code == 200 and again.get_json()["outcome"].startswith("credited 10000")
    assert factories.balance(app, buyer) == 10100


def test_a_conflict_other_than_the_event_ids_own_is_a_bug_not_a_redelivery(
    app, web, buyer, stripe_api, client, monkeypatch, caplog
):
    from sqlalchemy.exc import IntegrityError

    from app import billing

    app.config["PROPAGATE_EXCEPTIONS"] = False
    buy(web, stripe_api)

    def conflict(*args, **kwargs):
        raise IntegrityError("INSERT INTO ledger_entries", {}, Exception("duplicate key"))

    monkeypatch.setattr(billing, "apply", conflict)
    payload = event("checkout.session.completed", checkout_session(buyer), "evt_conflict")
    assert deliver(client, payload).status_code == 500
    monkeypatch.undo()
    assert deliver(client, payload).get_json()["outcome"].startswith("credited 10000")
    # Delivered a third time, it is the redelivery it looks like, and the log says which event came again.
    caplog.set_level("INFO", logger="app")
    assert deliver(client, payload).get_json()["outcome"] == "already processed"
    assert factories.balance(app, buyer) == 10100
    assert "stripe event evt_conflict delivered again: already processed" in caplog.messages


@pytest.mark.parametrize(
    "broken",
    [
        {"payment_status": None},
        {"payment_status": 1},
        {"id": ["cs_test_1"]},
        {"client_reference_id": {"id": 1}},
        {"payment_intent": 7},
    ],
    ids=repr,
)
def test_a_signed_checkout_event_missing_a_field_or_of_another_shape_is_refused_and_not_stored(
    app, web, buyer, stripe_api, client, broken
):
    buy(web, stripe_api)
    before = stored(app)
    session = {**checkout_session(buyer), **broken}
    if broken == {"payment_status": None}:
        del session["payment_status"]
    response = deliver(client, event("checkout.session.completed", session, "evt_shape"))
    assert response.status_code == 400 and response.get_json() == {"detail": "Malformed event."}
    assert stored(app) == before and factories.balance(app, buyer) == 100


@pytest.mark.parametrize(
    "where,value",
    [
        ("id", "evt_" + "x" * 1000),
        ("id", "evt_\x00nul"),
        ("id", "evt_\udfff"),
        ("type", "checkout.session.completed" + "x" * 100),
        ("payment_intent", "pi_\x00"),
        ("payment_intent", "pi_\ud800"),
        ("payment_intent", "pi_" + "x" * 5000),
        ("session", "cs_test_\x00"),
    ],
    # Named, not repr'd: an id holding NUL or a lone surrogate cannot be asked for again by name (mutmut does).
    ids=[
        "long id",
        "id with NUL",
        "id with lone surrogate",
        "long type",
        "intent with NUL",
        "intent with lone surrogate",
        "long intent",
        "session with NUL",
    ],
)
def test_a_signed_event_with_an_id_stripe_never_writes_is_refused_not_a_500(
    app, web, buyer, stripe_api, client, where, value
):
    import json

    buy(web, stripe_api)
    before = stored(app)
    session = checkout_session(buyer)
    if where in ("payment_intent", "session"):
        session["payment_intent" if where == "payment_intent" else "id"] = value
    document = json.loads(event("checkout.session.completed", session, "evt_odd"))
    if where in ("id", "type"):
        document[where] = value
    # Lone surrogates survive as JSON escapes, as a forged body could carry them.
    payload = json.dumps(document).encode()
    response = deliver(client, payload)
    assert response.status_code == 400 and response.get_json() == {"detail": "Malformed event."}
    assert stored(app) == before and factories.balance(app, buyer) == 100
