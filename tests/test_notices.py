"""Mail about money: receipts for top-ups, notices of refunds and disputes, one low-balance alert."""

import pytest
from sqlalchemy import select

from app import billing, metering, teams
from app.extensions import db
from app.models import Team, User
from tests import factories
from tests.factories import mails
from tests.stripe_helpers import charge, checkout_session, deliver, dispute, event


def pay_starter(app, customer, session_id="cs_test_1", payment_intent="pi_1"):
    with app.app_context():
        factories.starter_payment(customer.team_id, session_id)
        db.session.commit()
    payload = event(
        "checkout.session.completed", checkout_session(customer.team_id, session_id, payment_intent=payment_intent)
    )
    assert deliver(app.test_client(), payload).status_code == 200


def debit(app, team_id, credits):
    factories.charged(app, team_id, characters=credits)


# Receipts and reversals


def test_a_credited_top_up_sends_a_receipt(app):
    customer = factories.customer(app, balance=250)
    pay_starter(app, customer)
    [receipt] = mails(app, customer.email)
    assert receipt.kind == "receipt" and receipt.subject == "Receipt: 10,000 kokoro-pay credits"
    for line in ("Pack:          starter", "Paid:          5.00 USD", "Credits:       10,000", "New balance:   10,250"):
        assert line in receipt.body
    assert "cs_test_1" in receipt.body and "http://localhost/billing" in receipt.body
    assert "Stripe's receipt" not in receipt.body  # a Checkout Session carries no receipt link
    # Stripe redelivers the event: credited once, one receipt.
    payload = event("checkout.session.completed", checkout_session(customer.team_id))
    deliver(app.test_client(), payload)
    assert len(mails(app, customer.email, "receipt")) == 1


def test_a_pending_payment_sends_its_receipt_when_it_is_paid(app):
    customer = factories.customer(app)
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_test_1")
        db.session.commit()
    deliver(
        app.test_client(),
        event("checkout.session.completed", checkout_session(customer.team_id, payment_status="unpaid")),
    )
    assert mails(app, customer.email) == []
    deliver(app.test_client(), event("checkout.session.async_payment_succeeded", checkout_session(customer.team_id)))
    assert [row.kind for row in mails(app, customer.email)] == ["receipt"]


def test_a_refund_sends_a_notice_of_what_was_taken_back_with_stripes_receipt(app):
    customer = factories.customer(app)
    pay_starter(app, customer)
    refund = {**charge(amount_refunded=250), "receipt_url": "https://pay.stripe.com/receipts/acct_1/ch_1/rcpt_1"}
    deliver(app.test_client(), event("charge.refunded", refund))
    [notice] = mails(app, customer.email, "reversal")
    assert notice.subject == "Your refund: 5,000 credits taken back"
    assert "was refunded: 2.50 of 5.00 USD in all so far" in notice.body
    assert "Credits taken back now:  5,000" in notice.body and "New balance:             5,000 credits" in notice.body
    assert "Stripe's receipt: https://pay.stripe.com/receipts/acct_1/ch_1/rcpt_1" in notice.body
    assert "Your payments: http://localhost/billing" in notice.body


def test_a_dispute_after_a_partial_refund_tells_what_was_taken_back_in_all(app):
    customer = factories.customer(app)
    pay_starter(app, customer)
    deliver(app.test_client(), event("charge.refunded", charge(amount_refunded=100)))
    deliver(app.test_client(), event("charge.dispute.closed", dispute(amount=400)))
    first, second = mails(app, customer.email, "reversal")
    assert "1.00 of 5.00 USD in all so far" in first.body and "Credits taken back now:  2,000" in first.body
    assert "was decided against it: 5.00 of 5.00 USD in all so far" in second.body
    assert "Credits taken back now:  8,000" in second.body and "New balance:             0 credits" in second.body


def test_a_lost_dispute_after_the_credits_were_spent_says_what_could_not_be_taken(app):
    customer = factories.customer(app)
    pay_starter(app, customer)
    debit(app, customer.team_id, 9_000)
    deliver(app.test_client(), event("charge.dispute.closed", dispute()))
    [notice] = mails(app, customer.email, "reversal")
    assert notice.subject == "A disputed payment was reversed: 10,000 credits taken back"
    assert "Credits taken back now:  1,000" in notice.body and "Already spent:           9,000" in notice.body
    assert "New balance:             0 credits" in notice.body


# Low-balance alerts


def test_crossing_the_threshold_sends_one_alert_until_a_top_up_re_arms_it(make_app):
    app = make_app(LOW_BALANCE_CREDITS=1000)
    customer = factories.customer(app, balance=1500)
    debit(app, customer.team_id, 400)  # 1,100: above
    assert mails(app, customer.email) == []
    debit(app, customer.team_id, 200)  # 900: crossed
    [alert] = mails(app, customer.email)
    assert alert.kind == "low_balance" and alert.subject == "Your kokoro-pay balance is low: 900 credits"
    assert "fallen below 1,000 credits" in alert.body
    assert "Buy credits: /billing" in alert.body and "account page: /account" in alert.body
    debit(app, customer.team_id, 800)  # 100: still below, no second mail
    assert len(mails(app, customer.email)) == 1

    pay_starter(app, customer)  # 10,100: re-armed
    debit(app, customer.team_id, 9_500)  # 600: crossed again
    assert [row.kind for row in mails(app, customer.email)] == ["low_balance", "receipt", "low_balance"]


def test_the_threshold_itself_is_not_below_it(make_app):
    app = make_app(LOW_BALANCE_CREDITS=1000)
    customer = factories.customer(app, balance=1100)
    debit(app, customer.team_id, 100)  # exactly 1,000: not below
    assert mails(app, customer.email) == []
    debit(app, customer.team_id, 1)  # 999, from exactly the threshold: crossed
    assert [row.kind for row in mails(app, customer.email)] == ["low_balance"]


