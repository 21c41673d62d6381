"""Outgoing email, in three parts: what is sent (`outbox`), how (`smtp`), when (`worker`).

Code that causes mail calls `notify`, `send`, or `compose` then `queue`, inside its own
transaction; the worker delivers after commit. See each module's docstring.
"""

from app.mail.outbox import Composed, compose, first_in, notify, queue, send
from app.mail.smtp import Smtp, Unsendable, envelope_address, message
from app.mail.worker import Postman, deliver_due, retry_delay

__all__ = [
    "Composed",
    "Postman",
    "Smtp",
    "Unsendable",
    "compose",
    "deliver_due",
    "envelope_address",
    "first_in",
    "message",
    "notify",
    "queue",
    "retry_delay",
    "send",
]
