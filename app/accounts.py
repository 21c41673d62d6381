"""Customer accounts: a normalised, unique email, a hashed password, and sign-ins kept on the server.

Each sign-in is a row (`LoginSession`) whose random token is what Flask-Login keeps in
the session and remember-me cookies; the database holds only the token's SHA-256.
Signing out deletes the row, so every cookie that carried it stops working at once.

The links mailed to verify an email, reset a password or change the email are signed
(itsdangerous, with SECRET_KEY and a salt per purpose), expire, and work once: each
names the state it changes (the email not yet verified, the password hash it replaces,
the email it replaces), so it stops working once that state has changed.
"""

import hashlib
import re
import secrets
from datetime import timedelta

from flask import current_app, session
from flask_login import login_user, logout_user
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import delete, func, select
from werkzeug.security import check_password_hash, generate_password_hash

from app import billing, mail
from app.extensions import db
from app.models import LedgerEntry, LedgerKind, LoginSession, OutboxMail, User, utcnow
from app.urls import external_url

EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Checked against when the email has no account (or no password), so that a sign-in costs the
# same whether or not the account exists: its timing says nothing about who has one.
_DUMMY_HASH = generate_password_hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    pass


def normalize_email(email: str) -> str:
    return email.strip().lower()


def find_by_email(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == normalize_email(email)))


def create_user(email: str, password: str | None = None) -> User:
    """Add a user to the session. Raises AccountError for a malformed or taken email.

    The unique constraint on the email still decides under a race; the caller
    treats an IntegrityError on commit as "taken".
    """
    email = normalize_email(email)
    if not EMAIL_PATTERN.match(email) or len(email) > 254:
        raise AccountError("That does not look like an email address.")
    if find_by_email(email) is not None:
        raise AccountError("An account with that email already exists.")
    user = User(email=email, balance=0)
    if password:
        set_password(user, password)
    db.session.add(user)
    return user


def set_password(user: User, password: str) -> None:
    user.password_hash = generate_password_hash(password)


# At most one mail of a kind to one address in this time: a form cannot be used to flood a mailbox.
MAIL_INTERVAL = timedelta(minutes=2)


def register(email: str, password: str) -> None:
    """Sign up: a new, unverified account and its verification mail, or, when the email is taken,
    a mail to its owner saying someone tried. The caller commits and answers the same either way.

    Raises AccountError for a malformed email.
    """
    existing = find_by_email(email)
    if existing is None:
        user = create_user(email, password)
        db.session.flush()
        send_verification(user)
        return
    generate_password_hash(password)  # the same work as a new account: the time taken says nothing
    if not mail.sent_recently(existing.email, "signup_taken", MAIL_INTERVAL):
        mail.notify(existing, "signup_taken", forgot_url=external_url("dashboard.forgot_password"))


def _tokens(purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key, salt=f"kokoro-pay {purpose}")


class TokenError(AccountError):
    """A mailed link that is malformed, expired or already used; the message says which, for people."""


def _read(purpose: str, token: str, max_age: timedelta) -> list:
    try:
        return _tokens(purpose).loads(token, max_age=max_age.total_seconds())
    except SignatureExpired:
        raise TokenError("This link has expired. Ask for a new one.") from None
    except BadSignature:
        raise TokenError("This link is not valid. Check that you copied all of it.") from None


def send_verification(user: User) -> bool:
    """Queue the verification mail (at most one per MAIL_INTERVAL); False when one was sent just now."""
    if user.verified or mail.sent_recently(user.email, "verify", MAIL_INTERVAL):
        return False
    token = _tokens("verify").dumps([user.id, user.email])
    mail.notify(
        user,
        "verify",
        link=external_url("dashboard.verify_email", token=token),
        hours=round(current_app.config["VERIFY_HOURS"]),
    )
    return True


def verify_email(token: str) -> User:
    """Mark the account of a verification link as verified and grant the free trial; the caller commits."""
    user_id, email = _read("verify", token, timedelta(hours=current_app.config["VERIFY_HOURS"]))
    user = db.session.get(User, user_id)
    if user is None or user.email != email or user.deleted_at is not None:
        raise TokenError("This link is not valid any more.")
    if user.verified:
        return user
    mark_verified(user)
    return user


def mark_verified(user: User) -> None:
    """The email is the owner's: keys and purchases open, and the free trial (SIGNUP_CREDITS) is granted once."""
    user.email_verified_at = utcnow()
    credits = current_app.config["SIGNUP_CREDITS"]
    if credits and not user.unlimited:
        # Its reference is unique per account: a second verification (a new email) grants nothing.
        reference = f"trial:{user.id}"
        if db.session.scalar(select(func.count()).where(LedgerEntry.reference == reference)) == 0:
            billing.apply(user.id, credits, kind=LedgerKind.TRIAL, reference=reference, note="free trial")


def request_password_reset(email: str) -> None:
    """Mail a reset link to the account with this email, if there is one; the caller says the same either way."""
    user = find_by_email(email)
    if user is None or user.deleted_at is not None or mail.sent_recently(user.email, "reset", MAIL_INTERVAL):
        return
    token = _tokens("reset").dumps([user.id, user.email, _password_stamp(user)])
    mail.notify(
        user,
        "reset",
        link=external_url("dashboard.reset_password", token=token),
        minutes=round(current_app.config["RESET_MINUTES"]),
    )


def _password_stamp(user: User) -> str:
    """Changes whenever the password does: a reset link names the password it replaces."""
    return hashlib.sha256((user.password_hash or "no password").encode()).hexdigest()[:16]


