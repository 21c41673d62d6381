"""Customers run their own accounts by email: verify, reset, change the email, a free trial, delete.

Mail is read from the outbox, as the development outbox page shows it (tests/test_mail.py
sends it through a real SMTP server).
"""

import re
import time

import pytest
from sqlalchemy import func, select

from app.audit import audit
from app.extensions import db
from app.models import LedgerEntry, LoginSession, OutboxMail, User
from tests import factories
from tests.factories import mail_link, mails
from tests.fake_upstream import FakeUpstream
from tests.servers import serve

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
def app(make_app):
    return make_app(SIGNUP_CREDITS=300)


def user(app, email) -> User | None:
    with app.app_context():
        found = db.session.scalar(select(User).where(User.email == email))
        db.session.expunge_all()
        return found


def books_are_clean(app) -> bool:
    with app.app_context():
        return not audit().problems


# Sign-up and verification


def test_sign_up_asks_to_check_the_inbox_and_signs_nobody_in(app, web):
    response = web.register("Someone@Example.com")
    text = response.get_data(as_text=True)
    assert response.status_code == 200 and "Check your inbox" in text and "someone@example.com" in text
    assert web.get("/keys").status_code == 302  # not signed in
    [verify] = mails(app, "someone@example.com")
    assert verify.kind == "verify" and verify.subject == "Confirm your email for kokoro-pay"
    assert "http://localhost/verify/" in verify.body and "72 hours" in verify.body and "300 free credits" in verify.body
    created = user(app, "someone@example.com")
    assert not created.verified and created.balance == 0


def test_sign_up_never_says_whether_an_email_has_an_account(app, web):
    factories.customer(app)  # ids differ from the email's owner
    first = web.register("taken@example.com").get_data(as_text=True)
    again = (
        factories.WebClient(app.test_client()).register("TAKEN@example.com", "another password!").get_data(as_text=True)
    )
    assert again == first
    assert user(app, "taken@example.com").password_hash is not None
    with app.app_context():
        assert db.session.scalar(select(func.count(User.id)).where(User.email == "taken@example.com")) == 1
    # The owner hears that someone tried; a third try within minutes sends nothing more.
    factories.WebClient(app.test_client()).register("taken@example.com")
    assert [row.kind for row in mails(app, "taken@example.com")] == ["verify", "signup_taken"]
    assert "/forgot" in mails(app, "taken@example.com", "signup_taken")[0].body


def test_an_unverified_account_signs_in_but_cannot_make_keys_or_buy(app, web):
    web.register("late@example.com")
    assert web.login("late@example.com").status_code == 302
    page = web.get("/keys").get_data(as_text=True)
    assert "Confirm your email to create keys and buy credits" in page
    refused = web.post("/keys", {"name": "laptop"})
    assert refused.status_code == 302 and refused.headers["Location"] == "/"
    assert "Confirm your email first" in web.get("/").get_data(as_text=True)
    web.get("/billing")
    assert web.post("/billing/checkout", {"pack": "starter"}).headers["Location"] == "/"
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(LedgerEntry)) == 0
    assert _keys(app, user(app, "late@example.com").id) == []


def test_the_verification_link_opens_keys_and_purchases_and_grants_the_trial_once(app, web):
    web.register("new@example.com")
    link = mail_link(app, "new@example.com", "verify")
    web.login("new@example.com")
    response = web.get(link)
    assert response.headers["Location"] == "/keys"
    page = web.get("/keys").get_data(as_text=True)
    assert "300 free credits are on your balance" in page and "Confirm your email to" not in page
    assert web.post("/keys", {"name": "laptop"}).status_code == 200
    verified = user(app, "new@example.com")
    assert verified.verified and verified.balance == 300
    assert factories.ledger(app, verified.id) == [("trial", 300, 300)]
    # The link again, or a new one: no second trial.
    web.get(link)
    assert factories.ledger(app, verified.id) == [("trial", 300, 300)]
    assert books_are_clean(app)


def test_a_newcomer_hears_speech_on_the_trial_without_stripe(make_app):
    with serve(FakeUpstream()) as upstream_url:
        app = make_app(SIGNUP_CREDITS=300, STRIPE_SECRET_KEY=None, UPSTREAM_URL=f"{upstream_url}/v1")
        web = factories.WebClient(app.test_client())
        web.signup("trial@example.com")
        web.get("/keys")
        secret = re.search(r'id="new-key"[^>]*>\s*(kp_live_[\w-]+)', web.post("/keys", {}).get_data(as_text=True))[1]
        response = app.test_client().post(
            "/v1/audio/speech",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": "kokoro", "input": "Hello from the free trial.", "voice": "af_sky"},
        )
        assert response.status_code == 200 and response.data.startswith(b"ID3")
    assert factories.balance(app, user(app, "trial@example.com").id) == 300 - len("Hello from the free trial.")
    assert books_are_clean(app)


