"""The data: users and their balances, API keys, the ledger, speech requests.

Models never commit; the caller owns the transaction.
"""

import uuid
from datetime import datetime, timezone
from enum import StrEnum
from typing import Optional

from flask_login import UserMixin
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db


class LedgerKind(StrEnum):
    DEBIT = "debit"
    REFUND = "refund"
    GRANT = "grant"
    DEDUCTION = "deduction"
    TOPUP = "topup"
    PAYMENT_REFUND = "payment_refund"
    CHARGEBACK = "chargeback"
    # The free credits SIGNUP_CREDITS grants once per mailbox (TrialClaim), when an account of it is verified.
    TRIAL = "trial"


class SpeechState(StrEnum):
    CHARGED = "charged"
    DELIVERED = "delivered"
    # The upstream failed: what was not delivered was given back (`credits_refunded`).
    REFUNDED = "refunded"


class ReversalKind(StrEnum):
    # The charge's cumulative refunded amount, as Stripe reports it on each charge.refunded.
    REFUND = "refund"
    # A lost dispute's amount.
    DISPUTE = "dispute"


class TeamRole(StrEnum):
    """What a member may do in a team (docs/teams.md has the table)."""

    # Everything, including handing ownership on and deleting the team.
    OWNER = "owner"
    # Members, keys and billing.
    ADMIN = "admin"
    # Their own keys, and usage.
    DEVELOPER = "developer"
    # Payments, receipts and alerts.
    BILLING = "billing"


class KeyKind(StrEnum):
    # Calls the speech API, spending its team's credits.
    SPEECH = "speech"
    # Creates, lists, changes and revokes its team's speech keys over HTTP; cannot call speech.
    MANAGEMENT = "management"


class LimitPeriod(StrEnum):
    """How long a key's spending limit lasts before it starts again (UTC boundaries)."""

    LIFETIME = "lifetime"
    DAY = "day"
    # ISO weeks: from Monday 00:00 UTC.
    WEEK = "week"
    MONTH = "month"


class PaymentStatus(StrEnum):
    OPEN = "open"
    PENDING = "pending"
    PAID = "paid"
    FAILED = "failed"
    REFUNDED = "refunded"
    DISPUTED = "disputed"
    # Checkout was cancelled, or its session expired unpaid (Stripe's checkout.session.expired).
    EXPIRED = "expired"
    # An automatic top-up waiting for the worker to ask Stripe (app/autotopup.py).
    QUEUED = "queued"
    # Stripe took an automatic top-up's payment; its credits come with payment_intent.succeeded.
    PROCESSING = "processing"
    # Stripe's answer to an automatic top-up: the bank wants the customer to authenticate (SCA).
    ACTION_REQUIRED = "action_required"


