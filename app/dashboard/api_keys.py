"""API keys: created (the secret shown once), listed, given controls, rolled and revoked; a developer sees
and changes only their own keys; management keys are made by those who manage every key."""

from datetime import timedelta, timezone

from flask import (
    abort,
    flash,
    redirect,
    render_template,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import select

from app import keys
from app.dashboard import bp, can, current_team, team_permission, verified_required
from app.extensions import db
from app.forms import (
    ConfirmForm,
    KeyControlsForm,
    KeyForm,
    RollForm,
)
from app.models import ApiKey, KeyKind
from app.teams import Permission


def visible_keys(*columns):
    """A query of the current team's keys the member may see (or `columns` of them): all with
    MANAGE_KEYS, else the ones they made."""
    query = select(*(columns or (ApiKey,))).where(ApiKey.team_id == current_team().id)
    if not can(Permission.MANAGE_KEYS):
        query = query.where(ApiKey.created_by_id == current_user.id)
    return query


def _own_key(key_id: int) -> ApiKey:
    key = db.session.scalar(visible_keys().where(ApiKey.id == key_id))
    if key is None:
        abort(404)
    return key


@bp.route("/keys", methods=["GET", "POST"])
@login_required
@team_permission(Permission.SPEND)
@verified_required
def keys_page():
    form = KeyForm()
    if form.validate_on_submit():
        if form.kind.data == KeyKind.MANAGEMENT and not can(Permission.MANAGE_KEYS):
            abort(403)
        key, secret = keys.create_key(current_team(), current_user, form.name.data or "", kind=form.kind.data)
        db.session.commit()
        # The secret is in this one response and nowhere else: not in the session, not in the database.
        # Like every signed-in page, it is sent with Cache-Control: no-store (app/__init__.py).
        return render_template("dashboard/key_created.html", key=key, secret=secret)
    user_keys = db.session.scalars(visible_keys().order_by(ApiKey.created_at.desc(), ApiKey.id.desc())).all()
    return render_template("dashboard/keys.html", form=form, keys=user_keys)


@bp.get("/keys/created")
@login_required
def key_created():
    flash("A key's secret is shown only once, right after it is created. Create a new key if you lost it.", "info")
    return redirect(url_for("dashboard.keys_page"))


@bp.route("/keys/<int:key_id>", methods=["GET", "POST"])
@login_required
@team_permission(Permission.SPEND)
@verified_required
def key_page(key_id: int):
    """A key's controls: its name, spending limit, expiry and what it may be used from and for."""
    key = _own_key(key_id)
    form = KeyControlsForm(obj=key)
    if key.kind != KeyKind.SPEECH:
        # A management key cannot speak: only its expiry and addresses apply to it.
        for name in SPEECH_ONLY:
            delattr(form, name)
    if not form.is_submitted() and key.expires_at is not None:
        form.expires_at.data = key.expires_at.astimezone(timezone.utc).replace(tzinfo=None)
    if not key.revoked and form.validate_on_submit():
        changes = {"allowed_ips": form.allowed_ips.data}
        changes.update({name: form[name].data for name in SPEECH_ONLY if name in form})
        expires_at = form.expires_at.data and form.expires_at.data.replace(tzinfo=timezone.utc)
        # The form shows the expiry to the minute: sent back as shown, it is left as it is (even if past).
        if not _same_minute(key.expires_at, expires_at):
            changes["expires_at"] = expires_at
        try:
            controls = keys.changed_controls(key, changes)
        except keys.BadControl as bad:
            getattr(form, bad.field).errors.append(str(bad))
        else:
            key.name = " ".join((form.name.data or "").split())[:100]
            keys.set_controls(key, controls)
            db.session.commit()
            flash(f"Key {key.prefix}… is saved. Its controls apply to its next request.", "success")
            return redirect(url_for("dashboard.key_page", key_id=key.id))
    return render_template("dashboard/key.html", key=key, form=form, roll=RollForm(), now_use=keys.use_now(key))


# The controls that only speech keys have.
SPEECH_ONLY = ("spend_limit", "spend_period", "allowed_voices", "allowed_models")


def _same_minute(stored, shown) -> bool:
    if stored is None or shown is None:
        return stored is shown
    return stored.replace(second=0, microsecond=0) == shown.replace(second=0, microsecond=0)


@bp.route("/keys/<int:key_id>/roll", methods=["GET", "POST"])
@login_required
@team_permission(Permission.SPEND)
@verified_required
def roll_key(key_id: int):
    """A new secret for the key, shown once; the current one keeps working for the grace period chosen."""
    key = _own_key(key_id)
    form = RollForm()
    if key.revoked:
        flash("A revoked key cannot be rolled.", "error")
        return redirect(url_for("dashboard.key_page", key_id=key.id))
    if form.validate_on_submit():
        try:
            secret = keys.roll(key, timedelta(seconds=int(form.grace.data)))
        except keys.KeyChanged:
            db.session.rollback()
            flash(
                "The key was rolled meanwhile, from elsewhere; nothing was changed. Roll it again if you need to.",
                "error",
            )
            return redirect(url_for("dashboard.key_page", key_id=key.id))
        db.session.commit()
        return render_template("dashboard/key_created.html", key=key, secret=secret, rolled=True)
    return redirect(url_for("dashboard.key_page", key_id=key.id))


@bp.route("/keys/<int:key_id>/revoke", methods=["GET", "POST"])
@login_required
@team_permission(Permission.SPEND)
def revoke_key(key_id: int):
    key = _own_key(key_id)
    form = ConfirmForm()
    if form.validate_on_submit():
        if keys.revoke(key):
            db.session.commit()
            flash(f"Key {key.prefix}… is revoked. Requests with it now get 401.", "success")
        return redirect(url_for("dashboard.keys_page"))
    return render_template("dashboard/revoke.html", key=key, form=form)


def period_label(key: ApiKey) -> str:
    """What the key's use figure counts, for people: "Spent today", "… all time"."""
    return {
        "day": "Spent today",
        "week": "Spent this week",
        "month": "Spent this month",
    }.get(key.spend_period, "Spent in all")


bp.add_app_template_global(period_label)
bp.add_app_template_global(keys.use_now, "key_use")
bp.add_app_template_global(keys.limit_resets_at)
