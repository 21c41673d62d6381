"""API keys: created (the secret shown once), listed, revoked; a developer sees and revokes only their own."""

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
    KeyForm,
)
from app.models import ApiKey
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
        key, secret = keys.create_key(current_team(), current_user, form.name.data or "")
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
