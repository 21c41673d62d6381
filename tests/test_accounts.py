"""Customers run their own accounts by email: verify, reset, change the email, a free trial, delete.

Mail is read from the outbox, as the development outbox page shows it (tests/test_mail.py
sends it through a real SMTP server).
"""

import itertools
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask_migrate import downgrade, upgrade
from sqlalchemy import func, select

from app import accounts, mail
from app.audit import audit
from app.extensions import db
from app.models import ApiKey, LedgerEntry, LoginSession, MailStamp, OutboxMail, TrialClaim, User
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
    assert not created.verified and factories.personal_balance(app, created) == 0


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
    assert verified.verified and factories.personal_balance(app, verified) == 300
    assert factories.ledger(app, factories.team_of(app, verified.id)) == [("trial", 300, 300)]
    # The link again, or a new one: no second trial.
    web.get(link)
    assert factories.ledger(app, factories.team_of(app, verified.id)) == [("trial", 300, 300)]
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
    assert factories.balance(app, factories.team_of(app, user(app, "trial@example.com").id)) == 300 - len(
        "Hello from the free trial."
    )
    assert books_are_clean(app)


def test_a_bad_or_expired_verification_link_changes_nothing(make_app, freeze):
    app = make_app(VERIFY_HOURS=24, SIGNUP_CREDITS=300)
    advance = freeze(accounts)
    web = factories.WebClient(app.test_client())
    web.register("slow@example.com")
    link = mail_link(app, "slow@example.com", "verify")
    web.get(link[:-3] + "abc")
    assert "This link is not valid" in web.get("/login").get_data(as_text=True)
    advance(24 * 3600 + 1)
    web.get(link)
    assert "This link has expired" in web.get("/login").get_data(as_text=True)
    assert (
        not user(app, "slow@example.com").verified
        and factories.personal_balance(app, user(app, "slow@example.com")) == 0
    )


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


def test_an_expired_reset_link_changes_nothing(make_app, freeze):
    app = make_app(RESET_MINUTES=60)
    advance = freeze(accounts)
    web = factories.WebClient(app.test_client())
    web.signup("late@example.com")
    web.logout()
    web.get("/forgot")
    web.post("/forgot", {"email": "late@example.com"})
    link = mail_link(app, "late@example.com", "reset")
    advance(60 * 60)
    assert web.get(link).status_code == 200  # to the second, as the mail says
    advance(1)
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
    assert gone.password_hash is None and gone.deleted_at is not None and factories.personal_balance(app, gone) == 300
    assert all(key.name == "" and key.revoked for key in _keys(app, leaving.id))
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(LoginSession)) == 0
        assert db.session.scalar(select(func.count()).where(OutboxMail.recipient == "leaving@example.com")) == 0
    assert factories.ledger(app, factories.team_of(app, leaving.id)) == [("trial", 300, 300)]
    assert books_are_clean(app)
    # The address is free for a new account.
    assert "Check your inbox" in factories.WebClient(app.test_client()).register("leaving@example.com").get_data(
        as_text=True
    )


def _keys(app, user_id):
    """The keys the person made."""
    with app.app_context():
        found = db.session.scalars(select(ApiKey).where(ApiKey.created_by_id == user_id).order_by(ApiKey.id)).all()
        db.session.expunge_all()
        return found


# One free trial per person (issue 28: trial farming)


time_passes = factories.time_passes


def sign_up_and_verify(app, email, ip="192.0.2.10"):
    """A visitor from `ip` signs up and opens the link; the flash message the link leaves, and the account."""
    web = factories.WebClient(app.test_client())
    web.get("/signup", environ_base={"REMOTE_ADDR": ip})
    web.post("/signup", {"email": email, "password": PASSWORD, "confirm": PASSWORD}, environ_base={"REMOTE_ADDR": ip})
    stored = accounts.normalize_email(email)
    web.client.get(mail_link(app, stored, "verify"), environ_base={"REMOTE_ADDR": ip})
    message = web.get("/login", environ_base={"REMOTE_ADDR": ip}).get_data(as_text=True)
    return message, user(app, stored)


