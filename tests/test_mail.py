"""The outbox: mail written with the change that causes it, sent after commit to a real SMTP server.

The server is aiosmtpd on loopback; what it receives is what a mailbox would.
"""

import contextlib
import email
import logging
import re
import socket
import threading
from datetime import timedelta

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from sqlalchemy import update

from app import config, create_app, mail
from app.config import SettingError
from app.extensions import db
from app.models import MailState, OutboxMail, User, utcnow
from tests import factories
from tests.conftest import app_config
from tests.servers import free_port, wait_for
from tests.stripe_helpers import checkout_session, event
from tests.stripe_helpers import deliver as deliver_event


class Inbox:
    """An aiosmtpd handler that keeps what it receives (and each message's envelope recipients), or
    refuses recipients with `refuse` ("550 …", "451 …"), or some of them with `refuse_to` {address: answer}."""

    def __init__(self, refuse: str | None = None, refuse_to: dict | None = None):
        self.messages: list[email.message.Message] = []
        self.envelopes: list[list[str]] = []
        self.refuse = refuse
        self.refuse_to = refuse_to or {}

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse or address in self.refuse_to:
            return self.refuse or self.refuse_to[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content))
        self.envelopes.append(list(envelope.rcpt_tos))
        return "250 Message accepted"


@contextlib.contextmanager
def smtp_server(port: int, inbox: Inbox, **options):
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()


@pytest.fixture
def port():
    return free_port()


@pytest.fixture
def mail_app(make_app, port):
    return make_app(MAIL_URL=f"smtp://127.0.0.1:{port}", PUBLIC_BASE_URL="https://pay.example.test")


def queue(app, count=1, kind="password_changed"):
    """`count` mails to one customer, committed."""
    customer = factories.customer(app)
    with app.app_context():
        user = db.session.get(User, customer.user_id)
        for _ in range(count):
            mail.notify(user, kind, forgot_url="https://pay.example.test/forgot")
        db.session.commit()
    return customer


def deliver(app):
    with app.app_context():
        return mail.deliver_due(config.current())


def outbox(app):
    return factories.mails(app)


def test_a_committed_mail_reaches_the_mail_server_and_a_rolled_back_one_does_not(mail_app, port):
    customer = factories.customer(mail_app)
    with mail_app.app_context():
        user = db.session.get(User, customer.user_id)
        mail.notify(user, "password_changed", forgot_url="https://pay.example.test/forgot")
        db.session.rollback()
    assert outbox(mail_app) == []

    customer = queue(mail_app)
    with smtp_server(port, Inbox()) as inbox:
        assert deliver(mail_app) == {"sent": 1}
    [received] = inbox.messages
    assert received["To"] == customer.email and received["From"] == "kokoro-pay <noreply@localhost>"
    assert received["Subject"] == "Your kokoro-pay password was changed"
    assert received["Auto-Submitted"] == "auto-generated" and received["Message-ID"]
    assert "https://pay.example.test/forgot" in received.get_payload()
    [row] = outbox(mail_app)
    assert row.state == MailState.SENT and row.sent_at is not None and row.attempts == 1
    # Sent once: the next round has nothing to do.
    assert deliver(mail_app) == {}


def test_mail_waits_while_the_server_is_down_and_goes_out_when_it_is_back(mail_app, port):
    queue(mail_app, count=3)
    # Nothing listens on the port: the first mail is tried, the others wait for the next round.
    assert deliver(mail_app) == {"retry": 1}
    first, *rest = outbox(mail_app)
    assert first.state == MailState.QUEUED and first.attempts == 1 and "ConnectionRefusedError" in first.last_error
    wait = first.next_attempt_at - utcnow()
    assert timedelta(seconds=25) < wait <= timedelta(seconds=30)
    assert [row.attempts for row in rest] == [0, 0]

    # Down again on the next round: the first mail is not due yet, the second is tried.
    assert deliver(mail_app) == {"retry": 1}
    # Its third failure waits twice as long as the second, which waited twice the first.
    assert [mail.retry_delay(n).total_seconds() for n in (1, 2, 3, 8, 20)] == [30, 60, 120, 3600, 3600]

    with smtp_server(port, Inbox()) as inbox:
        assert deliver(mail_app) == {"sent": 1}  # the third, never tried; the other two wait their turn
        with mail_app.app_context():
            db.session.execute(update(OutboxMail).values(next_attempt_at=utcnow()))
            db.session.commit()
        assert deliver(mail_app) == {"sent": 2}
    assert len(inbox.messages) == 3
    assert {row.state for row in outbox(mail_app)} == {MailState.SENT}


