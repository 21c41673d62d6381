"""What a customer's usage and ledger pages show: filters, credits per day, this month's totals."""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Select, func, select
from sqlalchemy.orm import joinedload

from app.extensions import db
from app.models import ApiKey, LedgerEntry, Payment, SpeechRequest, User, utcnow

CHART_DAYS = 30
# The largest id an INTEGER column holds on PostgreSQL (SQLite's hold more).
MAX_ID = 2**31 - 1
# Pages beyond this are not asked for: their offset would outgrow the database's integers.
MAX_PAGE = 1_000_000
# What a speech request cost in the end: its charge less what was refunded.
KEPT = SpeechRequest.credits - SpeechRequest.credits_refunded
# The usage filter's value for requests made in the dashboard's playground (no API key).
PLAYGROUND = "playground"


# The rule for every query parameter of the dashboard's and the admin console's pages: a value
# that cannot be read as what it stands for (not a date, not an id or a page number the
# database can hold, '²' for a digit, a day with no day after it) is ignored, as if it were
# absent, and the page shows what it did apply; only the first of a repeated parameter counts.
# A control character anywhere is refused with 400 before any view runs (app/dashboard/__init__.py).
# A page number that is readable but past the last page is 404, as db.paginate answers it.


def whole_number(raw: str | None, largest: int) -> int | None:
    """`raw` as a number from 1 to `largest`, written in ASCII digits; else None."""
    raw = (raw or "").strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > len(str(largest)):
        return None
    number = int(raw)
    return number if 1 <= number <= largest else None


def page_number(args) -> int:
    """The `page` asked for, or the first page when it is not one (db.paginate reads no other argument)."""
    return whole_number(args.get("page"), MAX_PAGE) or 1


@dataclass(frozen=True)
class Filters:
    """From the query string: `key` (an id of the team's keys, or "playground"), `member` (a person's id),
    `from`/`to` (dates), `request`."""

    key: str = ""
    start: date | None = None
    end: date | None = None
    request_id: str = ""
    member: str = ""

    @classmethod
    def from_args(cls, args) -> "Filters":
        key = args.get("key", "").strip()
        return cls(
            key=key if key == PLAYGROUND or whole_number(key, MAX_ID) else "",
            start=_date(args.get("from")),
            # The last day has no day after it to end the range at: no end, as when absent.
            end=_date(args.get("to"), latest=date.max - timedelta(days=1)),
            request_id=args.get("request", "").strip()[:40],
            member=str(whole_number(args.get("member"), MAX_ID) or ""),
        )

    def args(self) -> dict:
        """The query string that repeats these filters (for pages and the CSV download)."""
        values = {
            "key": self.key,
            "member": self.member,
            "from": self.start,
            "to": self.end,
            "request": self.request_id,
        }
        return {name: str(value) for name, value in values.items() if value}

    def dated(self, query: Select, column) -> Select:
        if self.start:
            query = query.where(column >= midnight(self.start))
        if self.end:
            query = query.where(column < midnight(self.end + timedelta(days=1)))
        return query

    def usage(self, team_id: int) -> Select:
        # Who made each request and with which key, loaded with it (one query, CSV batches too).
        query = (
            select(SpeechRequest)
            .where(SpeechRequest.team_id == team_id)
            .options(joinedload(SpeechRequest.made_by), joinedload(SpeechRequest.api_key))
        )
        query = self.dated(self.keyed(query), SpeechRequest.created_at)
        if self.request_id:
            query = query.where(SpeechRequest.id == self.request_id)
        return query.order_by(SpeechRequest.created_at.desc(), SpeechRequest.id)

    def keyed(self, query: Select) -> Select:
        """Narrowed to the key and the member asked for (the chart's and totals' queries too)."""
        if self.member:
            query = query.where(SpeechRequest.made_by_id == int(self.member))
        if self.key == PLAYGROUND:
            return query.where(SpeechRequest.api_key_id.is_(None))
        if self.key:
            return query.where(SpeechRequest.api_key_id == int(self.key))
        return query

    def ledger(self, team_id: int) -> Select:
        cause = joinedload(LedgerEntry.speech_request)
        query = (
            select(LedgerEntry)
            .where(LedgerEntry.team_id == team_id)
            .options(
                cause.joinedload(SpeechRequest.made_by),
                cause.joinedload(SpeechRequest.api_key),
                joinedload(LedgerEntry.payment).joinedload(Payment.bought_by),
            )
        )
        return self.dated(query, LedgerEntry.created_at).order_by(LedgerEntry.id.desc())


