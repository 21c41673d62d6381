"""Signing up, confirming the email, signing in and out, and resetting a password."""

import math

from flask import (
    Response,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required, logout_user
from sqlalchemy.exc import IntegrityError

from app import accounts, services
from app.dashboard import bp, safe_next, sign_in
from app.dashboard.dev_outbox import dev_outbox_open
from app.extensions import db
from app.forms import (
    ConfirmForm,
    ForgotForm,
    LoginForm,
    ResetForm,
    SignupForm,
)

# Accounts


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    """The answer is "check your inbox" whether or not the email has an account: it says nothing about who does."""
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.home"))
    form = SignupForm()
    if form.validate_on_submit():
        try:
            accounts.register(form.email.data, form.password.data, request.remote_addr)
            db.session.commit()
        except accounts.AccountError as error:
            form.email.errors.append(str(error))
        except IntegrityError:
            # Another sign-up with this email committed first: its owner has their mail.
            db.session.rollback()
        if not form.email.errors:
            return _check_inbox(accounts.normalize_email(form.email.data))
    # A form that was sent and refused (not one plain address, say) is a 400: nothing was done.
    return render_template("auth/signup.html", form=form), 400 if form.errors else 200


def _check_inbox(email: str):
    return render_template("auth/check_inbox.html", email=email, outbox=dev_outbox_open())


@bp.get("/verify/<token>")
def verify_email(token: str):
    try:
        granted = accounts.verify_email(token)
        db.session.commit()
    except accounts.TokenError as error:
        flash(str(error), "error")
    except IntegrityError:
        # The same link opened twice at once: the other request verified it and granted the trial.
        db.session.rollback()
        flash("Your email is confirmed.", "success")
    else:
        # Only credits that were granted: a mailbox that had its trial already gets none.
        trial = f" {granted:,} free credits are on your balance to try it." if granted else ""
        flash("Your email is confirmed: you can create API keys and buy credits." + trial, "success")
    return redirect(url_for("dashboard.keys_page" if current_user.is_authenticated else "dashboard.login"))


@bp.post("/verify/resend")
@login_required
def resend_verification():
    if ConfirmForm().validate_on_submit() and not current_user.verified:
        if accounts.send_verification(current_user, request.remote_addr):
            db.session.commit()
            flash(f"We sent a new link to {current_user.email}.", "success")
        else:
            flash("A link was sent a moment ago; give it a minute to arrive.", "info")
    return redirect(url_for("dashboard.home"))


@bp.route("/forgot", methods=["GET", "POST"])
def forgot_password():
    form = ForgotForm()
    if form.validate_on_submit():
        accounts.request_password_reset(form.email.data, request.remote_addr)
        db.session.commit()
        return _check_inbox(accounts.normalize_email(form.email.data))
    return render_template("auth/forgot.html", form=form)


@bp.route("/reset/<token>", methods=["GET", "POST"])
def reset_password(token: str):
    try:
        user = accounts.user_for_reset(token)
    except accounts.TokenError as error:
        flash(str(error), "error")
        return redirect(url_for("dashboard.forgot_password"))
    form = ResetForm()
    if form.validate_on_submit():
        accounts.reset_password(user, form.password.data, request.remote_addr)
        db.session.commit()
        if current_user.is_authenticated:
            logout_user()
        flash("Your password is set and every sign-in was ended. Sign in with the new password.", "success")
        return redirect(url_for("dashboard.login"))
    return render_template("auth/reset.html", form=form, email=user.email)


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(safe_next(request.args.get("next")))
    form = LoginForm()
    if form.validate_on_submit():
        throttle = services.throttle()
        email, ip = accounts.normalize_email(form.email.data), request.remote_addr or "unknown"
        wait = throttle.login_blocked(email, ip)
        if wait is not None:
            form.password.errors.append(f"Too many failed sign-ins. Try again in {math.ceil(wait / 60)} minutes.")
            response = Response(render_template("auth/login.html", form=form), status=429)
            response.headers["Retry-After"] = str(wait)
            return response
        user = accounts.authenticate(email, form.password.data)
        if user is not None and user.disabled_at is not None:
            form.password.errors.append("This account is disabled. Contact the operator of this service.")
            return render_template("auth/login.html", form=form), 403
        if user is not None:
            sign_in(user, remember=form.remember.data)
            return redirect(safe_next(request.args.get("next")))
        throttle.login_failed(email, ip)
        form.password.errors.append("Wrong email or password.")
    return render_template("auth/login.html", form=form)


@bp.post("/logout")
def logout():
    if ConfirmForm().validate_on_submit() and current_user.is_authenticated:
        accounts.sign_out(current_user)
        flash("You are signed out.", "success")
    return redirect(url_for("dashboard.login"))
