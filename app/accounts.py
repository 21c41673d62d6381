"""Customer accounts: one plain email, a hashed password, and sign-ins kept on the server.

Each sign-in is a row (`LoginSession`) whose random token is what Flask-Login keeps in
the session and remember-me cookies; the database holds only the token's SHA-256.
Signing out deletes the row, so every cookie that carried it stops working at once.

An email is one plain address, as the `email-validator` package reads it: no display name,
comment, list, quotes or invisible character. What it delivers to, its canonical mailbox
(`canonical_mailbox`: case, a +tag, Gmail's dots), is what the free trial and the mail
limits count: one trial per mailbox ever (`TrialClaim`, kept after the account is deleted)
and one mail of a kind per mailbox per MAIL_INTERVAL (`MailStamp`), each decided by one
unique row, whatever the concurrency. A client address triggers at most MAILS_PER_IP mails
and TRIALS_PER_IP_PER_DAY trials.

The links mailed to verify an email, reset a password or change the email are signed
(itsdangerous, with SECRET_KEY and a salt per purpose), expire, and work once: each
names the state it changes (the account's email and its version, which goes up at every
change of the email, and the password hash a reset replaces), so it stops working once
that state has changed, even if the email changes back. An invitation's link names the
invitation and its nonce, which a resend replaces (app/teams.py).
"""

import functools
import hashlib
import hmac
import ipaddress
import secrets
import time
import unicodedata
from dataclasses import dataclass
from datetime import timedelta

from email_validator import EmailNotValidError, validate_email
from flask import current_app, session
from flask_login import login_user, logout_user
from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import delete, func, select, update
from werkzeug.security import check_password_hash, generate_password_hash

from app import autotopup, billing, config, mail, services, teams
from app.extensions import db, insert, login_manager
from app.models import ApiKey, Invitation, LedgerEntry, LedgerKind, LoginSession, OutboxMail, TrialClaim, User, utcnow
from app.urls import external_url

# How passwords are hashed: werkzeug's scrypt at its default cost (N=2^15, r=8, p=1), stated here so
# that the choice is ours. tests/conftest.py lowers the cost for the suite's thousands of sign-ins
# (the hash is the same function; only N differs); test_accounts checks accounts are stored with this.
PASSWORD_HASH = "scrypt:32768:8:1"


def _hash(password: str) -> str:
    return generate_password_hash(password, method=PASSWORD_HASH)


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the email has no account (or no password), so that a sign-in costs the
    same whether or not the account exists: its timing says nothing about who has one. Made at the
    first sign-in, not at import, where its scrypt cost every `flask` command 0.2 s."""
    return _hash(secrets.token_urlsafe(16))


# Providers that deliver a.b@ and ab@ to one mailbox, and their other names.
DOTS_IGNORED = {"gmail.com"}
SAME_PROVIDER = {"googlemail.com": "gmail.com"}


class AccountError(ValueError):
    pass


def parse_email(raw: str) -> str:
    """The email to store for what someone typed: one plain address, lower-cased. AccountError otherwise."""
    try:
        found = validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError as error:
        raise AccountError(f"Enter one plain email address, like name@example.com. {error}") from None
    return f"{found.local_part.lower()}@{found.domain}"


def normalize_email(email: str) -> str:
    """The stored form of an email, for looking an account up: as `parse_email` stores it, when it is one."""
    try:
        return parse_email(email)
    except AccountError:
        return email.strip().lower()


def canonical_mailbox(email: str) -> str:
    """The mailbox an address delivers to, as far as can be told from the address: Unicode case
    folded (and compatibility forms joined), the domain in ASCII, no +tag, and no dots where the
    provider ignores them (Gmail, also as googlemail.com). What the trial and mail limits count."""
    try:
        found = validate_email(email.strip(), check_deliverability=False)
        local, domain = found.local_part, found.ascii_domain
    except EmailNotValidError:
        local, _, domain = email.strip().rpartition("@")
    local = unicodedata.normalize("NFKC", local).casefold()
    # A +tag comes after a name: leading +s are the name's own.
    name = local.lstrip("+")
    local = local[: len(local) - len(name)] + name.partition("+")[0]
    domain = SAME_PROVIDER.get(domain.lower(), domain.lower())
    if domain in DOTS_IGNORED:
        local = local.replace(".", "")
    return f"{local}@{domain}"


def _keyed(purpose: str, value: str) -> str:
    message = f"kokoro-pay {purpose}\0{value}".encode()
    return hmac.new(current_app.secret_key.encode(), message, hashlib.sha256).hexdigest()


def mailbox_digest(email: str) -> str:
    """What the database keeps of a mailbox once its account is deleted.

    An HMAC keyed with SECRET_KEY, not a bare SHA-256: addresses are easily guessed, so a bare
    hash in a copy of the database would name the mailboxes of deleted accounts to anyone who
    tries a list of them; keyed, it names nothing without the key. The price: a new SECRET_KEY
    forgets which mailboxes had their trial (each may have one more) and the mail stamps.
    """
    return _keyed("mailbox", canonical_mailbox(email))


def client_network(address: str | None) -> str:
    """The client a limit per address counts: an IPv4 address, or the /64 of an IPv6 one (one
    subscriber's usual share, which its owner can spread requests across)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_digest(address: str | None) -> str:
    """A client's network, as a verification link carries it: it says nothing of the address to its reader."""
    return _keyed("client", client_network(address))[:16]


def find_by_email(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == normalize_email(email)))