@pytest.mark.parametrize(
    "typed",
    [
        '"x" <victim@example.com>',
        "junk,victim@example.com",
        "(c)victim@example.com",
        "victim(c)@example.com",
        '"victim"@example.com',
        "victim\u200b@example.com",
        "vic\u2060tim@example.com",
        "victim@example.com, other@example.com",
        "victim@example.com\u00ad",
    ],
)
def test_anything_but_one_plain_address_is_refused_and_mails_nobody(app, web, typed):
    response = web.register(typed)
    assert response.status_code == 400
    assert "Enter one plain email address" in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(select(func.count(User.id))) == 0
    assert mails(app) == []


def test_twenty_sign_ups_as_a_commented_victim_address_are_refused_and_queue_nothing(app):
    for number in range(20):
        visitor = factories.WebClient(app.test_client())
        response = visitor.register(f"({number})victim@example.com")
        assert response.status_code == 400 and "Enter one plain email address" in response.get_data(as_text=True)
    assert mails(app) == []


@pytest.mark.parametrize("again", ["me+1@gmail.com", "m.e@gmail.com", "ME@googlemail.com", "M.e+trial@GoogleMail.com"])
def test_a_second_sign_up_with_another_spelling_of_the_mailbox_gets_no_second_trial(app, again):
    message, first = sign_up_and_verify(app, "me@gmail.com")
    assert factories.personal_balance(app, first) == 300 and "300 free credits are on your balance" in message
    time_passes(app)
    message, second = sign_up_and_verify(app, again)
    # The account works; it just has no free credits, and nothing said it would.
    assert (
        second.verified
        and factories.personal_balance(app, second) == 0
        and factories.ledger(app, factories.team_of(app, second.id)) == []
    )
    assert "Your email is confirmed" in message and "free credits" not in message
    assert "free credits" not in mails(app, again.lower(), "verify")[0].body
    assert books_are_clean(app)


def test_deleting_the_account_and_signing_up_again_gets_no_second_trial(app):
    _, first = sign_up_and_verify(app, "again@example.com")
    assert factories.personal_balance(app, first) == 300
    web = factories.WebClient(app.test_client())
    web.login("again@example.com")
    web.get("/account")
    web.post("/account/delete", {"current": PASSWORD, "understood": "y"})
    time_passes(app)
    message, second = sign_up_and_verify(app, "again@example.com")
    assert second.id != first.id and second.verified and factories.personal_balance(app, second) == 0
    assert "free credits" not in message
    # What is remembered of the address is a keyed hash, not the address.
    with app.app_context():
        [claim] = db.session.scalars(select(TrialClaim)).all()
        assert "again" not in claim.mailbox and len(claim.mailbox) == 64


def test_a_mailbox_an_account_with_a_trial_moved_to_gets_no_trial_of_its_own(app):
    _, first = sign_up_and_verify(app, "first@example.com")
    web = factories.WebClient(app.test_client())
    web.login("first@example.com")
    change_email(app, web, "second@example.com")
    web.get("/account")
    web.post("/account/delete", {"current": PASSWORD, "understood": "y"})
    time_passes(app)
    assert factories.personal_balance(app, sign_up_and_verify(app, "second@example.com")[1]) == 0
    assert factories.personal_balance(app, sign_up_and_verify(app, "first+again@example.com")[1]) == 0


def test_an_internationalised_address_signs_up_and_gets_its_trial(app):
    message, verified = sign_up_and_verify(app, "Jörg@Bücher.de")
    assert verified.email == "jörg@bücher.de" and factories.personal_balance(app, verified) == 300
    time_passes(app)
    # Its mailbox is one, whichever way the domain is written.
    assert factories.personal_balance(app, sign_up_and_verify(app, "jörg+2@xn--bcher-kva.de")[1]) == 0


def test_two_accounts_of_one_mailbox_verified_at_the_same_moment_get_one_trial(app, postgres_only):
    links = []
    for typed in ("twin+1@gmail.com", "t.win+2@gmail.com"):
        factories.WebClient(app.test_client()).register(typed)
        links.append(mail_link(app, typed, "verify"))
        time_passes(app)
    barrier = threading.Barrier(2)

    def verify(link):
        client = app.test_client()
        barrier.wait(timeout=10)
        return client.get(link).status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(verify, links)) == [302, 302]
    twins = [user(app, typed) for typed in ("twin+1@gmail.com", "t.win+2@gmail.com")]
    assert all(twin.verified for twin in twins) and sorted(factories.personal_balance(app, twin) for twin in twins) == [
        0,
        300,
    ]