def test_only_credits_the_customer_paid_for_or_was_given_re_arm_the_alert(make_app):
    app = make_app(LOW_BALANCE_CREDITS=1000)
    customer = factories.customer(app, balance=1500)
    debit(app, customer.team_id, 600)  # 900: alert one
    # A refund of a failed request back above the threshold does not re-arm it ...
    with app.app_context():
        request_id = metering.charge_speech(
            customer.team_id,
            customer.user_id,
            customer.key_id,
            unlimited=False,
            characters=100,
            model="kokoro",
            voice="af_sky",
            response_format="mp3",
        ).request_id
        db.session.commit()
        billing.grant(db.session.get(Team, customer.team_id), 150, "to cross back with the refund")
        db.session.commit()
    # (a grant to 950 is still below: nothing re-armed)
    with app.app_context():
        metering.refund_speech(request_id, "upstream failed", audio_ms=0)  # 1,050
        db.session.commit()
    debit(app, customer.team_id, 100)  # 950 again: no second mail
    assert len(mails(app, customer.email, "low_balance")) == 1
    # ... a grant that reaches exactly the threshold does.
    with app.app_context():
        billing.grant(db.session.get(Team, customer.team_id), 50, "back to 1,000")
        db.session.commit()
    debit(app, customer.team_id, 1)
    assert len(mails(app, customer.email, "low_balance")) == 2


def test_a_free_trial_spent_below_the_threshold_shows_no_banner_and_sends_no_mail(make_app):
    # The development .env's trial (1,000) is the default threshold (1,000): one sentence crossed it.
    app = make_app(SIGNUP_CREDITS=1000, LOW_BALANCE_CREDITS=1000)
    web = factories.WebClient(app.test_client())
    web.signup("trial@example.com")
    web.login("trial@example.com")
    with app.app_context():
        user_id = db.session.scalar(select(User.id).where(User.email == "trial@example.com"))
    factories.add_key(app, user_id)
    team_id = factories.team_of(app, user_id)
    pay_starter(app, factories.customer(app))  # another account bought credits: not this one
    debit(app, team_id, 88)  # 912 left
    for page in ("/", "/keys", "/playground", "/account"):
        assert "Your balance is low" not in web.get(page).get_data(as_text=True), page
    debit(app, team_id, 912)  # nothing left: still no alert (402s say so from here on)
    assert mails(app, "trial@example.com", "low_balance") == []
    # The account page says why: no threshold of its own on the free trial.
    assert "On the free trial you get none unless you set one here" in web.get("/account").get_data(as_text=True)


def test_once_credits_are_bought_the_default_alert_applies_to_the_whole_balance(make_app):
    app = make_app(SIGNUP_CREDITS=1000, LOW_BALANCE_CREDITS=1000)
    web = factories.WebClient(app.test_client())
    web.signup("buyer@example.com")
    web.login("buyer@example.com")
    with app.app_context():
        user_id = db.session.scalar(select(User.id).where(User.email == "buyer@example.com"))
    factories.add_key(app, user_id)
    customer = factories.Customer(user_id, "buyer@example.com", None, None, factories.team_of(app, user_id))
    pay_starter(app, customer)  # 11,000
    debit(app, customer.team_id, 10_100)  # 900
    assert len(mails(app, "buyer@example.com", "low_balance")) == 1
    assert "Your balance is low: <span data-balance>900</span> credits left." in web.get("/keys").get_data(as_text=True)


def test_a_balance_that_starts_below_the_threshold_is_not_alerted_until_it_crosses_it(make_app):
    app = make_app(LOW_BALANCE_CREDITS=1000)
    customer = factories.customer(app, balance=500)
    debit(app, customer.team_id, 100)
    assert mails(app, customer.email) == []


def test_each_account_sets_its_threshold_or_turns_the_alert_off(app, web):
    web.signup("alerts@example.com")
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == "alerts@example.com"))
        user_id, team_id = user.id, teams.personal(user).id
        billing.grant(teams.personal(user), 6000, "test")
        db.session.commit()
    factories.add_key(app, user_id)
    assert 'value="1000"' in web.get("/account").get_data(as_text=True)
    bad = web.post("/account/alert", {"threshold": "-5"})
    assert bad.status_code == 400 and "0 or more" in bad.get_data(as_text=True)
    assert web.post("/account/alert", {"threshold": "5000"}).headers["Location"] == "/account"
    debit(app, team_id, 2000)  # 4,000 < 5,000
    assert [row.kind for row in mails(app, "alerts@example.com")][-1] == "low_balance"
    web.get("/account")
    web.post("/account/alert", {"threshold": "0"})
    debit(app, team_id, 3900)
    assert len(mails(app, "alerts@example.com", "low_balance")) == 1


def test_unlimited_accounts_get_no_alert(make_app):
    app = make_app(LOW_BALANCE_CREDITS=1000)
    customer = factories.customer(app, unlimited=True)
    factories.charged(app, customer.team_id, count=3, characters=5000)
    assert mails(app, customer.email) == []


@pytest.mark.usefixtures("postgres_only")
def test_twenty_concurrent_debits_that_cross_the_threshold_send_one_alert(make_app):
    app = make_app(LOW_BALANCE_CREDITS=1000)
    customer = factories.customer(app, balance=1990)
    assert factories.race_charges(app, customer, count=20, characters=99) == {"charged": 20}
    assert factories.balance(app, customer.team_id) == 10
    [alert] = mails(app, customer.email)
    assert alert.kind == "low_balance"
    factories.assert_books_balance(app, customer.team_id)