def create_user(email: str, password: str | None = None) -> User:
    """Add a user, and their personal team, to the session. Raises AccountError for an email that is not
    one plain address, or taken.

    The unique constraint on the email still decides under a race; the caller
    treats an IntegrityError on commit as "taken".
    """
    email = parse_email(email)
    if find_by_email(email) is not None:
        raise AccountError("An account with that email already exists.")
    user = User(email=email)
    if password:
        set_password(user, password)
    db.session.add(user)
    teams.create_personal(user)
    return user


def set_password(user: User, password: str) -> None:
    user.password_hash = _hash(password)


# At most one mail of a kind to one mailbox in this time: a form cannot be used to flood it.
MAIL_INTERVAL = timedelta(minutes=2)


def may_mail(email: str, kind: str, client: str | None, mailbox: str | None = None) -> bool:
    """Whether a request from `client` may queue a mail of `kind` to the mailbox of `email` now.

    The client's count (MAILS_PER_IP) goes up first, whatever the answer after it; then the
    mailbox's stamp is taken (`mail.first_in`), in the caller's transaction. `mailbox` names
    another stamp to take instead (a request that will mail nobody takes its own, see
    request_password_reset).
    """
    if not services.throttle().mail_allowed(client_network(client)):
        return False
    return mail.first_in(mailbox or mailbox_digest(email), kind, MAIL_INTERVAL)


def notify_of_change(user: User, kind: str, client: str | None, *, to: str | None = None, **context) -> None:
    """Tell the owner of a change to their account (a password, an email), at `to` or their address.

    Only an address the owner has proven (a verified email) is told: an unverified one may be
    anybody's, and the account's holder could otherwise mail it at will. And at most one notice
    of a kind per mailbox per MAIL_INTERVAL, counted against `client` like every mail a request
    asks for: changing a password twenty times sends one notice, not twenty.
    """
    recipient = to or user.email
    if user.verified and user.deleted_at is None and may_mail(recipient, kind, client):
        mail.send(kind, recipient, user_id=user.id, user=user, **context)


def register(email: str, password: str, client: str | None) -> None:
    """Sign up: a new, unverified account and its verification mail, or, when the email is taken,
    a mail to its owner saying someone tried. The caller commits and answers the same either way.

    Raises AccountError for an email that is not one plain address.
    """
    email = parse_email(email)
    existing = find_by_email(email)
    if existing is None:
        user = create_user(email, password)
        db.session.flush()
        send_verification(user, client)
        return
    _hash(password)  # the same work as a new account: the time taken says nothing
    if may_mail(existing.email, "signup_taken", client):
        mail.notify(existing, "signup_taken", forgot_url=external_url("dashboard.forgot_password"))


