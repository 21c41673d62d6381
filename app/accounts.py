"""Customer accounts: a normalised, unique email, a hashed password, and sign-ins kept on the server.

Each sign-in is a row (`LoginSession`) whose random token is what Flask-Login keeps in
the session and remember-me cookies; the database holds only the token's SHA-256.
Signing out deletes the row, so every cookie that carried it stops working at once.
"""

import hashlib
import re
import secrets
from datetime import timedelta

from flask import session
from flask_login import login_user, logout_user
from sqlalchemy import delete, func, select
from werkzeug.security import check_password_hash, generate_password_hash

from app.extensions import db
from app.models import LoginSession, User, utcnow

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
    if login is None:
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


def sign_ins(user: User) -> int:
    """How many browsers are signed in to `user`'s account now."""
    return db.session.scalar(
        select(func.count(LoginSession.id)).where(LoginSession.user_id == user.id, LoginSession.expires_at > utcnow())
    )
