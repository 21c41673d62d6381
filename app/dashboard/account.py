"""The account page: password, email, low-balance alert, sign-ins, deletion."""

from flask import (
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_required, logout_user
from sqlalchemy.exc import IntegrityError

from app import accounts, billing, teams
from app.dashboard import bp, current_team, team_permission
from app.extensions import db
from app.forms import (
    AlertForm,
    ConfirmForm,
    DeleteForm,
    EmailForm,
    PasswordForm,
    SwitchTeamForm,
)
from app.teams import Permission
from app.urls import external_url


def _account_page(**forms):
    """The account page, with the forms a request just checked (and their errors) in place of blank ones."""
    forms = {
        "form": PasswordForm(formdata=None),
        "email_form": EmailForm(formdata=None),
        "alert_form": AlertForm(formdata=None, threshold=billing.alert_threshold(current_team())),
        "delete_form": DeleteForm(formdata=None),
        **forms,
    }
    status = 400 if any(form.errors for form in forms.values()) else 200
    page = render_template(
        "dashboard/account.html",
        everywhere=ConfirmForm(),
        sign_ins=accounts.sign_ins(current_user),
        memberships=teams.memberships(current_user),
        switch=SwitchTeamForm(formdata=None),
        **forms,
    )
    return page, status


bp.add_app_template_global(billing.alert_threshold)


def _current_password_ok(form) -> bool:
    if accounts.check_password(current_user, form.current.data):
        return True
    form.current.errors.append("That is not your current password.")
    return False


@bp.route("/account", methods=["GET", "POST"])
@login_required
def account():
    """Change the password (which signs out every other browser); the other forms post to their own routes."""
    if request.method == "GET":
        return _account_page()
    form = PasswordForm()
    if form.validate_on_submit() and _current_password_ok(form):
        accounts.set_password(current_user, form.password.data)
        ended = accounts.end_other_sign_ins(current_user)
        accounts.notify_of_change(
            current_user,
            "password_changed",
            request.remote_addr,
            forgot_url=external_url("dashboard.forgot_password"),
        )
        db.session.commit()
        flash(f"Your password is changed; {ended} other sign-in(s) ended.", "success")
        return redirect(url_for("dashboard.account"))
    return _account_page(form=form)


@bp.post("/account/email")
@login_required
def request_email_change():
    form = EmailForm()
    if form.validate_on_submit() and _current_password_ok(form):
        try:
            accounts.request_email_change(current_user, form.email.data, request.remote_addr)
        except accounts.AccountError as error:
            form.email.errors.append(str(error))
        else:
            db.session.commit()
            flash(
                f"We sent a link to {accounts.normalize_email(form.email.data)}. Your email changes when you open it.",
                "success",
            )
            return redirect(url_for("dashboard.account"))
    return _account_page(email_form=form)


@bp.route("/email/<token>", methods=["GET", "POST"])
def change_email(token: str):
    """A link from the mail asks first (mail scanners open links); the button makes the change."""
    try:
        change = accounts.read_email_change(token)
    except accounts.TokenError as error:
        flash(str(error), "error")
        return redirect(url_for("dashboard.account" if current_user.is_authenticated else "dashboard.login"))
    form = ConfirmForm()
    if form.validate_on_submit():
        try:
            accounts.change_email(change, request.remote_addr)
            db.session.commit()
        except (accounts.AccountError, IntegrityError) as error:
            db.session.rollback()
            flash(str(error) if isinstance(error, accounts.AccountError) else "That email has an account now.", "error")
        else:
            flash(f"Your email is now {change.new_email}.", "success")
        return redirect(url_for("dashboard.account" if current_user.is_authenticated else "dashboard.login"))
    return render_template("auth/change_email.html", form=form, new_email=change.new_email)


@bp.post("/account/alert")
@login_required
@team_permission(Permission.BILLING)
def set_alert():
    form = AlertForm()
    if form.validate_on_submit():
        current_team().low_balance_credits = form.threshold.data
        # A new threshold arms the alert again: the next debit that crosses it sends one mail.
        current_team().low_balance_sent_at = None
        db.session.commit()
        team = current_team()
        whom = "you" if team.personal else f"{team.name}'s owners, admins and billing members"
        whose = "your" if team.personal else f"{team.name}'s"
        message = (
            f"We will email {whom} when {whose} balance falls below {form.threshold.data:,} credits."
            if form.threshold.data
            else "Low-balance emails are off."
        )
        flash(message, "success")
        return redirect(url_for("dashboard.account"))
    return _account_page(alert_form=form)


@bp.post("/account/delete")
@login_required
def delete_account():
    form = DeleteForm()
    if form.validate_on_submit() and _current_password_ok(form):
        try:
            accounts.delete_account(current_user)
        except teams.TeamError as error:
            db.session.rollback()
            form.current.errors.append(str(error))
            return _account_page(delete_form=form)
        db.session.commit()
        logout_user()
        session.clear()
        flash("Your account is deleted: your keys are revoked and your personal data erased.", "success")
        return redirect(url_for("dashboard.login"))
    return _account_page(delete_form=form)


@bp.post("/account/sign-out-everywhere")
@login_required
def sign_out_everywhere():
    if ConfirmForm().validate_on_submit():
        accounts.end_other_sign_ins(current_user)
        accounts.sign_out(current_user)
        flash("You are signed out everywhere.", "success")
        return redirect(url_for("dashboard.login"))
    return redirect(url_for("dashboard.account"))
