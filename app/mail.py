"""Outgoing email: written to the outbox with the change that causes it, sent after commit.

`send()` adds a row to the caller's transaction, so a rollback takes the mail with it
and a commit wakes this process's sender. The sender (`Postman`: a thread in each
gateway process, or `flask mail send`) never runs inside a request, so a mail server
that is slow or down delays mail and nothing else. It claims each due mail before
sending it, so several senders never send one mail at once; a sender that dies mid-send
lets its claim lapse and the mail goes out later (at least once, never lost). A server
that cannot be reached, or answers 4xx, is tried again with a doubling wait (30 s, at
most an hour); a 5xx refusal is kept as `failed`, with the answer, for the operator.
Each mail's failures are its own: a recipient the server refuses never holds back the
mails behind it (`deliver_due`). A mail goes to its stored address alone, named in the
SMTP envelope; no header is read to find recipients.

With no MAIL_URL a mail is not sent. In development (DEV_OUTBOX) it is written to the log
and the development outbox page shows it, so every flow works on a fresh machine;
otherwise it is kept as failed and only its recipient and subject are logged, as a
warning: a body can hold a reset link, a secret that never goes to a log.
"""

import logging
import os
import smtplib
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import unquote, urlsplit

from email_validator import EmailNotValidError, validate_email
from flask import current_app, has_app_context, render_template
from flask_sqlalchemy.session import Session
from sqlalchemy import event, or_, select, update

from app.extensions import db, insert
from app.models import MailStamp, MailState, OutboxMail, User, utcnow

log = logging.getLogger(__name__)

# How long a sender may hold a mail it took before another sender may take it.
CLAIM = timedelta(minutes=2)
FIRST_RETRY_SECONDS = 30
LAST_RETRY_SECONDS = 3600


@dataclass(frozen=True)
class Composed:
    """A mail written from its template, not yet queued to anyone."""

    kind: str
    subject: str
    body: str


def compose(kind: str, **context) -> Composed:
    """Render `templates/mail/<kind>.txt`: its first paragraph is its `Subject:` line, the rest the body."""
    text = render_template(f"mail/{kind}.txt", **context)
    head, _, body = text.strip().partition("\n\n")
    return Composed(kind, head.removeprefix("Subject:").strip()[:200], body.strip() + "\n")


def queue(composed: Composed, recipient: str, *, user_id: int | None = None) -> OutboxMail:
    """Add a composed mail to the caller's transaction; a rollback takes it along, a commit wakes the sender."""
    mail = OutboxMail(
        user_id=user_id, recipient=recipient, kind=composed.kind, subject=composed.subject, body=composed.body
    )
    db.session.add(mail)
    db.session.info["mail_queued"] = True
    return mail


def send(kind: str, recipient: str, *, user_id: int | None = None, **context) -> OutboxMail:
    """Queue the mail `templates/mail/<kind>.txt` in the caller's transaction."""
    return queue(compose(kind, **context), recipient, user_id=user_id)


def notify(user: User, kind: str, **context) -> OutboxMail | None:
    """Queue a mail to an account's owner; nothing for a deleted account."""
    if user.deleted_at is not None:
        return None
    return send(kind, user.email, user_id=user.id, user=user, **context)


def first_in(mailbox: str, kind: str, interval: timedelta) -> bool:
    """Take the one turn per `interval` to mail `kind` to `mailbox` (a hash): True for the caller that got it.

    One statement decides, so that of many requests at once only one is told yes: it inserts the
    mailbox's stamp, or moves a stamp older than `interval` to now, and a row comes back; a stamp
    newer than that (or one another transaction is writing, which it waits for) returns none. The stamp is part of
    the caller's transaction: a rollback gives the turn back.
    """
    now = utcnow()
    stamp = insert(MailStamp).values(mailbox=mailbox, kind=kind, sent_at=now)
    taken = stamp.on_conflict_do_update(
        index_elements=[MailStamp.mailbox, MailStamp.kind],
        set_={"sent_at": now},
        where=MailStamp.sent_at <= now - interval,
    )
    return db.session.execute(taken.returning(MailStamp.kind)).first() is not None


@event.listens_for(Session, "after_commit")
def _wake_the_sender(session):
    if session.info.pop("mail_queued", False) and has_app_context():
        postman = current_app.extensions.get("postman")
        if postman is not None:
            postman.wake.set()


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back_mail(session, _previous_transaction):
    session.info.pop("mail_queued", None)


