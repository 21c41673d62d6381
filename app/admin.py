"""The admin console (/admin), for accounts marked admin (`flask users admin EMAIL`).

Find a person (their teams, their roles, disable the account) or a team (everything about
its money on one page: members, keys and who made them, ledger, payments and requests with
the member and key of each); grant or deduct a team's credits with a reason (ledgered,
naming the admin), set or clear unlimited, disable a team, revoke keys; lists of payments
and of requests still charged (settled by the same code as `flask speech settle`); the
audit's checks; totals per day. Every
action is a CSRF-protected form and writes an `AdminAction` row in its own transaction;
the console only ever adds to that log. Anyone else gets 404: the console is not
advertised.
"""

from datetime import timedelta

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import case, func, or_, select
from wtforms import IntegerField, RadioField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, NumberRange

from app import accounts, billing, config, keys, liveness, metering, teams, usage
from app.audit import audit
from app.dashboard import refuse_control_characters
from app.extensions import db
from app.forms import ConfirmForm
from app.models import (
    AdminAction,
    ApiKey,
    LedgerEntry,
    LedgerKind,
    Membership,
    Payment,
    SpeechRequest,
    SpeechState,
    Team,
    User,
    utcnow,
)

bp = Blueprint("admin", __name__, url_prefix="/admin")

PER_PAGE = 50
TOTAL_DAYS = 14


class CreditForm(FlaskForm):
    direction = RadioField(
        "Change", choices=[SelectChoice("grant", "Grant"), SelectChoice("deduct", "Deduct")], default="grant"
    )
    amount = IntegerField("Credits", validators=[NumberRange(min=1, max=10**12, message="A whole number above 0.")])
    reason = StringField("Reason (kept in the ledger)", validators=[DataRequired(), Length(max=200)])


@bp.before_request
def admins_only():
    if not current_user.is_authenticated or not current_user.is_admin:
        abort(404)


# Query parameters follow the dashboard's rule (app/usage.py): unreadable values are ignored,
# control characters refused with 400, which also keeps NUL out of the reasons in the ledger.
bp.before_request(refuse_control_characters)


def record(action: str, user: User | None = None, details: str = "", team: Team | None = None) -> None:
    """Add the admin action to the caller's transaction, so it lands with the change or not at all."""
    db.session.add(
        AdminAction(
            admin_id=current_user.id,
            action=action,
            user_id=user.id if user else None,
            team_id=team.id if team else None,
            details=details[:500],
        )
    )


@bp.get("")
def overview():
    return render_template("admin/overview.html", days=daily_totals(TOTAL_DAYS), charged=_charged_count())


def _charged_count() -> int:
    return db.session.scalar(select(func.count()).where(SpeechRequest.state == SpeechState.CHARGED))


def daily_totals(days: int) -> list[dict]:
    """Per UTC day, newest first: credits sold, revenue by currency, credits spent, requests, failures."""
    first = utcnow().date() - timedelta(days=days - 1)
    since = usage.midnight(first)
    rows = {
        first + timedelta(days=n): {"sold": 0, "revenue": {}, "spent": 0, "requests": 0, "failures": 0}
        for n in range(days)
    }

    def add(query, fill):
        for row in db.session.execute(query):
            day = usage.parse_day(row[0])
            if day in rows:
                fill(rows[day], *row[1:])

    day = usage.day_of(LedgerEntry.created_at)
    add(
        select(day, func.sum(LedgerEntry.amount))
        .where(LedgerEntry.kind == LedgerKind.TOPUP, LedgerEntry.created_at >= since)
        .group_by(day),
        lambda row, sold: row.update(sold=int(sold or 0)),
    )
    day = usage.day_of(Payment.paid_at)
    add(
        select(day, Payment.currency, func.sum(Payment.amount_cents))
        .where(Payment.paid_at >= since)
        .group_by(day, Payment.currency),
        lambda row, currency, cents: row["revenue"].update({currency: int(cents or 0)}),
    )
    day = usage.day_of(SpeechRequest.created_at)
    failed = func.sum(case((SpeechRequest.state == SpeechState.REFUNDED, 1), else_=0))
    add(
        select(
            day,
            func.sum(usage.KEPT),
            func.count(SpeechRequest.id),
            failed,
        )
        .where(SpeechRequest.created_at >= since)
        .group_by(day),
        lambda row, spent, requests, failures: row.update(
            spent=int(spent or 0), requests=int(requests or 0), failures=int(failures or 0)
        ),
    )
    return [{"day": day, **values} for day, values in sorted(rows.items(), reverse=True)]