# The clock the mailed links are dated and aged by; tests move it by hand.
clock = time.time


class _DatedByClock(TimestampSigner):
    """itsdangerous' timestamped signatures, dated by `clock`."""

    def get_timestamp(self) -> int:
        return int(clock())


def _tokens(purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key, salt=f"kokoro-pay {purpose}", signer=_DatedByClock)


class TokenError(AccountError):
    """A mailed link that is malformed, expired or already used; the message says which, for people."""


def _read(purpose: str, token: str, max_age: timedelta, fields: int) -> list:
    try:
        values = _tokens(purpose).loads(token, max_age=max_age.total_seconds())
    except SignatureExpired:
        raise TokenError("This link has expired. Ask for a new one.") from None
    except BadSignature:
        raise TokenError("This link is not valid. Check that you copied all of it.") from None
    if not isinstance(values, list) or len(values) != fields:
        # Signed by us, for another version of this link: ones mailed before an upgrade.
        raise TokenError("This link is not valid any more. Ask for a new one.")
    return values


def send_invitation(invitation: Invitation, inviter: User, client: str | None) -> bool:
    """Queue the mail of an invitation (at most one per mailbox per MAIL_INTERVAL, and within the client's
    MAILS_PER_IP, as for sign-up); False when none was queued. Its link names the invitation and its nonce."""
    if not may_mail(invitation.email, "invitation", client):
        return False
    token = _tokens("invite").dumps([invitation.id, invitation.nonce])
    mail.send(
        "invitation",
        invitation.email,
        team=invitation.team.name,
        inviter=inviter.email,
        role=invitation.role,
        link=external_url("dashboard.invitation", token=token),
        days=round(config.current().invite_days),
    )
    return True


def read_invitation(token: str) -> tuple[int, str]:
    """The invitation id and nonce a mailed invitation link names; TokenError when it is not one or has expired."""
    invitation_id, nonce = _read("invite", token, timedelta(days=config.current().invite_days), fields=2)
    return invitation_id, nonce


def _trial_ahead(user: User) -> int:
    """The credits a verification would grant this account, as far as can be told before it is opened."""
    credits = config.current().signup_credits
    if not credits or teams.personal(user).unlimited or _trial_claimed(mailbox_digest(user.email)):
        return 0
    return credits


def send_verification(user: User, client: str | None) -> bool:
    """Queue the verification mail (at most one per mailbox per MAIL_INTERVAL, and within the client's
    MAILS_PER_IP); False when none was queued. The link carries the client's network: the trial it
    grants counts against the client that signed up (TRIALS_PER_IP_PER_DAY)."""
    if user.verified or not may_mail(user.email, "verify", client):
        return False
    token = _tokens("verify").dumps([user.id, user.email, user.email_version, client_digest(client)])
    mail.notify(
        user,
        "verify",
        link=external_url("dashboard.verify_email", token=token),
        hours=round(config.current().verify_hours),
        trial=_trial_ahead(user),
    )
    return True


def verify_email(token: str) -> int:
    """Mark the account of a verification link as verified and grant the free trial if it is due;
    the credits granted. The caller commits."""
    user_id, email, version, client = _read("verify", token, timedelta(hours=config.current().verify_hours), fields=4)
    user = db.session.get(User, user_id)
    if user is None or user.email != email or user.email_version != version or user.deleted_at is not None:
        raise TokenError("This link is not valid any more.")
    if user.verified:
        return 0
    return mark_verified(user, client)


def _trial_claimed(mailbox: str) -> bool:
    return db.session.scalar(select(TrialClaim.id).where(TrialClaim.mailbox == mailbox)) is not None