@dataclass(frozen=True)
class Smtp:
    """A mail server, from MAIL_URL: smtp://host:25, smtp+starttls://user:password@host:587, smtps://…:465."""

    host: str
    port: int
    security: str
    username: str | None = None
    password: str | None = None

    SCHEMES = {"smtp": ("plain", 25), "smtp+starttls": ("starttls", 587), "smtps": ("tls", 465)}

    @classmethod
    def from_url(cls, url: str) -> "Smtp":
        parts = urlsplit(url)
        if parts.scheme not in cls.SCHEMES or not parts.hostname:
            raise ValueError(
                f"must read like smtp+starttls://user:password@host:587 (smtp, smtp+starttls or smtps), not {url!r}"
            )
        security, port = cls.SCHEMES[parts.scheme]
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, parts.port or port, security, username, password)

    def connect(self, timeout: float) -> smtplib.SMTP:
        if self.security == "tls":
            connection = smtplib.SMTP_SSL(self.host, self.port, timeout=timeout, context=ssl.create_default_context())
        else:
            connection = smtplib.SMTP(self.host, self.port, timeout=timeout)
            if self.security == "starttls":
                connection.starttls(context=ssl.create_default_context())
        # The server's extensions known before the first mail: smtplib asks whether it offers SMTPUTF8
        # before it would greet the server itself, and would refuse a Unicode address unasked.
        connection.ehlo_or_helo_if_needed()
        if self.username:
            connection.login(self.username, self.password or "")
        return connection


class Unsendable(ValueError):
    """A queued mail no server could send as it stands (its recipient is not one plain address)."""


def envelope_address(recipient: str) -> str:
    """The one address a mail to `recipient` is delivered to: the SMTP envelope names it, and nothing else.

    Only one plain address passes (the validator's), so no stored string can read as a list of
    recipients. A Unicode domain goes in its ASCII (IDNA) form, which every server takes; a Unicode
    name before the @ stays as it is and needs a server that offers SMTPUTF8.
    """
    try:
        found = validate_email(recipient, check_deliverability=False)
    except EmailNotValidError as error:
        raise Unsendable(f"the recipient {recipient!r} is not one plain address: {error}") from None
    return found.ascii_email or found.normalized


def message(mail: OutboxMail, sender: str) -> EmailMessage:
    email = EmailMessage()
    email["From"] = sender
    email["To"] = envelope_address(mail.recipient)
    email["Subject"] = mail.subject
    email["Date"] = formatdate(mail.created_at.timestamp())
    domain = parseaddr(sender)[1].rpartition("@")[2] or None
    email["Message-ID"] = make_msgid(f"outbox{mail.id}", domain=domain)
    # Vacation responders and the like do not answer this.
    email["Auto-Submitted"] = "auto-generated"
    email.set_content(mail.body)
    return email


def _refused_for_good(error: Exception) -> bool:
    """A 5xx answer about this mail, or an address this server cannot take: sending it again would fail again."""
    if isinstance(error, (Unsendable, smtplib.SMTPNotSupportedError)):
        return True
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return all(code >= 500 for code, _ in error.recipients.values())
    if isinstance(error, (smtplib.SMTPSenderRefused, smtplib.SMTPDataError)):
        return error.smtp_code >= 500
    return False


# Answers about one mail: the connection is still good for the next.
ABOUT_THIS_MAIL = (
    smtplib.SMTPNotSupportedError,
    smtplib.SMTPRecipientsRefused,
    smtplib.SMTPSenderRefused,
    smtplib.SMTPDataError,
)


def retry_delay(attempts: int) -> timedelta:
    return timedelta(seconds=min(FIRST_RETRY_SECONDS * 2 ** (attempts - 1), LAST_RETRY_SECONDS))


def _claim(mail_id: int, now) -> OutboxMail | None:
    claimed = db.session.execute(
        update(OutboxMail)
        .where(
            OutboxMail.id == mail_id,
            OutboxMail.state == MailState.QUEUED,
            or_(OutboxMail.claimed_until.is_(None), OutboxMail.claimed_until < now),
        )
        .values(claimed_until=now + CLAIM),
        execution_options={"synchronize_session": False},
    ).rowcount
    db.session.commit()
    return db.session.get(OutboxMail, mail_id) if claimed else None


def _not_sent(mail: OutboxMail, error: Exception, outcome: Counter) -> None:
    """Record a failed try of this mail alone: kept as failed when it cannot ever go, else tried again later."""
    mail.attempts += 1
    mail.claimed_until = None
    mail.last_error = f"{type(error).__name__}: {error}"[:500]
    if _refused_for_good(error):
        mail.state = MailState.FAILED
        outcome["failed"] += 1
        log.error("mail %s to %s refused for good: %s", mail.id, mail.recipient, mail.last_error)
    else:
        # Its own wait, doubling with its own attempts: another mail's failures never add to it.
        mail.next_attempt_at = utcnow() + retry_delay(mail.attempts)
        outcome["retry"] += 1
        log.warning("mail %s not sent (attempt %s): %s", mail.id, mail.attempts, mail.last_error)
    db.session.commit()


def _due(after_id: int, limit: int, tried: bool) -> list[int]:
    now = utcnow()
    due = db.session.scalars(
        select(OutboxMail.id)
        .where(
            OutboxMail.id > after_id,
            OutboxMail.attempts > 0 if tried else OutboxMail.attempts == 0,
            OutboxMail.state == MailState.QUEUED,
            OutboxMail.next_attempt_at <= now,
            or_(OutboxMail.claimed_until.is_(None), OutboxMail.claimed_until < now),
        )
        .order_by(OutboxMail.id)
        .limit(limit)
    ).all()
    db.session.commit()
    return due