def user_for_reset(token: str) -> User:
    user_id, email, stamp = _read("reset", token, timedelta(minutes=current_app.config["RESET_MINUTES"]))
    user = db.session.get(User, user_id)
    # Sent to an address the account has since left: that mailbox may no longer be the owner's.
    if user is None or user.deleted_at is not None or user.email != email or _password_stamp(user) != stamp:
        raise TokenError("This link has been used already. Ask for a new one if you still need it.")
    return user


def reset_password(user: User, password: str) -> int:
    """Set a new password from a reset link: every sign-in ends; the mailbox is proven, so the email is
    verified too. Returns how many sign-ins ended; the caller commits."""
    set_password(user, password)
    if not user.verified:
        mark_verified(user)
    ended = db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id)).rowcount
    mail.notify(user, "password_changed", forgot_url=external_url("dashboard.forgot_password"))
    return ended


def request_email_change(user: User, new_email: str) -> None:
    """Mail a confirmation link to the new address; nothing changes until it is opened.

    When the address has an account already, its owner is told instead; the caller says the same either way.
    """
    new_email = normalize_email(new_email)
    if not EMAIL_PATTERN.match(new_email) or len(new_email) > 254:
        raise AccountError("That does not look like an email address.")
    if new_email == user.email:
        raise AccountError("That is your email already.")
    if mail.sent_recently(new_email, "email_change", MAIL_INTERVAL) or mail.sent_recently(
        new_email, "signup_taken", MAIL_INTERVAL
    ):
        return
    owner = find_by_email(new_email)
    if owner is not None:
        mail.notify(owner, "signup_taken", forgot_url=external_url("dashboard.forgot_password"))
        return
    token = _tokens("email").dumps([user.id, user.email, new_email])
    mail.send(
        "email_change",
        new_email,
        user_id=user.id,
        link=external_url("dashboard.change_email", token=token),
        hours=round(current_app.config["VERIFY_HOURS"]),
    )


def read_email_change(token: str) -> tuple[User, str]:
    """The account and new email of a confirmation link still good to use."""
    user_id, old_email, new_email = _read("email", token, timedelta(hours=current_app.config["VERIFY_HOURS"]))
    user = db.session.get(User, user_id)
    if user is None or user.email != old_email or user.deleted_at is not None:
        raise TokenError("This link has been used already, or the account's email changed since.")
    return user, new_email


def change_email(user: User, new_email: str) -> None:
    """Move the account to its confirmed new email and tell the old one; the caller commits.

    Raises AccountError when the new email got an account meanwhile.
    """
    if find_by_email(new_email) is not None:
        raise AccountError("That email has an account now; nothing changed.")
    old_email = user.email
    user.email = new_email
    user.email_verified_at = utcnow()
    mail.send("email_changed", old_email, user_id=user.id, new_email=new_email)


def delete_account(user: User) -> None:
    """Erase what identifies the owner and close the account; the caller commits.

    Keys are revoked (401 at once), sign-ins end, mail to the owner is erased. The balance,
    the ledger, speech requests and payments stay, under an anonymous account row, so the
    books still add up.
    """
    now = utcnow()
    for key in user.keys:
        key.revoked_at = key.revoked_at or now
        key.name = ""
    db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id))
    db.session.execute(delete(OutboxMail).where(OutboxMail.user_id == user.id))
    user.email = f"deleted-{user.id}@deleted.invalid"
    user.password_hash = None
    user.stripe_customer_id = None
    user.email_verified_at = None
    user.low_balance_credits = None
    user.deleted_at = now


def check_password(user: User, password: str) -> bool:
    return bool(user.password_hash) and check_password_hash(user.password_hash, password)


def authenticate(email: str, password: str) -> User | None:
    """The account with this email and password, else None; one password hash is checked either way."""
    user = find_by_email(email)
    hashed = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
    matches = check_password_hash(hashed, password)
    return user if matches and hashed is not _DUMMY_HASH else None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_in(user: User, remember: bool, lifetime: timedelta, remember_lifetime: timedelta) -> None:
    """Start a new sign-in for `user` and commit it; nothing of the session before it survives."""
    session.clear()
    # The account's expired sign-ins go as a new one starts.
    db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id, LoginSession.expires_at <= utcnow()))
    token = secrets.token_urlsafe(32)
    expires_at = utcnow() + (remember_lifetime if remember else lifetime)
    db.session.add(LoginSession(user_id=user.id, digest=_digest(token), remember=remember, expires_at=expires_at))
    db.session.commit()
    user.login_token = token
    login_user(user, remember=remember, duration=remember_lifetime)


def load_signed_in(token: str) -> User | None:
    """The user of a live sign-in, found by the token its cookies carry (Flask-Login's user loader)."""
    login = db.session.scalar(
        select(LoginSession).where(LoginSession.digest == _digest(token), LoginSession.expires_at > utcnow())
    )
    if login is None or login.user.disabled_at is not None:
        return None
    login.user.login_token = token
    return login.user


def sign_out(user: User) -> None:
    """End this browser's sign-in on the server, then forget it in the browser."""
    if user.login_token:
        db.session.execute(delete(LoginSession).where(LoginSession.digest == _digest(user.login_token)))
        db.session.commit()
    logout_user()


def end_other_sign_ins(user: User) -> int:
    """End every sign-in of `user` but this browser's; the caller commits. Returns how many ended."""
    keep = _digest(user.login_token) if user.login_token else ""
    ended = db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id, LoginSession.digest != keep))
    return ended.rowcount


def set_disabled(user: User, disabled: bool) -> None:
    """Disable (keys refused, every sign-in ended, no new ones) or enable an account; the caller commits."""
    user.disabled_at = utcnow() if disabled else None
    if disabled:
        db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id))


def sign_ins(user: User) -> int:
    """How many browsers are signed in to `user`'s account now."""
    return db.session.scalar(
        select(func.count(LoginSession.id)).where(LoginSession.user_id == user.id, LoginSession.expires_at > utcnow())
    )
