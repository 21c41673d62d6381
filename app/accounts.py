"""Customer accounts: creation with a normalised, unique email and a hashed password."""

import re

from sqlalchemy import select
from werkzeug.security import check_password_hash, generate_password_hash

from app.extensions import db
from app.models import User

EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


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