def test_a_bad_or_expired_verification_link_changes_nothing(make_app):
    app = make_app(VERIFY_HOURS=0.0001, SIGNUP_CREDITS=300)  # 0.36 s
    web = factories.WebClient(app.test_client())
    web.register("slow@example.com")
    link = mail_link(app, "slow@example.com", "verify")
    web.get(link[:-3] + "abc")
    assert "This link is not valid" in web.get("/login").get_data(as_text=True)
    time.sleep(1.1)
    web.get(link)
    assert "This link has expired" in web.get("/login").get_data(as_text=True)
    assert not user(app, "slow@example.com").verified and user(app, "slow@example.com").balance == 0


def test_a_new_verification_link_can_be_asked_for_once_a_minute_or_two(app, web):
    web.register("resend@example.com")
    web.login("resend@example.com")
    web.get("/")
    assert "a moment ago" in web.client.post(
        "/verify/resend", data={"csrf_token": web.token}, follow_redirects=True
    ).get_data(as_text=True)
    assert len(mails(app, "resend@example.com", "verify")) == 1


# Passwords


def test_a_forgotten_password_is_reset_by_a_link_that_works_once(app, web):
    web.signup("forgetful@example.com")
    elsewhere = factories.WebClient(app.test_client())
    elsewhere.login("forgetful@example.com")
    anonymous = factories.WebClient(app.test_client())
    anonymous.get("/forgot")
    answer = anonymous.post("/forgot", {"email": "Forgetful@example.com"}).get_data(as_text=True)
    assert "Check your inbox" in answer
    link = mail_link(app, "forgetful@example.com", "reset")
    assert "60 minutes" in mails(app, "forgetful@example.com", "reset")[0].body

    page = anonymous.get(link)
    assert page.status_code == 200 and "forgetful@example.com" in page.get_data(as_text=True)
    done = anonymous.post(link, {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD})
    assert done.headers["Location"] == "/login"
    # Every sign-in ended; the old password is gone, the new one works.
    assert web.get("/keys").status_code == 302 and elsewhere.get("/keys").status_code == 302
    assert "Wrong email or password." in anonymous.login("forgetful@example.com").get_data(as_text=True)
    assert anonymous.login("forgetful@example.com", NEW_PASSWORD).status_code == 302
    assert mails(app, "forgetful@example.com")[-1].kind == "password_changed"
    # Used once: the same link now sends the visitor back to ask for a new one.
    again = factories.WebClient(app.test_client()).get(link)
    assert again.headers["Location"] == "/forgot"


def test_a_reset_link_sent_to_an_address_the_account_has_left_does_not_work(app, web):
    web.signup("moving@example.com")
    web.logout()
    web.get("/forgot")
    web.post("/forgot", {"email": "moving@example.com"})
    link = mail_link(app, "moving@example.com", "reset")
    web.login("moving@example.com")
    web.get("/account")
    web.post("/account/email", {"email": "moved@example.com", "current": PASSWORD})
    web.post(mail_link(app, "moved@example.com", "email_change"), {})
    assert user(app, "moved@example.com") is not None
    assert factories.WebClient(app.test_client()).get(link).headers["Location"] == "/forgot"


def test_forgot_password_says_the_same_for_an_email_without_an_account(app, web):
    web.signup("known@example.com")
    answers = []
    for email in ("known@example.com", "nobody@example.com"):
        visitor = factories.WebClient(app.test_client())
        visitor.get("/forgot")
        answers.append(visitor.post("/forgot", {"email": email}).get_data(as_text=True).replace(email, "EMAIL"))
    assert answers[0] == answers[1]
    assert mails(app, "nobody@example.com") == []
    assert len(mails(app, "known@example.com", "reset")) == 1


def test_an_expired_reset_link_changes_nothing(make_app):
    app = make_app(RESET_MINUTES=0.005)  # 0.3 s
    web = factories.WebClient(app.test_client())
    web.signup("late@example.com")
    web.logout()
    web.get("/forgot")
    web.post("/forgot", {"email": "late@example.com"})
    time.sleep(1.1)
    link = mail_link(app, "late@example.com", "reset")
    assert web.get(link).headers["Location"] == "/forgot"
    assert web.login("late@example.com").status_code == 302