def test_a_refusal_for_good_is_kept_as_failed_and_a_temporary_one_is_tried_again(mail_app, port):
    queue(mail_app)
    with smtp_server(port, Inbox(refuse="550 5.1.1 No such mailbox")):
        assert deliver(mail_app) == {"failed": 1}
    [row] = outbox(mail_app)
    assert row.state == MailState.FAILED and "No such mailbox" in row.last_error
    with smtp_server(port, Inbox()) as inbox:
        assert deliver(mail_app) == {}
    assert inbox.messages == []

    queue(mail_app)
    with smtp_server(port, Inbox(refuse="451 4.3.0 Try again later")):
        assert deliver(mail_app) == {"retry": 1}
    assert outbox(mail_app)[-1].state == MailState.QUEUED


def test_a_mail_whose_headers_cannot_be_written_fails_alone_and_the_round_goes_on(mail_app, port):
    # Stored before anything made subjects one line: a line break no mail header may carry.
    with mail_app.app_context():
        row = mail.send("email_changed", "someone@example.com", new_email="elsewhere@example.com")
        row.subject = "Team Acme\r\nBcc: victim@example.com"
        db.session.commit()
    web = factories.WebClient(mail_app.test_client())
    web.register("good@example.com")
    with smtp_server(port, Inbox()) as inbox:
        assert deliver(mail_app) == {"failed": 1, "sent": 1}
    [received] = inbox.messages
    assert received["To"] == "good@example.com"
    bad = factories.mails(mail_app, "someone@example.com")[0]
    assert bad.state == MailState.FAILED and "cannot be written" in bad.last_error
    with smtp_server(port, Inbox()) as inbox:
        assert deliver(mail_app) == {}


def test_a_subject_is_one_line_whatever_its_template_was_given(mail_app):
    with mail_app.app_context():
        row = mail.send(
            "invitation",
            "dev@example.com",
            team="Acme\r\n\r\nBcc: x",
            inviter="a@example.com",
            role="developer",
            link="https://pay.example.test/i",
            days=7,
        )
        assert "\n" not in row.subject and "\r" not in row.subject
        assert row.subject == "a@example.com invited you to the team Acme Bcc: x on kokoro-pay"


def queue_to(app, *recipients):
    """A mail to each of `recipients`, as stored (whatever they are), committed."""
    with app.app_context():
        for recipient in recipients:
            mail.send("email_changed", recipient, new_email="elsewhere@example.com")
        db.session.commit()


def test_two_hundred_mails_the_server_cannot_take_do_not_hold_back_a_good_one(mail_app, port):
    # The attack: sign-ups with Unicode addresses, to a relay that does not offer SMTPUTF8.
    queue_to(mail_app, *(f"jörg{number}@example.com" for number in range(200)))
    web = factories.WebClient(mail_app.test_client())
    web.register("good@example.com")
    with smtp_server(port, Inbox(), enable_SMTPUTF8=False) as inbox:
        assert deliver(mail_app) == {"failed": 200, "sent": 1}
    [received] = inbox.messages
    assert received["To"] == "good@example.com" and "Confirm your email" in received["Subject"]
    bad = factories.mails(mail_app, "jörg7@example.com")[0]
    assert bad.state == MailState.FAILED and "SMTPUTF8" in bad.last_error