@bp.get("/users")
def users():
    query = request.args.get("q", "").strip()[:254]
    found = []
    if query:
        found = db.session.scalars(
            select(User)
            .where(
                or_(
                    User.email.contains(accounts.normalize_email(query), autoescape=True),
                    User.id == (usage.whole_number(query, usage.MAX_ID) or -1),
                )
            )
            .order_by(User.id)
            .limit(PER_PAGE)
        ).all()
    personal = {user.id: teams.personal(user) for user in found}
    return render_template("admin/users.html", query=query, users=found, personal=personal)


@bp.get("/users/<int:user_id>")
def customer(user_id: int):
    """A person: their account's state, the teams they are in (with their role), what admins did to them."""
    user = db.get_or_404(User, user_id)
    return render_template(
        "admin/customer.html",
        user=user,
        memberships=sorted(user.memberships, key=lambda membership: (not membership.team.personal, membership.team_id)),
        confirm=ConfirmForm(),
        actions=db.session.scalars(
            select(AdminAction).where(AdminAction.user_id == user.id).order_by(AdminAction.id.desc()).limit(20)
        ).all(),
    )


@bp.get("/teams")
def teams_page():
    """Teams by name (or part of it), id, or a member's email."""
    query = request.args.get("q", "").strip()[:254]
    found = []
    if query:
        found = db.session.scalars(
            select(Team)
            .where(
                or_(
                    Team.name.icontains(query, autoescape=True),
                    Team.id == (usage.whole_number(query, usage.MAX_ID) or -1),
                    Team.id.in_(
                        select(Membership.team_id)
                        .join(User)
                        .where(User.email.contains(accounts.normalize_email(query), autoescape=True))
                    ),
                )
            )
            .order_by(Team.id)
            .limit(PER_PAGE)
        ).all()
    return render_template("admin/teams.html", query=query, teams=found)


@bp.get("/teams/<int:team_id>")
def team(team_id: int):
    """A team's money on one page, each row with the member and key behind it."""
    team = db.get_or_404(Team, team_id)
    return render_template(
        "admin/team.html",
        team=team,
        members=teams.members(team.id),
        credit_form=CreditForm(formdata=None),
        confirm=ConfirmForm(),
        ledger=db.session.scalars(usage.Filters().ledger(team.id).limit(20)).all(),
        keys=db.session.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.id)).all(),
        payments=db.session.scalars(
            select(Payment).where(Payment.team_id == team.id).order_by(Payment.id.desc()).limit(20)
        ).all(),
        requests=db.session.scalars(usage.Filters().usage(team.id).limit(20)).all(),
        actions=db.session.scalars(
            select(AdminAction).where(AdminAction.team_id == team.id).order_by(AdminAction.id.desc()).limit(20)
        ).all(),
    )


@bp.post("/teams/<int:team_id>/credits")
def change_credits(team_id: int):
    team = db.get_or_404(Team, team_id)
    form = CreditForm()
    if not form.validate_on_submit():
        for errors in form.errors.values():
            flash(errors[0], "error")
        return redirect(url_for("admin.team", team_id=team.id))
    note = f"{form.reason.data} (by admin {current_user.email})"
    try:
        if form.direction.data == "deduct":
            balance = billing.deduct(team, form.amount.data, note)
        else:
            balance = billing.grant(team, form.amount.data, note)
    except billing.InsufficientCredits as short:
        db.session.rollback()
        flash(f"The balance is {short.balance:,}: {form.amount.data:,} cannot be deducted. Nothing changed.", "error")
        return redirect(url_for("admin.team", team_id=team.id))
    record(form.direction.data, details=f"{form.amount.data} credits: {form.reason.data}", team=team)
    db.session.commit()
    flash(f"{form.direction.data.capitalize()}ed {form.amount.data:,} credits; the balance is {balance:,}.", "success")
    return redirect(url_for("admin.team", team_id=team.id))