def test_trials_per_client_address_stop_at_the_daily_cap(make_app):
    app = make_app(SIGNUP_CREDITS=300, TRIALS_PER_IP_PER_DAY=2)
    granted = [
        factories.personal_balance(app, sign_up_and_verify(app, f"person{n}@example.com", ip="198.51.100.7")[1])
        for n in range(3)
    ]
    assert granted == [300, 300, 0]
    # Another client's sign-up still gets its trial; a link opened elsewhere counts for who signed up.
    assert (
        factories.personal_balance(app, sign_up_and_verify(app, "elsewhere@example.com", ip="198.51.100.8")[1]) == 300
    )
    # An IPv6 client counts by its /64.
    ipv6 = [
        factories.personal_balance(app, sign_up_and_verify(app, f"six{n}@example.com", ip=f"2001:db8:1:2::{n + 1}")[1])
        for n in range(3)
    ]
    assert ipv6 == [300, 300, 0]


def test_with_no_trials_per_client_address_verification_grants_nothing(make_app):
    app = make_app(SIGNUP_CREDITS=300, TRIALS_PER_IP_PER_DAY=0)
    message, verified = sign_up_and_verify(app, "capped@example.com")
    assert verified.verified and factories.personal_balance(app, verified) == 0 and "free credits" not in message


def test_trials_claimed_before_the_upgrade_count_for_their_mailbox(app):
    _, had_one = sign_up_and_verify(app, "early@gmail.com")
    assert factories.personal_balance(app, had_one) == 300
    with app.app_context():
        downgrade(revision="0007")
        upgrade()
    web = factories.WebClient(app.test_client())
    web.login("early@gmail.com")
    web.get("/account")
    web.post("/account/delete", {"current": PASSWORD, "understood": "y"})
    assert factories.personal_balance(app, sign_up_and_verify(app, "e.arly+2@gmail.com")[1]) == 0


# Mail limits (issue 28: mail floods)


def test_sign_ups_from_one_client_stop_queuing_mail_past_its_cap_and_say_the_same(make_app):
    app = make_app(MAILS_PER_IP="10/hour")
    pages = set()
    for number in range(20):
        visitor = factories.WebClient(app.test_client())
        page = visitor.register(f"flood{number}@example.com").get_data(as_text=True)
        pages.add(page.replace(f"flood{number}@example.com", "EMAIL"))
    assert len(pages) == 1 and "Check your inbox" in pages.pop()
    assert len(mails(app, kind="verify")) == 10
    # Another client is not held back by this one.
    other = factories.WebClient(app.test_client())
    elsewhere = {"REMOTE_ADDR": "192.0.2.99"}
    other.get("/signup", environ_base=elsewhere)
    other.post(
        "/signup", {"email": "other@example.com", "password": PASSWORD, "confirm": PASSWORD}, environ_base=elsewhere
    )
    assert len(mails(app, "other@example.com", "verify")) == 1


def test_one_mailbox_gets_one_mail_of_a_kind_in_the_interval_however_it_is_spelled(app):
    for typed in ("box@gmail.com", "b.o.x+1@gmail.com", "BOX+2@googlemail.com"):
        factories.WebClient(app.test_client()).register(typed)
    assert len(mails(app, kind="verify")) == 1
    time_passes(app)
    factories.WebClient(app.test_client()).register("box+3@gmail.com")
    assert len(mails(app, kind="verify")) == 2


