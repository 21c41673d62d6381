"""How mail is sent: the mail server (MAIL_URL), the message, and which answers are about one mail.

A mail goes to its stored address alone, named in the SMTP envelope; no header is read to
find recipients.
"""

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import unquote, urlsplit

from email_validator import EmailNotValidError, validate_email

from app.models import OutboxMail


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
    """A queued mail no server could send as it stands (its recipient is not one plain address, a header
    holds a line break)."""


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
    """The mail as it is sent; Unsendable when it cannot be written (a header no mail may carry)."""
    try:
        return _written(mail, sender)
    except Unsendable:
        raise
    except ValueError as error:
        raise Unsendable(f"the mail cannot be written: {error}") from None


def _written(mail: OutboxMail, sender: str) -> EmailMessage:
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


def refused_for_good(error: Exception) -> bool:
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