class PaymentKind(StrEnum):
    # Bought by a person in Stripe Checkout.
    CHECKOUT = "checkout"
    # Bought by the automatic top-up worker with the team's saved card, off session.
    AUTOMATIC = "automatic"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class Team(db.Model):
    """Who pays: the balance, the ledger, keys, payments and the Stripe customer belong to a team.

    Every person has a personal team, made with their account; a team may have several members
    (Membership), each with a role.
    """

    __tablename__ = "teams"
    # AUTOINCREMENT on SQLite too: a team's id, which its books and keys carry, is never reused.
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # Made with its owner's account; the only team the owner had before teams were shared.
    personal: Mapped[bool] = mapped_column(default=False)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    unlimited: Mapped[bool] = mapped_column(default=False)
    stripe_customer_id: Mapped[Optional[str]] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A debit that takes the balance below this sends one email (None: LOW_BALANCE_CREDITS; 0: never).
    low_balance_credits: Mapped[Optional[int]] = mapped_column(BigInteger)
    # When that email was queued; a top-up or grant back above the threshold clears it (re-arms the alert).
    low_balance_sent_at: Mapped[Optional[datetime]]
    # The card saved at Stripe for automatic top-ups (its PaymentMethod), and what the pages show of it.
    card_payment_method: Mapped[Optional[str]] = mapped_column(String(255))
    card_brand: Mapped[Optional[str]] = mapped_column(String(32))
    card_last4: Mapped[Optional[str]] = mapped_column(String(4))
    card_expires: Mapped[Optional[str]] = mapped_column(String(7))
    # When the card was saved: a setup made before it (a late or replayed event) never replaces it.
    card_saved_at: Mapped[Optional[datetime]]
    # Automatic top-up: when a debit leaves the balance below `auto_topup_below` credits, buy the pack
    # `auto_topup_pack`, at most `auto_topup_monthly_limit` times a calendar month (UTC). Off: below is None.
    auto_topup_below: Mapped[Optional[int]] = mapped_column(BigInteger)
    auto_topup_pack: Mapped[Optional[str]] = mapped_column(String(50))
    auto_topup_monthly_limit: Mapped[Optional[int]]
    # Who turned it on (the payments it makes are recorded as theirs).
    auto_topup_by_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
    # An automatic top-up is queued or at Stripe: no other is queued until it ends.
    auto_topup_pending: Mapped[bool] = mapped_column(default=False, server_default=false())
    # Why automatic top-up stopped (a declined card, one that needs the customer, a removed card), and when.
    auto_topup_paused: Mapped[Optional[str]] = mapped_column(String(200))
    auto_topup_paused_at: Mapped[Optional[datetime]]
    # The month's cap was reached: nothing is queued before this instant (the next month's start).
    auto_topup_capped_until: Mapped[Optional[datetime]]
    # Set by an operator: every key of the team gets 401 and the playground refuses, until cleared.
    disabled_at: Mapped[Optional[datetime]]
    # Closed by an owner: nobody works on it any more and its keys are revoked; its books stay.
    closed_at: Mapped[Optional[datetime]]

    memberships: Mapped[list["Membership"]] = relationship(back_populates="team")

    def __repr__(self) -> str:
        return f"<Team {self.id} {self.name}>"


class User(UserMixin, db.Model):
    """A person: signs in, belongs to teams (Membership)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Stored lower-cased, so the unique constraint makes emails unique case-insensitively.
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[Optional[str]] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Until set, the account can sign in but not create keys or buy credits.
    email_verified_at: Mapped[Optional[datetime]]
    # Deleted by its owner: personal data erased, the ledger kept under this anonymous row.
    deleted_at: Mapped[Optional[datetime]]
    # Disabled by an admin: the keys they made get 401 and they cannot sign in, until enabled again.
    disabled_at: Mapped[Optional[datetime]]
    # Goes up by one at every change of the email: a mailed link names it, so any change
    # (A→B→A too) ends the links sent before it (app/accounts.py).
    email_version: Mapped[int] = mapped_column(default=0, server_default="0")

    memberships: Mapped[list["Membership"]] = relationship(back_populates="user")

    # The token of the sign-in this object was loaded for (app/accounts.py); never stored.
    login_token = None

    @property
    def verified(self) -> bool:
        return self.email_verified_at is not None

    def get_id(self) -> str | None:
        """What Flask-Login keeps in the session and remember-me cookies: the sign-in's token, not the user id."""
        return self.login_token

    def __repr__(self) -> str:
        return f"<User {self.id} {self.email}>"