def mark_verified(user: User, client: str) -> int:
    """The email is the owner's: keys and purchases open. The free trial (SIGNUP_CREDITS) goes to the
    person's personal team, once per mailbox, ever (never once per team), and to at most
    TRIALS_PER_IP_PER_DAY mailboxes a day from one client (`client`: its `client_digest`, the one that
    signed up). The credits granted; the caller commits."""
    user.email_verified_at = utcnow()
    credits = config.current().signup_credits
    reference = billing.trial_reference(user.id)
    team = teams.personal(user)
    if not credits or team.unlimited:
        return 0
    # Its reference is unique per account: a second verification (a new email) grants nothing.
    if db.session.scalar(select(func.count()).where(LedgerEntry.reference == reference)):
        return 0
    mailbox = mailbox_digest(user.email)
    if _trial_claimed(mailbox) or not services.throttle().trial_allowed(client):
        return 0
    if not _claim_trial(mailbox):
        return 0
    billing.apply(team.id, credits, kind=LedgerKind.TRIAL, reference=reference, note="free trial")
    return credits


def _claim_trial(mailbox: str) -> bool:
    """Record that `mailbox` had its trial; False when it had already. The unique mailbox decides between
    two accounts of one mailbox verified at once: one row is inserted, the other statement changes nothing."""
    claim = insert(TrialClaim).values(mailbox=mailbox, claimed_at=utcnow())
    claimed = claim.on_conflict_do_nothing(index_elements=[TrialClaim.mailbox]).returning(TrialClaim.id)
    return db.session.execute(claimed).first() is not None


def request_password_reset(email: str, client: str | None) -> None:
    """Mail a reset link to the account with this email, if there is one; the caller says the same either way.

    Whether or not there is one, the same work is done (the limits counted, a link signed, the mail
    written); only queuing it differs: how long the request takes says nothing about who has an account.
    A request for an address with no account takes a turn of that exact address's own, never the
    turn of the mailbox it may deliver to: asking for `owner+x@…` must not use up `owner@…`'s reset.
    """
    user = find_by_email(email)
    found = user is not None and user.deleted_at is None
    nobodys = None if found else _keyed("an address with no account", normalize_email(email))
    if not may_mail(email, "reset", client, mailbox=nobodys):
        return
    someone = user if found else User(id=0, email=normalize_email(email), email_version=0)
    token = _tokens("reset").dumps([someone.id, someone.email, someone.email_version, _password_stamp(someone)])
    written = mail.compose(
        "reset",
        user=someone,
        link=external_url("dashboard.reset_password", token=token),
        minutes=round(config.current().reset_minutes),
    )
    if found:
        mail.queue(written, user.email, user_id=user.id)


def _password_stamp(user: User) -> str:
    """Changes whenever the password does: a reset link names the password it replaces."""
    return hashlib.sha256((user.password_hash or "no password").encode()).hexdigest()[:16]


def user_for_reset(token: str) -> User:
    user_id, email, version, stamp = _read("reset", token, timedelta(minutes=config.current().reset_minutes), fields=4)
    user = db.session.get(User, user_id)
    # Sent before the account's email changed (even if it changed back): that mailbox may not be the owner's.
    if (
        user is None
        or user.deleted_at is not None
        or user.email != email
        or user.email_version != version
        or _password_stamp(user) != stamp
    ):
        raise TokenError("This link has been used already. Ask for a new one if you still need it.")
    return user


def reset_password(user: User, password: str, client: str | None) -> int:
    """Set a new password from a reset link: every sign-in ends; the mailbox is proven, so the email is
    verified too (the trial counted against `client`). Returns how many sign-ins ended; the caller commits."""
    set_password(user, password)
    if not user.verified:
        mark_verified(user, client_digest(client))
    ended = db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id)).rowcount
    notify_of_change(user, "password_changed", client, forgot_url=external_url("dashboard.forgot_password"))
    return ended


def request_email_change(user: User, new_email: str, client: str | None) -> None:
    """Mail a confirmation link to the new address; nothing changes until it is opened.

    When the address has an account already, its owner is told instead; the caller says the same either way.
    """
    new_email = parse_email(new_email)
    if new_email == user.email:
        raise AccountError("That is your email already.")
    owner = find_by_email(new_email)
    if not may_mail(new_email, "email_change" if owner is None else "signup_taken", client):
        return
    if owner is not None:
        mail.notify(owner, "signup_taken", forgot_url=external_url("dashboard.forgot_password"))
        return
    token = _tokens("email").dumps([user.id, user.email, user.email_version, new_email])
    mail.send(
        "email_change",
        new_email,
        user_id=user.id,
        link=external_url("dashboard.change_email", token=token),
        hours=round(config.current().verify_hours),
    )


