"""A metered speech request's life, in the database: charged → delivered | refunded.

    charge_speech     debit the characters and record the request, within the stream cap
    record_progress   how far its stream got (bytes, audio), while it is still charged
    mark_delivered    the audio went out: the charge stands
    refund_speech     it failed: what was not delivered goes back, at most once
    settle_stale      requests a dead gateway process left charged, refunded (`flask speech settle`)

Each step moves the request out of `charged` with one conditional UPDATE, so of any number of
racing steps (the stream's end, a hang-up, settle) exactly one wins. Balances and the ledger are
billing's: every credit taken or given back here goes through billing.apply. Like billing, the
functions change state inside the caller's transaction; the caller commits.
"""

import math
from datetime import datetime, timedelta
from fractions import Fraction
from typing import NamedTuple

from sqlalchemy import bindparam, exists, func, insert, select, update

from app import billing, config, keys, metrics
from app.extensions import db
from app.models import GatewayProcess, LedgerKind, SpeechRequest, SpeechState, new_request_id, utcnow


class Charge(NamedTuple):
    """A charged speech request: its id, the credits taken and the balance right after."""

    request_id: str
    credits: int
    balance: int


class TooManyStreams(Exception):
    """The team already has its maximum of speech streams open."""

    def __init__(self, limit: int):
        super().__init__(f"at most {limit} concurrent streams")
        self.limit = limit


_speech = SpeechRequest.__table__
# What a speech request's row is given; the rest (state charged, nothing refunded or relayed
# yet, created now) are the model's defaults.
_SPEECH_FIELDS = (
    "id",
    "team_id",
    "made_by_id",
    "api_key_id",
    "model",
    "voice",
    "response_format",
    "speed",
    "characters",
    "credits",
    "client_request_id",
    "process_id",
    "created_at",
)
# A team's streams in flight: its requests still charged.
_IN_FLIGHT = (
    select(func.count())
    .where(_speech.c.team_id == bindparam("team_id"), _speech.c.state == SpeechState.CHARGED)
    .scalar_subquery()
)
# The request's row, written only while the team has fewer than `max_streams` in flight: the
# count and the insert are one statement, run after the debit has locked the team's row.
_RECORD_SPEECH = (
    insert(_speech)
    .from_select(
        _SPEECH_FIELDS,
        select(*(bindparam(name, type_=_speech.c[name].type) for name in _SPEECH_FIELDS)).where(
            _IN_FLIGHT < bindparam("max_streams")
        ),
    )
    .returning(_speech.c.id)
)


# The stream limit when none is set: a count no team reaches.
_NO_LIMIT = 2**31 - 1


def charge_speech(
    team_id: int,
    made_by_id: int,
    key_id: int | None,
    *,
    unlimited: bool,
    characters: int,
    model: str,
    voice: str,
    response_format: str,
    speed: float = 1.0,
    max_streams: int | None = None,
    request_id: str | None = None,
    client_request_id: str | None = None,
    process_id: str | None = None,
) -> Charge:
    """Record a speech request and debit `characters` credits for it.

    Unlimited teams are recorded with a charge of 0 and no ledger row.
    Raises InsufficientCredits, with nothing written, when the balance is short,
    keys.KeyLimitReached when the key's spending limit does not cover it, and
    TooManyStreams when the team already has `max_streams` requests in flight; the
    caller rolls back. The stream count is exact across processes and hosts: it is taken after
    this transaction has locked the team's row (the debit, or a no-op update for
    unlimited teams), so concurrent charges of one team are counted one by one. The key's
    use is counted in this transaction too, after that lock, so a key's limit, like a
    balance, is never overshot.
    `process_id` names the gateway process serving it (app/liveness.py): settle leaves the
    request alone while that process's lease is alive.
    """
    credits = 0 if unlimited else characters
    request_id = request_id or new_request_id()
    if credits:
        note = f"{characters} characters"
        balance = billing.apply(
            team_id,
            -credits,
            kind=LedgerKind.DEBIT,
            reference=billing.speech_reference(request_id),
            note=note,
            speech_request_id=request_id,
        )
    else:
        # Takes the team's row lock as the debit would, which the stream count below relies on.
        balance = billing.hold(team_id)
    # One reading of the clock, once the team's row is locked: the request is dated at the time its
    # key's use is counted at (keys.count_use).
    now = utcnow()
    if key_id is not None:
        now = keys.count_use(key_id, credits, now)
    row = {
        "id": request_id,
        "team_id": team_id,
        "made_by_id": made_by_id,
        "api_key_id": key_id,
        "model": model,
        "voice": voice,
        "response_format": response_format,
        "speed": speed,
        "characters": characters,
        "credits": credits,
        "client_request_id": client_request_id,
        "process_id": process_id,
        "created_at": now,
        "max_streams": _NO_LIMIT if max_streams is None else max_streams,
    }
    if db.session.execute(_RECORD_SPEECH, row).first() is None:
        raise TooManyStreams(max_streams)
    return Charge(request_id, credits, balance)


def streams_in_flight(team_id: int) -> int:
    """How many of the team's speech requests are still charged: its streams open now."""
    return db.session.scalar(select(_IN_FLIGHT), {"team_id": team_id})