class Membership(db.Model):
    """A person in a team, with a role."""

    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("team_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    role: Mapped[TeamRole] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    team: Mapped[Team] = relationship(back_populates="memberships")
    user: Mapped[User] = relationship(back_populates="memberships")


class Invitation(db.Model):
    """An invitation to join a team with a role, mailed to one address as a signed link.

    The link names the row and its `nonce`: it works until `expires_at`, once, for that address
    only; a resend draws a new nonce (the old link stops working), a cancel ends it.
    """

    __tablename__ = "invitations"

    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    # Normalised as accounts store emails: the account that accepts must have exactly this one.
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[TeamRole] = mapped_column(String(16))
    invited_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    nonce: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    accepted_at: Mapped[Optional[datetime]]
    accepted_by_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
    cancelled_at: Mapped[Optional[datetime]]

    team: Mapped[Team] = relationship()
    invited_by: Mapped[User] = relationship(foreign_keys=[invited_by_id])


class LoginSession(db.Model):
    """One signed-in browser: its session and remember-me cookies carry a token for this row.

    Signing out deletes the row, so both cookies stop working at once; only the token's
    SHA-256 is stored.
    """

    __tablename__ = "login_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    remember: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]

    user: Mapped["User"] = relationship()


class ApiKey(db.Model):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The team it spends for, and the member who made it.
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    created_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    # What the dashboard shows, e.g. "kp_live_Ab3d"; the secret itself is never stored.
    prefix: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[Optional[datetime]]
    revoked_at: Mapped[Optional[datetime]]
    # What it may call (KeyKind): speech, or the key-management API of its team.
    kind: Mapped[str] = mapped_column(String(16), default=KeyKind.SPEECH, server_default=KeyKind.SPEECH)
    # The most credits it may spend in a period (None: the team's balance is its only limit).
    spend_limit: Mapped[Optional[int]] = mapped_column(BigInteger)
    # The limit's period (LimitPeriod); None: no limit, and `spent` counts its whole life.
    spend_period: Mapped[Optional[str]] = mapped_column(String(8))
    # Credits it spent in the window `spent_window` names (debits less refunds): app/keys.py keeps it
    # with each debit and refund, in their transaction; the audit checks it against the books.
    spent: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    spent_window: Mapped[str] = mapped_column(String(24), default="lifetime", server_default="lifetime")
    # After this it is refused (401, code key_expired).
    expires_at: Mapped[Optional[datetime]]
    # Space-separated addresses and CIDR ranges it may be used from, as written by app/keys.py (None: any).
    allowed_ips: Mapped[Optional[str]] = mapped_column(Text)
    # Space-separated voice and model names it may ask for (None: any); OpenAI's names are resolved at use.
    allowed_voices: Mapped[Optional[str]] = mapped_column(Text)
    allowed_models: Mapped[Optional[str]] = mapped_column(Text)
    # The secret before the last roll, working until `previous_expires_at`; cleared when a roll ends it at once.
    previous_digest: Mapped[Optional[str]] = mapped_column(String(64), unique=True)
    previous_prefix: Mapped[Optional[str]] = mapped_column(String(16))
    previous_expires_at: Mapped[Optional[datetime]]
    rolled_at: Mapped[Optional[datetime]]

    team: Mapped[Team] = relationship()
    created_by: Mapped[User] = relationship()

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= utcnow()

    @property
    def previous_works(self) -> bool:
        """Whether the secret before the last roll still works."""
        return self.previous_digest is not None and self.previous_expires_at > utcnow()

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class LedgerEntry(db.Model):
    """One row per change of a balance; append-only."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(20))
    # Makes each money event happen once: "speech:<id>", "refund:<id>", "topup:<session>", … (billing.py)
    reference: Mapped[str] = mapped_column(String(255), unique=True)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[Optional[str]] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # What caused the row, where it is a row of ours: the speech request of a debit or refund (its
    # row is written after the debit, in the same transaction, so the key is checked at commit),
    # the payment of a top-up, refund or chargeback. Grants, deductions and trials name none.
    speech_request_id: Mapped[Optional[str]] = mapped_column(
        ForeignKey("speech_requests.id", deferrable=True, initially="DEFERRED"), index=True
    )
    payment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("payments.id"), index=True)

    # Loaded with the row (one join on a key): the ledger's pages link each payment's rows to it.
    payment: Mapped[Optional["Payment"]] = relationship(lazy="joined")
    # The ledger's pages name who made a request and with which key (loaded by them in one query).
    speech_request: Mapped[Optional["SpeechRequest"]] = relationship()


class SpeechRequest(db.Model):
    """One metered call to POST /v1/audio/speech: charged → delivered | refunded."""

    __tablename__ = "speech_requests"
    # The streams a team has open are its requests still charged (the concurrent-stream cap).
    __table_args__ = (
        Index("ix_speech_requests_team_id_state", "team_id", "state"),
        # A key's requests in a period: what its spending limit counts (app/keys.py, the audit).
        Index("ix_speech_requests_api_key_id_created_at", "api_key_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_request_id)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    # The member whose key it came with (who made the key), or who asked in the playground.
    made_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    api_key_id: Mapped[Optional[int]] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(100))
    voice: Mapped[str] = mapped_column(String(200))
    response_format: Mapped[str] = mapped_column(String(10))
    speed: Mapped[float] = mapped_column(Float, default=1.0)
    characters: Mapped[int]
    # What was taken from the balance: 0 for unlimited accounts, whose usage is still recorded.
    credits: Mapped[int] = mapped_column(BigInteger)
    # Given back when the upstream failed: all of it before any audio, the undelivered share after.
    credits_refunded: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SpeechState.CHARGED, index=True)
    upstream_status: Mapped[Optional[int]]
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    # Seconds of audio (in ms) in the bytes relayed so far; None when the stream could not be measured.
    audio_ms: Mapped[Optional[int]] = mapped_column(BigInteger, default=0)
    # Written every few seconds while a stream is relayed: `flask speech settle` leaves live streams alone.
    progress_at: Mapped[Optional[datetime]]
    error: Mapped[Optional[str]] = mapped_column(String(500))
    # The client's own X-Request-Id, when it sent a well-formed one (answered back as X-Request-Id).
    client_request_id: Mapped[Optional[str]] = mapped_column(String(128))
    # The gateway process serving it (GatewayProcess): settled by time only once that process is gone.
    process_id: Mapped[Optional[str]] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    first_byte_ms: Mapped[Optional[int]]
    duration_ms: Mapped[Optional[int]]
    finished_at: Mapped[Optional[datetime]]

    api_key: Mapped[Optional[ApiKey]] = relationship()
    made_by: Mapped[User] = relationship()


class GatewayProcess(db.Model):
    """A gateway process that serves speech, alive while its lease is renewed (app/liveness.py).

    The process renews `lease_until` from a thread of its own every third of the lease; a
    process that crashed, was killed or lost its database stops renewing, and once the lease
    has run out `flask speech settle` may settle the requests it left charged.
    """

    __tablename__ = "gateway_processes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime]


class UpstreamServer(db.Model):
    """A speech server's health as every gateway sees it (app/places.py): taken out until
    `out_until` (seconds since the epoch) after `failures` failures in a row."""

    __tablename__ = "upstream_servers"

    url: Mapped[str] = mapped_column(String(512), primary_key=True)
    failures: Mapped[int] = mapped_column(default=0)
    out_until: Mapped[float] = mapped_column(Float, default=0.0)


class UpstreamPlace(db.Model):
    """A place a gateway process holds: on a speech server (`server_url`), or in the wait for one
    (`server_url` empty). It counts while its process's lease is alive (app/places.py)."""

    __tablename__ = "upstream_places"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    process_id: Mapped[str] = mapped_column(ForeignKey("gateway_processes.id", ondelete="CASCADE"), index=True)
    server_url: Mapped[Optional[str]] = mapped_column(String(512), index=True)
    team_id: Mapped[Optional[int]]
    taken_at: Mapped[datetime] = mapped_column(default=utcnow)


# The payments an index keeps to one per team: automatic top-ups queued or at Stripe.
AUTOMATIC_IN_FLIGHT = "kind = 'automatic' AND status IN ('queued', 'processing')"


class Payment(db.Model):
    """A purchase of a credit pack: in Stripe Checkout, or an automatic top-up with the saved card.

    The credits are fixed when it is made, from our own packs; they are credited only by Stripe's
    webhook (checkout.session.completed, payment_intent.succeeded).
    """

    __tablename__ = "payments"
    __table_args__ = (
        # At most one automatic top-up in flight per team, whatever the code above does.
        Index(
            "ix_payments_one_automatic_in_flight",
            "team_id",
            unique=True,
            postgresql_where=text(AUTOMATIC_IN_FLIGHT),
            sqlite_where=text(AUTOMATIC_IN_FLIGHT),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # The team credited, and the member who bought.
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    bought_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default=PaymentKind.CHECKOUT, server_default=PaymentKind.CHECKOUT)
    # A Checkout purchase's session; None for an automatic top-up.
    checkout_session_id: Mapped[Optional[str]] = mapped_column(String(255), unique=True)
    payment_intent_id: Mapped[Optional[str]] = mapped_column(String(255), index=True)
    # An automatic top-up's Idempotency-Key at Stripe, made with its row: every try of it sends this
    # key, so Stripe makes one PaymentIntent however often it is asked. Its metadata names it too.
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(64), unique=True)
    # Stripe's invoice for the payment (Checkout's invoice_creation, or the one made for an automatic top-up).
    invoice_id: Mapped[Optional[str]] = mapped_column(String(255))
    # An automatic top-up's invoice while it is being made (created, not yet finalised and paid): voided
    # should it never be finished, so no payable invoice is left at Stripe.
    draft_invoice_id: Mapped[Optional[str]] = mapped_column(String(255))
    # Why an automatic top-up failed (Stripe's message), for the team and the operator.
    failure: Mapped[Optional[str]] = mapped_column(String(500))
    # The worker's tries of an automatic top-up: how many, its claim on it, when it is due again (set
    # when it is queued, so never null for one: the buyer and the invoicer take a row only once it is due).
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    claimed_until: Mapped[Optional[datetime]]
    next_attempt_at: Mapped[Optional[datetime]]
    pack: Mapped[str] = mapped_column(String(50))
    credits: Mapped[int] = mapped_column(BigInteger)
    amount_cents: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    # Checkout: open → paid (credited) | pending (async payment) → paid | failed | expired.
    # Automatic: queued → processing → paid | failed | action_required. Then paid → refunded | disputed.
    status: Mapped[str] = mapped_column(String(16), default=PaymentStatus.OPEN)
    # Credits owed back through refunds and lost disputes, including any the balance could not cover.
    credits_reversed: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    paid_at: Mapped[Optional[datetime]]

    bought_by: Mapped["User"] = relationship()

    @property
    def name(self) -> str:
        """The payment's own name, shown to people and in its ledger references: its Checkout Session's id,
        or an automatic top-up's idempotency key."""
        return self.checkout_session_id or self.idempotency_key


class PaymentReversal(db.Model):
    """A refund or lost dispute reported by Stripe for a charge, kept whatever order events arrive in.

    Applied to its payment once that payment is credited (app/payments.py); until then it waits.
    """

    __tablename__ = "payment_reversals"

    id: Mapped[int] = mapped_column(primary_key=True)
    payment_intent_id: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[ReversalKind] = mapped_column(String(16))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class StripeEvent(db.Model):
    """A webhook event already handled: its unique id makes a redelivery a no-op."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(200))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class MailState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    # The mail server refused it for good (a 5xx answer); kept, with the answer, for the operator.
    FAILED = "failed"


class OutboxMail(db.Model):
    """An email, written in the transaction of the change that causes it and sent after commit (app/mail/)."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_state_next_attempt_at", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    recipient: Mapped[str] = mapped_column(String(254))
    kind: Mapped[str] = mapped_column(String(30))
    subject: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(10), default=MailState.QUEUED)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A sender that took this mail holds it until then; one that died lets it go to the next.
    claimed_until: Mapped[Optional[datetime]]
    last_error: Mapped[Optional[str]] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    sent_at: Mapped[Optional[datetime]]