def test_a_good_mail_goes_out_within_seconds_of_two_hundred_bad_ones(make_app, port):
    # The sender polls once a minute here: the good mail cannot wait for a later round.
    app = make_app(
        MAIL_URL=f"smtp://127.0.0.1:{port}",
        PUBLIC_BASE_URL="https://pay.example.test",
        MAIL_WORKER=True,
        MAIL_POLL_SECONDS=60,
    )
    web = factories.WebClient(app.test_client())
    with smtp_server(port, Inbox(), enable_SMTPUTF8=False) as inbox:
        web.get("/signup")  # starts the sender; its first round finds nothing
        queue_to(app, *(f"jörg{number}@example.com" for number in range(200)))
        web.register("good@example.com")
        wait_for(lambda: inbox.messages, timeout=10, what="the verification mail")
    assert [message["To"] for message in inbox.messages] == ["good@example.com"]


def test_each_refused_recipient_fails_or_waits_alone_and_the_round_goes_on(mail_app, port):
    queue_to(mail_app, "later@example.com", "never@example.com", "fine@example.com")
    refusals = {"later@example.com": "451 4.7.1 Greylisted", "never@example.com": "550 5.1.1 No such user"}
    with smtp_server(port, Inbox(refuse_to=refusals)) as inbox:
        assert deliver(mail_app) == {"retry": 1, "failed": 1, "sent": 1}
        # The greylisted mail waits its own 30 s; nothing else is due, nothing is tried again.
        assert deliver(mail_app) == {}
    assert inbox.envelopes == [["fine@example.com"]]
    later, never, fine = outbox(mail_app)
    assert later.state == MailState.QUEUED and later.attempts == 1
    assert timedelta(seconds=25) < later.next_attempt_at - utcnow() <= timedelta(seconds=30)
    assert never.state == MailState.FAILED and fine.state == MailState.SENT


def test_a_server_that_hangs_up_over_one_recipient_costs_the_next_mail_nothing(mail_app, port):
    queue_to(mail_app, "closing@example.com", "next@example.com")
    with smtp_server(port, Inbox(refuse_to={"closing@example.com": "421 4.3.2 Closing"})) as inbox:
        assert deliver(mail_app) == {"retry": 1, "sent": 1}
    assert inbox.envelopes == [["next@example.com"]]
    assert [row.attempts for row in outbox(mail_app)] == [1, 1]


def test_mail_never_tried_goes_before_mail_due_again(mail_app, port):
    queue_to(mail_app, "again1@example.com", "again2@example.com")
    with smtp_server(port, Inbox(refuse="451 4.7.1 Greylisted")):
        assert deliver(mail_app) == {"retry": 2}
    with mail_app.app_context():
        db.session.execute(update(OutboxMail).values(next_attempt_at=utcnow()))
        db.session.commit()
    queue_to(mail_app, "fresh@example.com")
    with smtp_server(port, Inbox()) as inbox:
        assert deliver(mail_app) == {"sent": 3}
    assert inbox.envelopes == [["fresh@example.com"], ["again1@example.com"], ["again2@example.com"]]


@pytest.mark.parametrize(
    "stored",
    ['"x" <me@example.com>', "junk,me@example.com", "(c)me@example.com", "me@example.com, you@example.com"],
)
def test_mail_goes_only_to_the_one_stored_address_never_to_what_a_header_parses_to(mail_app, port, stored):
    # Rows from before addresses were checked: sent to nobody, kept as failed for the operator.
    queue_to(mail_app, stored, "plain@example.com")
    with smtp_server(port, Inbox()) as inbox:
        assert deliver(mail_app) == {"failed": 1, "sent": 1}
    assert inbox.envelopes == [["plain@example.com"]]
    assert "not one plain address" in outbox(mail_app)[0].last_error


def test_a_unicode_domain_goes_in_ascii_and_a_unicode_name_to_a_server_that_offers_smtputf8(mail_app, port):
    queue_to(mail_app, "me@bücher.de")
    with smtp_server(port, Inbox(), enable_SMTPUTF8=False) as inbox:
        assert deliver(mail_app) == {"sent": 1}
    assert inbox.envelopes == [["me@xn--bcher-kva.de"]]
    queue_to(mail_app, "jörg@bücher.de")
    with smtp_server(port, Inbox()) as inbox:  # aiosmtpd offers SMTPUTF8 by default
        assert deliver(mail_app) == {"sent": 1}
    assert inbox.envelopes == [["jörg@bücher.de"]]


