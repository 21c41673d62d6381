"""What was spent and when: the ledger and usage pages, their filters and CSV downloads."""

import csv
import dataclasses
import io
from typing import NamedTuple

from flask import (
    Response,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask_login import current_user, login_required

from app import teams, usage
from app.dashboard import PER_PAGE, bp, can, current_team, team_permission
from app.extensions import db
from app.models import LedgerEntry
from app.teams import Permission


def _usage_filters() -> usage.Filters:
    """The filters asked for; a member who may not see everyone's usage sees their own requests only."""
    filters = usage.Filters.from_args(request.args)
    if not can(Permission.SEE_USAGE):
        filters = dataclasses.replace(filters, member=str(current_user.id))
    return filters


@bp.get("/ledger")
@login_required
@team_permission(Permission.BILLING)
def ledger_page():
    filters = usage.Filters.from_args(request.args)
    page = db.paginate(filters.ledger(current_team().id), page=usage.page_number(request.args), per_page=PER_PAGE)
    return render_template("dashboard/ledger.html", page=page, filters=filters)


@bp.get("/usage")
@login_required
def usage_page():
    filters = _usage_filters()
    page = db.paginate(filters.usage(current_team().id), page=usage.page_number(request.args), per_page=PER_PAGE)
    series = usage.credits_per_day(current_team().id, filters)
    bars, top = usage.bars(series)
    return render_template(
        "dashboard/usage.html",
        page=page,
        filters=filters,
        keys=usage.team_keys(current_team().id, None if can(Permission.SEE_USAGE) else current_user.id),
        members=teams.members(current_team().id) if can(Permission.SEE_USAGE) else [],
        bars=bars,
        top=top,
        total=sum(credits for _, credits in series),
        month=usage.this_month(current_team().id, filters),
    )


# A spreadsheet reads a cell that starts with one of these as a formula (OWASP: CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """Text from a user or an API client, made inert for spreadsheets: a leading `'` before a formula start."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def _csv_download(name: str, header: list[str], rows) -> Response:
    """A CSV file streamed as it is written, one database batch at a time; `rows()` runs while streaming."""

    def lines():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        for row in rows():
            writer.writerow(row)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        yield buffer.getvalue()

    response = Response(stream_with_context(lines()), mimetype="text/csv")
    response.headers["Content-Disposition"] = f"attachment; filename={name}"
    return response


@bp.get("/usage.csv")
@login_required
def usage_csv():
    query = _usage_filters().usage(current_team().id).execution_options(yield_per=500)
    header = [
        "time",
        "request_id",
        "member",
        "key",
        "model",
        "voice",
        "format",
        "characters",
        "credits",
        "credits_refunded",
        "state",
        "bytes",
        "duration_ms",
        "error",
        "client_request_id",
    ]
    rows = lambda: (  # noqa: E731
        [
            speech.created_at.isoformat(),
            speech.id,
            csv_text(usage.member_name(speech.made_by)),
            usage.key_name(speech),
            csv_text(speech.model),
            csv_text(speech.voice),
            csv_text(speech.response_format),
            speech.characters,
            speech.credits,
            speech.credits_refunded,
            speech.state,
            speech.bytes_sent,
            "" if speech.duration_ms is None else speech.duration_ms,
            csv_text(speech.error or ""),
            speech.client_request_id or "",
        ]
        for speech in db.session.scalars(query)
    )
    return _csv_download("kokoro-pay-usage.csv", header, rows)


@bp.get("/ledger.csv")
@login_required
@team_permission(Permission.BILLING)
def ledger_csv():
    query = usage.Filters.from_args(request.args).ledger(current_team().id).execution_options(yield_per=500)
    header = ["time", "kind", "credits", "balance_after", "member", "key", "reference", "note"]
    rows = lambda: (  # noqa: E731
        [
            entry.created_at.isoformat(),
            entry.kind,
            entry.amount,
            entry.balance_after,
            *(csv_text(value) for value in usage.ledger_by(entry)),
            csv_text(entry.reference),
            csv_text(entry.note or ""),
        ]
        for entry in db.session.scalars(query)
    )
    return _csv_download("kokoro-pay-ledger.csv", header, rows)


class Link(NamedTuple):
    url: str
    label: str


def ledger_link(entry: LedgerEntry) -> Link | None:
    """Where a ledger entry's cause is shown: its request on the usage page, or its payment on the billing page."""
    if entry.speech_request_id:
        return Link(url_for("dashboard.usage_page", request=entry.speech_request_id), "request")
    if entry.payment:
        anchor = "payment-" + entry.payment.checkout_session_id
        return Link(url_for("dashboard.billing_page", _anchor=anchor), "payment")
    return None


bp.add_app_template_global(ledger_link)
bp.add_app_template_global(usage.ledger_by)
bp.add_app_template_global(usage.member_name)