def test_changing_the_password_needs_the_current_one_and_tells_the_owner(app, web):
    web.signup("owner@example.com")
    web.get("/account")
    wrong = web.post("/account", {"current": "not it at all", "password": NEW_PASSWORD, "confirm": NEW_PASSWORD})
    assert wrong.status_code == 400 and "That is not your current password." in wrong.get_data(as_text=True)
    assert (
        web.post("/account", {"current": PASSWORD, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD}).status_code
        == 302
    )
    assert mails(app, "owner@example.com")[-1].kind == "password_changed"


def test_the_operator_sets_a_password_at_a_prompt(app, runner, web):
    runner.invoke(args=["users", "create", "op@example.com"])
    result = runner.invoke(args=["users", "set-password", "op@example.com"], input=f"{NEW_PASSWORD}\n{NEW_PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert NEW_PASSWORD not in result.output
    assert web.login("op@example.com", NEW_PASSWORD).status_code == 302
    # An operator's account is verified: it makes keys at once.
    web.get("/keys")
    assert web.post("/keys", {"name": "cli"}).status_code == 200
    short = runner.invoke(args=["users", "set-password", "op@example.com"], input="short\nshort\n")
    assert short.exit_code == 1 and "at least 10 characters" in short.output


# The email address


def test_the_email_changes_only_when_the_new_address_confirms(app, web):
    web.signup("old@example.com")
    owner = user(app, "old@example.com")
    web.get("/account")
    response = web.post("/account/email", {"email": "New@Example.com", "current": PASSWORD})
    assert response.headers["Location"] == "/account"
    assert user(app, "old@example.com") is not None  # nothing changed yet
    link = mail_link(app, "new@example.com", "email_change")

    page = web.get(link)
    assert page.status_code == 200 and "new@example.com" in page.get_data(as_text=True)
    web.post(link, {})
    assert user(app, "new@example.com").id == owner.id and user(app, "old@example.com") is None
    [notice] = mails(app, "old@example.com", "email_changed")
    assert "new@example.com" in notice.body
    web.logout()
    assert web.login("new@example.com").status_code == 302
    # The link worked once.
    web.get(link)
    assert "used already" in web.get("/account").get_data(as_text=True)


def test_an_email_change_to_an_address_with_an_account_tells_its_owner_only(app, web):
    other = factories.customer(app)
    web.signup("mine@example.com")
    web.get("/account")
    web.post("/account/email", {"email": other.email, "current": PASSWORD})
    assert [row.kind for row in mails(app, other.email)] == ["signup_taken"]
    assert user(app, "mine@example.com") is not None


def test_an_email_change_needs_the_current_password(app, web):
    web.signup("mine@example.com")
    web.get("/account")
    response = web.post("/account/email", {"email": "elsewhere@example.com", "current": "wrong password"})
    assert response.status_code == 400 and "That is not your current password." in response.get_data(as_text=True)
    assert mails(app, "elsewhere@example.com") == []


# Deleting an account


def test_deleting_an_account_erases_the_owner_and_keeps_the_books(app, web):
    web.signup("leaving@example.com")
    leaving = user(app, "leaving@example.com")
    secret = factories.add_key(app, leaving.id)
    assert app.test_client().get("/v1/balance", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    web.get("/account")
    refused = web.post("/account/delete", {"current": PASSWORD})
    assert refused.status_code == 400 and "Tick the box to confirm." in refused.get_data(as_text=True)
    assert web.post("/account/delete", {"current": PASSWORD, "understood": "y"}).headers["Location"] == "/login"

    assert app.test_client().get("/v1/balance", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert web.get("/keys").status_code == 302
    assert "Wrong email or password." in web.login("leaving@example.com").get_data(as_text=True)
    gone = user(app, f"deleted-{leaving.id}@deleted.invalid")
    assert gone.password_hash is None and gone.deleted_at is not None and gone.balance == 300
    assert all(key.name == "" and key.revoked for key in _keys(app, leaving.id))
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(LoginSession)) == 0
        assert db.session.scalar(select(func.count()).where(OutboxMail.recipient == "leaving@example.com")) == 0
    assert factories.ledger(app, leaving.id) == [("trial", 300, 300)]
    assert books_are_clean(app)
    # The address is free for a new account.
    assert "Check your inbox" in factories.WebClient(app.test_client()).register("leaving@example.com").get_data(
        as_text=True
    )


def _keys(app, user_id):
    with app.app_context():
        found = db.session.get(User, user_id).keys
        db.session.expunge_all()
        return found