def _date(raw: str | None, latest: date = date.max) -> date | None:
    try:
        day = date.fromisoformat(raw) if raw else None
    except ValueError:
        return None
    return day if day is None or day <= latest else None


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=timezone.utc)


def day_of(column):
    """The UTC calendar day of a timestamp, as the database computes it."""
    if db.session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


def parse_day(value) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


def credits_per_day(team_id: int, filters: Filters, days: int = CHART_DAYS) -> list[tuple[date, int]]:
    """Credits kept (charged less refunded) per UTC day for the last `days` days, today included; zeros too."""
    today = utcnow().date()
    first = today - timedelta(days=days - 1)
    day = day_of(SpeechRequest.created_at)
    kept = func.sum(KEPT)
    query = filters.keyed(
        select(day, kept)
        .where(SpeechRequest.team_id == team_id, SpeechRequest.created_at >= midnight(first))
        .group_by(day)
    )
    totals = {parse_day(row[0]): int(row[1] or 0) for row in db.session.execute(query)}
    return [(first + timedelta(days=n), totals.get(first + timedelta(days=n), 0)) for n in range(days)]


@dataclass(frozen=True)
class Totals:
    requests: int
    characters: int
    credits: int


def this_month(team_id: int, filters: Filters) -> Totals:
    start = utcnow().date().replace(day=1)
    row = db.session.execute(
        filters.keyed(
            select(
                func.count(SpeechRequest.id),
                func.coalesce(func.sum(SpeechRequest.characters), 0),
                func.coalesce(func.sum(KEPT), 0),
            ).where(SpeechRequest.team_id == team_id, SpeechRequest.created_at >= midnight(start))
        )
    ).one()
    return Totals(*(int(value) for value in row))


def team_keys(team_id: int, made_by_id: int | None = None) -> list[ApiKey]:
    """The team's keys (only those `made_by_id` made, when given), oldest first."""
    query = select(ApiKey).where(ApiKey.team_id == team_id).order_by(ApiKey.id)
    if made_by_id is not None:
        query = query.where(ApiKey.created_by_id == made_by_id)
    return db.session.scalars(query).all()


def member_name(user: User | None) -> str:
    """How the pages and CSVs name a member: their email, or that the account was deleted."""
    if user is None:
        return ""
    return "deleted account" if user.deleted_at is not None else user.email


def key_name(speech: SpeechRequest) -> str:
    """The key a request came with, by its prefix, or the playground."""
    return speech.api_key.prefix + "…" if speech.api_key else PLAYGROUND


def ledger_by(entry: LedgerEntry) -> tuple[str, str]:
    """Who caused a ledger entry, and with which key: a request's member and key, a payment's buyer."""
    if entry.speech_request is not None:
        return member_name(entry.speech_request.made_by), key_name(entry.speech_request)
    if entry.payment is not None:
        return member_name(entry.payment.bought_by), ""
    return "", ""


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: date
    credits: int


def bars(series: list[tuple[date, int]], width: int = 600, height: int = 160) -> tuple[list[Bar], int]:
    """Bar geometry for the server-drawn SVG chart, and the highest day's credits (the scale)."""
    top = max((credits for _, credits in series), default=0)
    slot = width / max(len(series), 1)
    shapes = []
    for index, (day, credits) in enumerate(series):
        bar_height = 0 if not top else max(1.0, height * credits / top) if credits else 0
        shapes.append(Bar(index * slot + 1, height - bar_height, slot - 2, bar_height, day, credits))
    return shapes, top