# A charged request's row, changed only while it is still charged: the guard every step below relies on.
# Built once: the columns set are those the parameters name (SQLAlchemy compiles, and keeps, one
# statement per set of them). A stream writes its progress every STREAM_HEARTBEAT_SECONDS of time and
# of audio, and building the statement anew each time cost more CPU than running it (8% of a
# request's, at 16 streams).
_WHILE_CHARGED = update(_speech).where(_speech.c.id == bindparam("request_id"), _speech.c.state == SpeechState.CHARGED)
_RECORD_PROGRESS = _WHILE_CHARGED.returning(_speech.c.id)
_CLOSE = _WHILE_CHARGED.returning(
    _speech.c.team_id,
    _speech.c.credits,
    _speech.c.characters,
    _speech.c.speed,
    _speech.c.audio_ms,
    _speech.c.api_key_id,
    _speech.c.created_at,
)


def record_progress(request_id: str, bytes_sent: int, audio_ms: int | None) -> bool:
    """Note how far a live stream has got; False when the request was settled meanwhile."""
    row = db.session.execute(
        _RECORD_PROGRESS,
        {"request_id": request_id, "bytes_sent": bytes_sent, "audio_ms": audio_ms, "progress_at": utcnow()},
    ).first()
    return row is not None


def _close_speech(request_id: str, state: str, details: dict):
    """Move a charged request to `state`; None when it was not in `charged` any more."""
    values = {"state": state, "finished_at": utcnow(), **details}
    if values.get("error"):
        values["error"] = values["error"][:500]
    # A table statement, not an ORM one: every speech request runs it, and the ORM's bulk
    # update machinery cost more CPU than the database work.
    return db.session.execute(_CLOSE, {**values, "request_id": request_id}).first()


def mark_delivered(request_id: str, **details) -> bool:
    """The audio went out: the charge stands. False if the request was already settled."""
    return _close_speech(request_id, SpeechState.DELIVERED, details) is not None


def kept_credits(credits: int, characters: int, speed: float, audio_ms: int | None, chars_per_second: float) -> int:
    """The share of a charge that delivered audio pays for, rounded up.

    The whole text is expected to last `characters / (chars_per_second × speed)` seconds;
    the audio delivered pays for its share of that, never more than the charge. A rate at
    or above the fastest speech of any voice makes the expected length a lower bound, so a
    refund never pays back audio that went out. `audio_ms` None (a stream that could not be
    measured) keeps the whole charge.
    """
    if audio_ms is None:
        return credits
    if audio_ms <= 0 or credits <= 0:
        return 0
    share = Fraction(audio_ms) * Fraction(str(chars_per_second)) * Fraction(str(speed)) / (1000 * characters)
    return min(credits, math.ceil(credits * share))


def refund_speech(request_id: str, reason: str, **details) -> int | None:
    """Give back what a failed request did not deliver, at most once and only after a charge.

    `details` may carry `audio_ms`, the audio delivered (0 before the first byte: a full
    refund); without it, the progress last recorded for the request counts. Returns the
    credits given back, or None when the request was not charged any more: the state
    change from `charged` is the guard, so a second call, or one for a request already
    delivered, does nothing. The speech rate is SPEECH_CHARS_PER_SECOND (see kept_credits).
    """
    row = _close_speech(request_id, SpeechState.REFUNDED, {**details, "error": reason})
    if row is None:
        return None
    team_id, credits, characters, speed, audio_ms, key_id, charged_at = row
    chars_per_second = config.current().speech_chars_per_second
    refund = credits - kept_credits(credits, characters, speed, audio_ms, chars_per_second)
    if refund:
        db.session.execute(update(_speech).where(_speech.c.id == request_id).values(credits_refunded=refund))
        billing.apply(
            team_id,
            refund,
            kind=LedgerKind.REFUND,
            reference=billing.refund_reference(request_id),
            note=reason,
            speech_request_id=request_id,
        )
        if key_id is not None:
            keys.give_back(key_id, refund, charged_at)
        metrics.CREDITS_REFUNDED.inc(refund)
    return refund


class Settled(NamedTuple):
    found: int
    settled: int
    credits: int


def settle_stale(older_than_seconds: float) -> Settled:
    """Refund what requests a dead gateway process left charged did not deliver; commits each on its own.

    Only requests whose process is gone (see stale_charges) are touched; one settled meanwhile,
    by its process or another run, is skipped.
    """
    settled = credits = 0
    stale = stale_charges(older_than_seconds)
    for request_id in stale:
        refund = refund_speech(request_id, STALE_REASON)
        db.session.commit()
        if refund is not None:
            settled += 1
            credits += refund
    return Settled(len(stale), settled, credits)


STALE_REASON = "Never settled: the worker serving it stopped (crash or lost database connection)."

_processes = GatewayProcess.__table__


def stale_charges(older_than_seconds: float, now: datetime | None = None) -> list[str]:
    """Ids of requests still `charged` whose gateway process is gone, with no progress for `older_than_seconds`.

    A process is gone when its lease has run out (or it never had one: requests from before
    leases, and those charged outside a gateway process). A live process's request is never
    stale, however long its stream has been silent: a reader that pauses does not get its
    audio refunded; the stream ends when the reader has taken nothing for CLIENT_IDLE_SECONDS.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    last_seen = func.coalesce(SpeechRequest.progress_at, SpeechRequest.created_at)
    process_alive = exists().where(_processes.c.id == SpeechRequest.process_id, _processes.c.lease_until >= now)
    return list(
        db.session.scalars(
            select(SpeechRequest.id)
            .where(SpeechRequest.state == SpeechState.CHARGED, last_seen < cutoff, ~process_alive)
            .order_by(SpeechRequest.created_at, SpeechRequest.id)
        )
    )