def test_thirty_concurrent_forgot_password_requests_send_one_mail(app, postgres_only):
    web = factories.WebClient(app.test_client())
    web.signup("target@example.com")
    visitors = []
    for _ in range(30):
        visitor = factories.WebClient(app.test_client())
        visitor.get("/forgot")
        visitors.append(visitor)
    barrier = threading.Barrier(30)

    def forgot(number):
        barrier.wait(timeout=30)
        # Each from its own address: the per-client cap is not what stops them.
        address = {"REMOTE_ADDR": f"203.0.113.{number + 1}"}
        return visitors[number].post("/forgot", {"email": "target@example.com"}, environ_base=address).status_code

    with ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(forgot, range(30)))
    assert statuses == [200] * 30
    assert len(mails(app, "target@example.com", "reset")) == 1


def test_forgot_password_does_the_same_work_whether_or_not_the_address_has_an_account(app, web, monkeypatch):
    web.signup("known@example.com")
    calls = Counter()
    for name, module in (("compose", mail), ("first_in", mail), ("_tokens", accounts), ("find_by_email", accounts)):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    work = {}
    for email in ("known@example.com", "nobody@example.com"):
        calls.clear()
        visitor = factories.WebClient(app.test_client())
        visitor.get("/forgot")
        visitor.post("/forgot", {"email": email})
        work[email] = dict(calls)
    assert work["known@example.com"] == work["nobody@example.com"]
    assert work["nobody@example.com"]["compose"] == 1 and work["nobody@example.com"]["_tokens"] == 1
    # The limit's stamp is written either way; only the known address gets mail.
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(MailStamp).where(MailStamp.kind == "reset")) == 2
    assert mails(app, "nobody@example.com") == [] and len(mails(app, "known@example.com", "reset")) == 1


# Links bound to the account's state (issue 28, point 6)


def change_email(app, web, new_email):
    web.get("/account")
    web.post("/account/email", {"email": new_email, "current": PASSWORD})
    time_passes(app)
    return web.post(mail_link(app, new_email, "email_change"), {}, follow_redirects=True).get_data(as_text=True)


def test_a_reset_link_stops_working_once_the_email_goes_away_and_back(app, web):
    web.signup("a@example.com")
    anonymous = factories.WebClient(app.test_client())
    anonymous.get("/forgot")
    anonymous.post("/forgot", {"email": "a@example.com"})
    link = mail_link(app, "a@example.com", "reset")
    assert "Your email is now b@example.com" in change_email(app, web, "b@example.com")
    assert "Your email is now a@example.com" in change_email(app, web, "a@example.com")
    assert factories.WebClient(app.test_client()).get(link).headers["Location"] == "/forgot"


def test_an_email_change_link_stops_working_once_the_email_goes_away_and_back(app, web):
    web.signup("a@example.com")
    web.get("/account")
    web.post("/account/email", {"email": "c@example.com", "current": PASSWORD})
    old_link = mail_link(app, "c@example.com", "email_change")
    change_email(app, web, "b@example.com")
    change_email(app, web, "a@example.com")
    page = web.post(old_link, {}, follow_redirects=True).get_data(as_text=True)
    assert "changed since" in page and user(app, "a@example.com") is not None and user(app, "c@example.com") is None


def two_change_links(app, web):
    web.signup("a@example.com")
    web.get("/account")
    for new_email in ("b@example.com", "c@example.com"):
        web.post("/account/email", {"email": new_email, "current": PASSWORD})
    return [
        mail_link(app, new_email, "email_change").rpartition("/")[2] for new_email in ("b@example.com", "c@example.com")
    ]


def confirm(app, token, barrier=None) -> str:
    """Confirm an email change as the view does, waiting at `barrier` between reading the link and changing."""
    with app.app_context():
        change = accounts.read_email_change(token)
        if barrier is not None:
            barrier.wait(timeout=10)
        try:
            accounts.change_email(change)
            db.session.commit()
        except accounts.AccountError as error:
            db.session.rollback()
            return str(error)
        finally:
            db.session.remove()
        return "changed"


def test_of_two_email_change_links_read_before_either_is_confirmed_only_the_first_changes_it(app, web):
    first, second = two_change_links(app, web)
    with app.app_context():
        changes = [accounts.read_email_change(token) for token in (first, second)]
        accounts.change_email(changes[0])
        db.session.commit()
        with pytest.raises(accounts.AccountError, match="changed since"):
            accounts.change_email(changes[1])
        db.session.rollback()
    assert user(app, "b@example.com") is not None and user(app, "c@example.com") is None
    assert len(mails(app, "a@example.com", "email_changed")) == 1