@bp.post("/teams/<int:team_id>/unlimited")
def toggle_unlimited(team_id: int):
    team = db.get_or_404(Team, team_id)
    if ConfirmForm().validate_on_submit():
        team.unlimited = not team.unlimited
        record("unlimited on" if team.unlimited else "unlimited off", team=team)
        db.session.commit()
        flash(f"Team {team.id} ({team.name}) is {'now' if team.unlimited else 'no longer'} unlimited.", "success")
    return redirect(url_for("admin.team", team_id=team.id))


@bp.post("/teams/<int:team_id>/disabled")
def toggle_team_disabled(team_id: int):
    """Disable a team (every key of it gets 401, the playground refuses) or enable it again."""
    team = db.get_or_404(Team, team_id)
    if ConfirmForm().validate_on_submit():
        team.disabled_at = None if team.disabled_at else utcnow()
        record("disable team" if team.disabled_at else "enable team", team=team)
        db.session.commit()
        state = "disabled: its keys get 401" if team.disabled_at else "enabled again"
        flash(f"Team {team.id} ({team.name}) is {state}.", "success")
    return redirect(url_for("admin.team", team_id=team.id))


@bp.post("/users/<int:user_id>/disabled")
def toggle_disabled(user_id: int):
    user = db.get_or_404(User, user_id)
    if user.id == current_user.id:
        flash("You cannot disable your own account here.", "error")
    elif ConfirmForm().validate_on_submit():
        disable = user.disabled_at is None
        accounts.set_disabled(user, disable)
        record("disable" if disable else "enable", user)
        db.session.commit()
        flash(f"{user.email} is {'disabled: its keys get 401' if disable else 'enabled again'}.", "success")
    return redirect(url_for("admin.customer", user_id=user.id))


@bp.post("/keys/<int:key_id>/revoke")
def revoke_key(key_id: int):
    key = db.get_or_404(ApiKey, key_id)
    if ConfirmForm().validate_on_submit() and keys.revoke(key):
        record("revoke key", key.created_by, f"key {key.id} ({key.prefix}…)", team=key.team)
        db.session.commit()
        flash(f"Key {key.prefix}… is revoked.", "success")
    return redirect(url_for("admin.team", team_id=key.team_id))


@bp.get("/payments")
def payments():
    page = db.paginate(
        select(Payment).order_by(Payment.id.desc()), page=usage.page_number(request.args), per_page=PER_PAGE
    )
    return render_template("admin/payments.html", page=page)


@bp.get("/charged")
def charged():
    requests = db.session.scalars(
        select(SpeechRequest)
        .where(SpeechRequest.state == SpeechState.CHARGED)
        .order_by(SpeechRequest.created_at)
        .limit(PER_PAGE)
    ).all()
    return render_template(
        "admin/charged.html",
        requests=requests,
        alive=liveness.alive_processes([speech.process_id for speech in requests]),
        confirm=ConfirmForm(),
        older_than=config.current().stale_charge_seconds,
        now=utcnow(),
    )


@bp.post("/charged/settle")
def settle():
    if ConfirmForm().validate_on_submit():
        age = config.current().stale_charge_seconds
        done = metering.settle_stale(age)
        record("settle", details=f"{done.found} stale, {done.settled} settled, {done.credits} credits refunded")
        db.session.commit()
        flash(
            f"{done.found} requests of gone processes without progress for over {age} s; settled {done.settled}, "
            f"refunding {done.credits:,} credits.",
            "success",
        )
    return redirect(url_for("admin.charged"))


@bp.get("/audit")
def audit_page():
    return render_template("admin/audit.html", report=audit())


@bp.get("/log")
def log():
    page = db.paginate(
        select(AdminAction).order_by(AdminAction.id.desc()), page=usage.page_number(request.args), per_page=PER_PAGE
    )
    return render_template("admin/log.html", page=page)