@dataclass(frozen=True)
class EmailChange:
    """A confirmation link still good to use: the account, the email (and its version) it leaves, the new one."""

    user: User
    old_email: str
    version: int
    new_email: str


def read_email_change(token: str) -> EmailChange:
    user_id, old_email, version, new_email = _read(
        "email", token, timedelta(hours=config.current().verify_hours), fields=4
    )
    user = db.session.get(User, user_id)
    if user is None or user.email != old_email or user.email_version != version or user.deleted_at is not None:
        raise TokenError("This link has been used already, or the account's email changed since.")
    return EmailChange(user, old_email, version, new_email)


def change_email(change: EmailChange, client: str | None = None) -> None:
    """Move the account to its confirmed new email and tell the old one; the caller commits.

    One conditional UPDATE makes the change, only from the email and version the link names: of two
    links confirmed at once, the second finds them changed and changes nothing. Raises AccountError
    when that happened, or when the new email got an account meanwhile.
    """
    if find_by_email(change.new_email) is not None:
        raise AccountError("That email has an account now; nothing changed.")
    # The old address is told only if it was proven (notify_of_change): read before the change verifies the new one.
    old_proven = change.user.verified
    moved = db.session.execute(
        update(User)
        .where(User.id == change.user.id, User.email == change.old_email, User.email_version == change.version)
        .values(email=change.new_email, email_version=User.email_version + 1, email_verified_at=utcnow()),
        execution_options={"synchronize_session": False},
    ).rowcount
    if moved != 1:
        raise AccountError("The account's email changed since this link was sent; nothing changed.")
    db.session.expire(change.user)
    if db.session.scalar(
        select(LedgerEntry.id).where(LedgerEntry.reference == billing.trial_reference(change.user.id))
    ):
        # The person who had a trial now reads this mailbox too: it gets none of its own later.
        _claim_trial(mailbox_digest(change.new_email))
    if old_proven and may_mail(change.old_email, "email_changed", client):
        mail.send("email_changed", change.old_email, user_id=change.user.id, new_email=change.new_email)


def delete_account(user: User) -> None:
    """Erase what identifies the owner and close the account; the caller commits.

    The keys they made are revoked (401 at once), sign-ins end, mail to the owner is erased, and
    they leave every team they shared (teams.TeamError while they are the last owner of one).
    Their personal team's balance, ledger, speech requests and payments stay, under an anonymous
    account row, so the books still add up, and so does what they spent in shared teams.
    """
    now = utcnow()
    teams.leave_every_team(user)
    for key in db.session.scalars(select(ApiKey).where(ApiKey.created_by_id == user.id)):
        key.revoked_at = key.revoked_at or now
        key.name = ""
    db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id))
    db.session.execute(delete(OutboxMail).where(OutboxMail.user_id == user.id))
    team = teams.personal(user)
    # Automatic top-up ends with the account; one already being paid would charge the card for credits
    # the account forfeits, so the account waits for it (a minute or so).
    autotopup.turn_off(team)
    if autotopup.in_flight(team.id) is not None:
        raise teams.TeamError(
            "An automatic top-up of your personal team is being paid right now: delete the account once it is "
            "credited, in a minute or so."
        )
    team.stripe_customer_id = None
    team.card_payment_method = team.card_brand = team.card_last4 = team.card_expires = None
    team.low_balance_credits = None
    user.email = f"deleted-{user.id}@deleted.invalid"
    user.email_version += 1
    user.password_hash = None
    user.email_verified_at = None
    user.deleted_at = now


def check_password(user: User, password: str) -> bool:
    return bool(user.password_hash) and check_password_hash(user.password_hash, password)


def authenticate(email: str, password: str) -> User | None:
    """The account with this email and password, else None; one password hash is checked either way."""
    user = find_by_email(email)
    dummy = _dummy_hash()
    hashed = user.password_hash if user is not None and user.password_hash else dummy
    matches = check_password_hash(hashed, password)
    return user if matches and hashed is not dummy else None


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


@login_manager.user_loader
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