def test_two_email_change_links_confirmed_at_the_same_moment_one_wins_and_the_other_is_told(app, web, postgres_only):
    tokens = two_change_links(app, web)
    barrier = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda token: confirm(app, token, barrier), tokens))
    assert sorted(answers) == ["The account's email changed since this link was sent; nothing changed.", "changed"]
    winner = ["b@example.com", "c@example.com"][answers.index("changed")]
    assert user(app, winner) is not None and user(app, "a@example.com") is None
    assert [row.body.count(winner) for row in mails(app, "a@example.com", "email_changed")] == [1]


def test_the_operator_cannot_create_an_account_for_anything_but_one_plain_address(runner):
    result = runner.invoke(args=["users", "create", "(c)op@example.com"])
    assert result.exit_code == 1 and "Enter one plain email address" in result.output


# Found by the second attack run: notices, and a turn taken by a request that mails nobody.


def change_password(web, current: str, new: str):
    web.get("/account")
    return web.post("/account", {"current": current, "password": new, "confirm": new})


def test_an_unverified_account_cannot_mail_its_address_by_changing_its_password(app):
    # Someone signs up with an address they do not own, signs in and changes the password over and over.
    web = factories.WebClient(app.test_client())
    web.register("victim@example.org", "first password 0")
    web.login("victim@example.org", "first password 0")
    for turn in range(20):
        assert change_password(web, f"first password {turn}", f"first password {turn + 1}").status_code == 302
    assert [m.kind for m in mails(app, "victim@example.org")] == ["verify"]


def test_a_verified_account_is_told_of_a_password_change_once_in_the_interval(app, web):
    web.signup("owner@example.com")
    passwords = ["correct horse battery"] + [f"another password {n}" for n in range(5)]
    for current, new in itertools.pairwise(passwords):
        assert change_password(web, current, new).status_code == 302
    assert len(mails(app, "owner@example.com", "password_changed")) == 1


def test_an_email_change_tells_the_old_address_only_if_it_was_proven(app):
    web = factories.WebClient(app.test_client())
    web.register("unproven@example.org", "first password 0")
    web.login("unproven@example.org", "first password 0")
    web.get("/account")
    web.post("/account/email", {"email": "mine@example.org", "current": "first password 0"})
    link = mail_link(app, "mine@example.org", "email_change")
    web.get(link)
    web.post(link, {})
    assert user(app, "mine@example.org") is not None
    assert mails(app, "unproven@example.org", "email_changed") == []


def test_a_reset_asked_for_an_address_with_no_account_does_not_use_up_the_owners_reset(app, web):
    web.signup("rb@example.com")
    web.logout()
    for email in ("RB+nothing@example.com", "rb@example.com"):
        visitor = factories.WebClient(app.test_client())
        visitor.get("/forgot")
        visitor.post("/forgot", {"email": email})
    assert len(mails(app, "rb@example.com", "reset")) == 1


def test_addresses_that_start_with_a_plus_are_each_their_own_mailbox():
    assert accounts.canonical_mailbox("+me@gmail.com") != accounts.canonical_mailbox("+you@gmail.com")
    assert accounts.canonical_mailbox("+me+tag@example.com") == "+me@example.com"


@pytest.mark.production_password_hash
def test_passwords_are_stored_as_scrypt_at_the_production_cost(app, web):
    web.register("hashed@example.com", "correct horse battery")
    stored = user(app, "hashed@example.com").password_hash
    assert stored.startswith("scrypt:32768:8:1$") and "correct horse battery" not in stored
    assert accounts.PASSWORD_HASH == "scrypt:32768:8:1"
    with app.app_context():
        assert accounts.check_password(accounts.find_by_email("hashed@example.com"), "correct horse battery")


def test_the_suite_hashes_at_a_lower_cost_and_a_stored_hash_still_names_its_own(app, web):
    web.register("cheap@example.com", "correct horse battery")
    assert user(app, "cheap@example.com").password_hash.startswith("scrypt:1024:8:1$")
