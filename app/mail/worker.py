"""When mail is sent: the sender's rounds, outside any request.

The sender (`Postman`: a thread in each gateway process, or `flask mail send`) never runs
inside a request, so a mail server that is slow or down delays mail and nothing else. It
claims each due mail before sending it, so several senders never send one mail at once; a
sender that dies mid-send lets its claim lapse and the mail goes out later (at least once,
never lost). A server that cannot be reached, or answers 4xx, is tried again with a doubling
wait (30 s, at most an hour); a 5xx refusal is kept as `failed`, with the answer, for the
operator. Each mail's failures are its own: a recipient the server refuses never holds back
the mails behind it (`deliver_due`).

With no MAIL_URL a mail is not sent. In development (DEV_OUTBOX) it is written to the log
and the development outbox page shows it, so every flow works on a fresh machine;
otherwise it is kept as failed and only its recipient and subject are logged, as a
warning: a body can hold a reset link, a secret that never goes to a log.
"""

import logging
import smtplib
from collections import Counter
from datetime import timedelta
from typing import Protocol

from sqlalchemy import or_, select, update

from app.extensions import db
from app.mail.smtp import ABOUT_THIS_MAIL, Smtp, Unsendable, message, refused_for_good
from app.models import MailState, OutboxMail, utcnow
from app.rounds import Rounds

log = logging.getLogger(__name__)


class MailSettings(Protocol):
    """What the sender reads of the app's settings (app/config.py's Settings has them all)."""

    mail_url: str | None
    mail_from: str
    mail_timeout: float
    mail_poll_seconds: float
    dev_outbox: bool


# How long a sender may hold a mail it took before another sender may take it.
CLAIM = timedelta(minutes=2)
FIRST_RETRY_SECONDS = 30
LAST_RETRY_SECONDS = 3600


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
    if refused_for_good(error):
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


def deliver_due(settings: MailSettings, limit: int = 100) -> Counter:
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
    sender = _Sender(settings, outcome)
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

    def __init__(self, settings: MailSettings, outcome: Counter):
        self.settings = settings
        self.server = Smtp.from_url(settings.mail_url) if settings.mail_url else None
        self.outcome = outcome
        self.connection = None

    def deliver(self, mail: OutboxMail) -> bool:
        """Send one claimed mail and record what came of it; False when the server is out of reach."""
        if self.server is None:
            _without_a_server(mail, self.settings.dev_outbox, self.outcome)
            return True
        try:
            email = message(mail, self.settings.mail_from)
        except Unsendable as error:
            _not_sent(mail, error, self.outcome)
            return True
        try:
            self.connection = self.connection or self.server.connect(self.settings.mail_timeout)
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


class Postman(Rounds):
    """One sender thread per process (app/rounds.py).

    It wakes when this process commits a mail, and every MAIL_POLL_SECONDS for mail
    other processes queued and for retries.
    """

    name = "mail-sender"

    def __init__(self, app, settings: MailSettings):
        super().__init__(app, settings.mail_poll_seconds)
        self.settings = settings

    def work(self) -> None:
        deliver_due(self.settings)