def deliver_due(limit: int = 100) -> Counter:
    """Send the mails that are due; returns how many were sent, retried later and failed.

    Runs in an app context, outside any request. Each mail's outcome is committed on its own, and
    is that mail's alone: a recipient the server refuses (for good, for now, or because it takes no
    Unicode address) fails or waits by itself and the round goes on, `limit` mails at a time, until
    every due mail was looked at; so however many bad mails are queued, a good one goes out in the
    same round. Mails never tried go first (oldest first), then those due again. A connection that
    breaks is opened again for the next mail; only a server that cannot be reached at all ends the
    round (the rest wait for the next one).
    """
    outcome = Counter()
    sender = _Sender(current_app.config, outcome)
    try:
        for tried in (False, True):
            last_id = 0
            while due := _due(last_id, limit, tried):
                last_id = due[-1]
                for mail_id in due:
                    mail = _claim(mail_id, utcnow())
                    # None: another sender took it.
                    if mail is not None and not sender.deliver(mail):
                        return outcome
    finally:
        sender.close()
    return outcome


class _Sender:
    """One round's connection to the mail server, opened for the first mail that needs it."""

    def __init__(self, config, outcome: Counter):
        self.config = config
        self.server = Smtp.from_url(config["MAIL_URL"]) if config["MAIL_URL"] else None
        self.outcome = outcome
        self.connection = None

    def deliver(self, mail: OutboxMail) -> bool:
        """Send one claimed mail and record what came of it; False when the server is out of reach."""
        if self.server is None:
            _without_a_server(mail, self.config["DEV_OUTBOX"], self.outcome)
            return True
        try:
            email = message(mail, self.config["MAIL_FROM"])
        except Unsendable as error:
            _not_sent(mail, error, self.outcome)
            return True
        try:
            self.connection = self.connection or self.server.connect(self.config["MAIL_TIMEOUT"])
        except (smtplib.SMTPException, OSError) as error:
            _not_sent(mail, error, self.outcome)
            return False
        try:
            self.connection.send_message(email, to_addrs=[email["To"]])
        except ABOUT_THIS_MAIL as error:
            _not_sent(mail, error, self.outcome)
            if self.connection.sock is None:
                # smtplib hung up after a 421 ("closing"): the next mail gets a connection of its own.
                self.connection = None
            return True
        except (smtplib.SMTPException, OSError) as error:
            # The connection broke (a drop, a timeout, a garbled answer): this mail waits its turn,
            # and the next is tried on a new connection.
            _not_sent(mail, error, self.outcome)
            self.close()
            return True
        mail.state = MailState.SENT
        mail.sent_at = utcnow()
        mail.claimed_until = None
        mail.attempts += 1
        db.session.commit()
        self.outcome["sent"] += 1
        return True

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.quit()
            except (smtplib.SMTPException, OSError):
                self.connection.close()
            self.connection = None


def _without_a_server(mail: OutboxMail, dev_outbox: bool, outcome: Counter) -> None:
    if dev_outbox:
        log.info("mail to %s (no MAIL_URL, not sent): %s\n%s", mail.recipient, mail.subject, mail.body)
        mail.state = MailState.SENT
        mail.sent_at = utcnow()
        mail.claimed_until = None
        mail.attempts += 1
        db.session.commit()
        outcome["sent"] += 1
        return
    # Outside development a body may hold a reset link: a secret, never logged. The mail is kept
    # as failed, for the operator to see; nothing could send it.
    log.warning("mail %s to %s not sent: no MAIL_URL is configured (%s)", mail.id, mail.recipient, mail.subject)
    mail.state = MailState.FAILED
    mail.last_error = "Not sent: no MAIL_URL is configured."
    mail.claimed_until = None
    db.session.commit()
    outcome["failed"] += 1


class Postman:
    """One sender thread per process, started with the first request it serves (a forked worker starts its own).

    It wakes when this process commits a mail, and every MAIL_POLL_SECONDS for mail
    other processes queued and for retries.
    """

    def __init__(self, app):
        self.app = app
        self.wake = threading.Event()
        self._pid = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self.run, name="mail-sender", daemon=True).start()

    def stop(self) -> None:
        """End the thread after its current round (tests; a process that ends takes it along)."""
        self._stopped = True
        self.wake.set()

    def run(self, rounds: int | None = None) -> None:
        """Deliver until the process ends (or for `rounds` rounds); an error in one round is logged, not fatal."""
        while not self._stopped and (rounds is None or rounds > 0):
            try:
                with self.app.app_context():
                    deliver_due()
            except Exception:
                log.exception("the mail sender's round failed; the next round tries again")
            if rounds is not None:
                rounds -= 1
                if not rounds:
                    return
            self.wake.wait(self.app.config["MAIL_POLL_SECONDS"])
            self.wake.clear()
