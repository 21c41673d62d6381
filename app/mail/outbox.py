"""What is sent: mail written to the outbox in the transaction of the change that causes it.

`send()` adds a row to the caller's transaction, so a rollback takes the mail with it and a
commit wakes this process's sender (app/mail/worker.py). `first_in` gives a mailbox one mail of
a kind per interval, decided by one statement, so concurrent requests cannot both send.
"""

from dataclasses import dataclass
from datetime import timedelta

from flask import current_app, has_app_context, render_template
from flask_sqlalchemy.session import Session
from sqlalchemy import event

from app.extensions import db, insert
from app.models import MailStamp, OutboxMail, User, utcnow


@dataclass(frozen=True)
class Composed:
    """A mail written from its template, not yet queued to anyone."""

    kind: str
    subject: str
    body: str


def compose(kind: str, **context) -> Composed:
    """Render `templates/mail/<kind>.txt`: its first paragraph is its `Subject:` line, the rest the body.

    Text given to a template goes in as one line (a team's name, say): a line break could move
    words from the subject into the body, or end a header early, which no mail server takes.
    """
    one_line = {name: " ".join(value.split()) if isinstance(value, str) else value for name, value in context.items()}
    text = render_template(f"mail/{kind}.txt", **one_line)
    head, _, body = text.strip().partition("\n\n")
    subject = " ".join(head.removeprefix("Subject:").split())
    return Composed(kind, subject[:200], body.strip() + "\n")


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
