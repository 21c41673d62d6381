"""Test data made through the same domain code the product uses."""

import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy import func, select

from app import accounts, billing, keys, metering, teams
from app.extensions import db
from app.models import (
    ApiKey,
    LedgerEntry,
    MailStamp,
    Membership,
    OutboxMail,
    Payment,
    SpeechRequest,
    Team,
    User,
    utcnow,
)

_counter = iter(range(1, 10**9))


@dataclass
class Customer:
    """A person, their personal team (which pays), and a key of it."""

    user_id: int
    email: str
    secret: str
    key_id: int
    team_id: int | None = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.secret}"}


def customer(
    app, balance: int = 0, unlimited: bool = False, password: str | None = None, verified: bool = True
) -> Customer:
    with app.app_context():
        user = accounts.create_user(f"customer{next(_counter)}@example.com", password)
        team = teams.personal(user)
        team.unlimited = unlimited
        user.email_verified_at = utcnow() if verified else None
        db.session.flush()
        if balance:
            billing.grant(team, balance, "test credits")
        key, secret = keys.create_key(team, user, "test key")
        db.session.commit()
        return Customer(user.id, user.email, secret, key.id, team.id)


def charged(app, team_id: int, count: int = 1, characters: int = 10) -> list[str]:
    """The ids of `count` speech requests charged (and committed) to the team."""
    with app.app_context():
        ids = [charge_speech(team_id, characters).id for _ in range(count)]
        db.session.commit()
        return ids


def race_charges(app, customer: "Customer", count: int, characters: int) -> Counter:
    """`count` threads charge `characters` each to the customer's key at once; how many were "charged", "short"
    (the balance did not cover it) or "limit" (the key's spending limit did not)."""
    barrier = threading.Barrier(count)

    def charge(_):
        with app.app_context():
            barrier.wait(timeout=30)
            try:
                metering.charge_speech(
                    customer.team_id,
                    customer.user_id,
                    customer.key_id,
                    unlimited=False,
                    characters=characters,
                    model="kokoro",
                    voice="af_sky",
                    response_format="mp3",
                )
                db.session.commit()
                return "charged"
            except billing.InsufficientCredits:
                db.session.rollback()
                return "short"
            except keys.KeyLimitReached:
                db.session.rollback()
                return "limit"
            finally:
                db.session.remove()

    with ThreadPoolExecutor(count) as pool:
        return Counter(pool.map(charge, range(count)))


def charge_speech(
    team_id: int, characters: int, made_by_id: int | None = None, key_id: int | None = None, **fields
) -> SpeechRequest:
    """One speech request charged to the team, inside the caller's app context (`fields`: a request_id…):
    through the team's first key, or made by `made_by_id` with `key_id` (None: the playground)."""
    team = db.session.get(Team, team_id)
    if made_by_id is None:
        key = db.session.scalars(select(ApiKey).where(ApiKey.team_id == team_id).order_by(ApiKey.id)).first()
        made_by_id, key_id = key.created_by_id, key.id
    paid = metering.charge_speech(
        team.id,
        made_by_id,
        key_id,
        unlimited=team.unlimited,
        characters=characters,
        model="kokoro",
        voice="af_sky",
        response_format="mp3",
        **fields,
    )
    return db.session.get(SpeechRequest, paid.request_id)


def starter_payment(team_id: int, session_id: str, **extra) -> Payment:
    """A starter pack (10,000 credits for 500 cents) as the buy button records it, added to the session:
    bought by the team's first owner."""
    fields = {"pack": "starter", "credits": 10_000, "amount_cents": 500, "currency": "usd", "status": "open"}
    buyer = db.session.scalar(select(Membership.user_id).where(Membership.team_id == team_id).order_by(Membership.id))
    payment = Payment(team_id=team_id, bought_by_id=buyer, checkout_session_id=session_id, **{**fields, **extra})
    db.session.add(payment)
    return payment


def add_key(app, user_id: int) -> str:
    """Another key of the person's personal team, made by them; its secret."""
    with app.app_context():
        user = db.session.get(User, user_id)
        _, secret = keys.create_key(teams.personal(user), user, "another key")
        db.session.commit()
        return secret


def balance(app, team_id: int) -> int:
    with app.app_context():
        return db.session.scalar(select(Team.balance).where(Team.id == team_id))


def team_of(app, user_id: int) -> int:
    """The id of the person's personal team."""
    with app.app_context():
        return teams.personal(db.session.get(User, user_id)).id