def test_two_senders_at_once_send_each_mail_once(mail_app, port):
    queue(mail_app, count=30)
    barrier = threading.Barrier(2)
    outcomes = []

    def sender():
        with mail_app.app_context():
            barrier.wait(timeout=10)
            outcomes.append(mail.deliver_due(config.current()))
            db.session.remove()

    with smtp_server(port, Inbox()) as inbox:
        threads = [threading.Thread(target=sender) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sum(outcome["sent"] for outcome in outcomes) == 30
    assert len(inbox.messages) == 30
    assert len({message["Message-ID"] for message in inbox.messages}) == 30


def test_the_mail_server_login_is_used(make_app, port):
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret/pass")

    app = make_app(MAIL_URL=f"smtp://mailer:s3cret%2Fpass@127.0.0.1:{port}", PUBLIC_BASE_URL="https://pay.example.test")
    queue(app)
    options = {"authenticator": authenticator, "auth_require_tls": False}
    with smtp_server(port, Inbox(), **options) as inbox:
        assert deliver(app) == {"sent": 1}
    assert logins == [(b"mailer", b"s3cret/pass")] and len(inbox.messages) == 1


def test_the_sender_thread_sends_as_soon_as_the_sign_up_commits(make_app, port):
    # It polls once a minute here: only the wake-up on commit can deliver within the wait below.
    app = make_app(
        MAIL_URL=f"smtp://127.0.0.1:{port}",
        PUBLIC_BASE_URL="https://pay.example.test",
        MAIL_WORKER=True,
        MAIL_POLL_SECONDS=60,
    )
    web = factories.WebClient(app.test_client())
    with smtp_server(port, Inbox()) as inbox:
        web.get("/signup")  # the first request starts this process's sender; its first round finds nothing
        web.register("thread@example.com")
        wait_for(lambda: inbox.messages, timeout=10, what="the verification mail")
    assert inbox.messages[0]["To"] == "thread@example.com"
    assert "https://pay.example.test/verify/" in inbox.messages[0].get_payload()


@pytest.fixture
def stuck_sender(make_app):
    """An app whose mail sender has taken a customer's mail to a server that accepts connections and never
    says a word: (the app, the customer, the connections the server accepted, to close to hang up)."""
    listener = socket.create_server(("127.0.0.1", 0))
    app = make_app(
        MAIL_URL=f"smtp://127.0.0.1:{listener.getsockname()[1]}",
        PUBLIC_BASE_URL="https://pay.example.test",
        MAIL_WORKER=True,
        MAIL_TIMEOUT=60,
        MAIL_POLL_SECONDS=0.05,
    )
    accepted = []
    try:
        customer = queue(app)  # the sender takes this one and waits on the silent server
        app.test_client().get("/signup")  # the first request starts the sender
        wait_for(lambda: _accept(listener, accepted), timeout=10, what="the sender to connect")
        yield app, customer, accepted
    finally:
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_mail_server_that_hangs_delays_mail_and_nothing_else(stuck_sender):
    app, customer, _ = stuck_sender
    web = factories.WebClient(app.test_client())
    # The sender is stuck for a minute; sign-ups and the API carry on, and their mail is kept.
    for number in range(3):
        assert "Check your inbox" in web.register(f"hang{number}@example.com").get_data(as_text=True)
    assert app.test_client().get("/v1/balance", headers=customer.headers).status_code == 200
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_test_hang")
        db.session.commit()
    paid = event("checkout.session.completed", checkout_session(customer.team_id, session_id="cs_test_hang"))
    assert deliver_event(app.test_client(), paid).status_code == 200
    assert factories.balance(app, customer.team_id) == 10_000
    assert [row.state for row in factories.mails(app, kind="verify")] == [MailState.QUEUED] * 3
    assert [row.state for row in factories.mails(app, kind="receipt")] == [MailState.QUEUED]


def test_stopping_the_sender_waits_for_its_round_under_way_to_end(stuck_sender, caplog):
    # stop() returns only once the stuck round has ended, so nothing the round does (its query, its log
    # line) outlives the app that stopped it.
    app, _, accepted = stuck_sender
    stopping = threading.Thread(target=app.extensions["postman"].stop)
    stopping.start()
    stopping.join(0.5)
    assert stopping.is_alive()  # the round is still waiting on the server
    accepted[0].close()  # the server hangs up: the round ends
    stopping.join(10)
    assert not stopping.is_alive()
    assert "mail 1 not sent (attempt 1)" in caplog.text  # written before stop() returned


def _accept(listener, accepted: list) -> bool:
    listener.settimeout(0.05)
    try:
        connection, _ = listener.accept()
    except TimeoutError:
        return False
    accepted.append(connection)  # kept open: the sender waits on it
    return True


def test_without_a_mail_server_mail_goes_to_the_log_and_the_development_outbox(make_app, caplog):
    app = make_app(DEV_OUTBOX=True)  # no MAIL_URL
    web = factories.WebClient(app.test_client())
    web.register("dev@example.com")
    with caplog.at_level(logging.INFO, logger="app.mail"):
        assert deliver(app) == {"sent": 1}
    assert "mail to dev@example.com" in caplog.text and "/verify/" in caplog.text

    page = app.test_client().get("/dev/outbox", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and "Confirm your email for kokoro-pay" in text and "dev@example.com" in text
    assert '<a href="http://localhost/verify/' in text and page.headers["Cache-Control"] == "no-store"
    # The links in these mails sign people up: nobody else may read them.
    assert app.test_client().get("/dev/outbox", environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 404


def test_the_development_outbox_is_closed_once_a_mail_server_is_configured(make_app, port):
    app = make_app(DEV_OUTBOX=True, MAIL_URL=f"smtp://127.0.0.1:{port}", PUBLIC_BASE_URL="https://pay.example.test")
    assert app.test_client().get("/dev/outbox", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 404


def test_without_a_mail_server_or_the_development_outbox_no_link_reaches_the_log(make_app, caplog):
    app = make_app()
    web = factories.WebClient(app.test_client())
    web.signup("prod@example.com")
    web.get("/forgot")
    web.post("/forgot", {"email": "prod@example.com"})
    with caplog.at_level(logging.INFO, logger="app.mail"):
        assert deliver(app) == {"failed": 2}
    assert "not sent: no MAIL_URL is configured (Reset your kokoro-pay password)" in caplog.text
    assert {row.state for row in factories.mails(app)} == {MailState.FAILED}
    assert "/reset/" not in caplog.text and "/verify/" not in caplog.text


def test_the_development_outbox_is_closed_unless_the_development_setting_opens_it(make_app):
    # Behind a proxy on the same host every visitor comes from loopback: off is the default.
    app = make_app()
    assert app.test_client().get("/dev/outbox", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 404
    page = factories.WebClient(app.test_client()).register("someone@example.com").get_data(as_text=True)
    assert "Check your inbox" in page and "development outbox" not in page  # nor does the page point at it


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"MAIL_URL": "http://mail.example.test"}, "MAIL_URL: must read like smtp+starttls://"),
        ({"MAIL_URL": "smtp://mail.example.test:notaport", "PUBLIC_BASE_URL": "https://a.test"}, "MAIL_URL"),
        ({"MAIL_URL": "smtp://mail.example.test"}, "MAIL_URL needs PUBLIC_BASE_URL"),
    ],
)
def test_mail_settings_that_cannot_work_stop_the_start(settings, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        create_app(app_config("sqlite://", **settings))


@pytest.mark.parametrize(
    "url,expected",
    [
        ("smtp://127.0.0.1", mail.Smtp("127.0.0.1", 25, "plain")),
        (
            "smtp+starttls://u%40x:p%3Aw@mail.example.test",
            mail.Smtp("mail.example.test", 587, "starttls", "u@x", "p:w"),
        ),
        ("smtps://mail.example.test:2465", mail.Smtp("mail.example.test", 2465, "tls")),
    ],
)
def test_mail_urls(url, expected):
    assert mail.Smtp.from_url(url) == expected