class TrialClaim(db.Model):
    """A mailbox that has had its free trial; kept when its account is deleted (app/accounts.py).

    Only a keyed hash of the canonical mailbox is stored, unique: two accounts of one mailbox
    verified at once cannot both be granted a trial.
    """

    __tablename__ = "trial_claims"

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(64), unique=True)
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)


class MailStamp(db.Model):
    """When the last mail of a kind was queued to a mailbox (a keyed hash of it): one a MAIL_INTERVAL.

    Taken by one conditional upsert (app/mail/outbox.py), so concurrent requests cannot both send.
    """

    __tablename__ = "mail_stamps"

    mailbox: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(30), primary_key=True)
    sent_at: Mapped[datetime]


class AdminAction(db.Model):
    """What an admin did in the console, and to whom; written with the change, never edited."""

    __tablename__ = "admin_actions"

    id: Mapped[int] = mapped_column(primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    action: Mapped[str] = mapped_column(String(40))
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    # The team an action changed (its credits, flags or keys), where it changed one.
    team_id: Mapped[Optional[int]] = mapped_column(ForeignKey("teams.id"), index=True)
    details: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    admin: Mapped["User"] = relationship(foreign_keys=[admin_id])
    user: Mapped[Optional["User"]] = relationship(foreign_keys=[user_id])
    team: Mapped[Optional["Team"]] = relationship()