def personal_balance(app, user: User) -> int:
    """The balance of the person's personal team."""
    with app.app_context():
        return teams.personal(db.session.get(User, user.id)).balance


def ledger_sum(app, team_id: int) -> int:
    with app.app_context():
        return db.session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(LedgerEntry.team_id == team_id)
        )


def ledger(app, team_id: int, last=LedgerEntry.balance_after) -> list[tuple]:
    """A team's ledger rows in order: (kind, amount, balance after), or another column last."""
    with app.app_context():
        rows = db.session.execute(
            select(LedgerEntry.kind, LedgerEntry.amount, last)
            .where(LedgerEntry.team_id == team_id)
            .order_by(LedgerEntry.id)
        )
        return [tuple(row) for row in rows]


def ledger_notes(app, team_id: int) -> list[tuple[str, int, str | None]]:
    return ledger(app, team_id, LedgerEntry.note)


def speech_requests(app, team_id: int) -> list[SpeechRequest]:
    with app.app_context():
        rows = db.session.scalars(
            select(SpeechRequest).where(SpeechRequest.team_id == team_id).order_by(SpeechRequest.created_at)
        ).all()
        db.session.expunge_all()
        return rows


def assert_books_balance(app, team_id: int) -> None:
    """Invariant 2: the ledger of a team sums to the balance."""
    assert ledger_sum(app, team_id) == balance(app, team_id)


def signed_up(app, web: "WebClient", email: str, credits: int = 0) -> int:
    """Sign up, verify and sign in `web` as a customer does, then grant `credits`; the id of the new
    account's personal team."""
    web.signup(email)
    with app.app_context():
        team = teams.personal(db.session.scalar(select(User).where(User.email == email)))
        if credits:
            billing.grant(team, credits, "welcome")
            db.session.commit()
        return team.id


def mails(app, recipient: str | None = None, kind: str | None = None) -> list[OutboxMail]:
    """The outbox's mails, oldest first, to `recipient` and of `kind` when given."""
    with app.app_context():
        query = select(OutboxMail).order_by(OutboxMail.id)
        if recipient is not None:
            query = query.where(OutboxMail.recipient == recipient)
        if kind is not None:
            query = query.where(OutboxMail.kind == kind)
        rows = db.session.scalars(query).all()
        db.session.expunge_all()
        return rows


def time_passes(app, minutes=5):
    """The mail stamps are `minutes` older: as if that time had passed since each mail was queued."""
    with app.app_context():
        for stamp in db.session.scalars(select(MailStamp)):
            stamp.sent_at -= timedelta(minutes=minutes)
        db.session.commit()


def mail_link(app, recipient: str, kind: str) -> str:
    """The path of the link in the latest mail of `kind` to `recipient`."""
    body = mails(app, recipient, kind)[-1].body
    return urlsplit(re.search(r"https?://\S+", body).group(0)).path


class WebClient:
    """Flask's test client plus the CSRF token of the last page, as a browser would send it."""

    def __init__(self, client):
        self.client = client
        self.token = None

    def get(self, url, **kwargs):
        response = self.client.get(url, **kwargs)
        match = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', response.data) or re.search(
            rb'name="csrf_token" value="([^"]+)"', response.data
        )
        if match:
            self.token = match.group(1).decode()
        return response

    def post(self, url, data=None, csrf=True, **kwargs):
        data = dict(data or {})
        if csrf:
            data["csrf_token"] = self.token
        return self.client.post(url, data=data, **kwargs)

    def register(self, email="new@example.com", password="correct horse battery"):
        """The sign-up form alone: it answers "check your inbox" and signs nobody in."""
        self.get("/signup")
        return self.post("/signup", {"email": email, "password": password, "confirm": password})

    def signup(self, email="new@example.com", password="correct horse battery"):
        """Sign up as a customer does: the form, the link in the verification mail, then sign in."""
        self.register(email, password)
        self.get(mail_link(self.client.application, email.lower(), "verify"))
        return self.login(email, password)

    def logout(self):
        # A page first, as a browser has one: signing in renewed the session and with it the CSRF token.
        self.get("/keys")
        return self.post("/logout")

    def login(self, email, password="correct horse battery", next_url=None):
        self.get("/login")
        url = "/login" + (f"?next={next_url}" if next_url else "")
        return self.post(url, {"email": email, "password": password})
