"""The customer dashboard: accounts, keys, balance, usage, top-ups and the docs."""

import csv
import io
import math
import re
from datetime import timedelta
from urllib.parse import urlsplit

import stripe
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import accounts, keys, payments
from app.extensions import db, login_manager
from app.forms import BuyForm, ConfirmForm, KeyForm, LoginForm, PasswordForm, SignupForm
from app.models import ApiKey, LedgerEntry, Payment, SpeechRequest, User

bp = Blueprint("dashboard", __name__)

PER_PAGE = 20
# A spreadsheet reads a cell that starts with one of these as a formula (OWASP: CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


# No field of a form or query may carry NUL or another control character (tab and line breaks
# aside): the database refuses NUL in text, and nobody types the others.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@bp.before_request
def refuse_control_characters():
    for values in (*request.args.listvalues(), *request.form.listvalues()):
        if any(_CONTROL_CHARACTERS.search(value) for value in values):
            abort(400, "A field holds a control character; remove it and try again.")


@login_manager.user_loader
def load_user(token: str) -> User | None:
    return accounts.load_signed_in(token)


def _sign_in(user: User, remember: bool) -> None:
    config = current_app.config
    accounts.sign_in(user, remember, timedelta(hours=config["SIGN_IN_HOURS"]), timedelta(days=config["REMEMBER_DAYS"]))


def safe_next(target: str | None) -> str:
    """Only a path on this site: no scheme, no host, no protocol-relative `//` or `/\\`."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith(("//", "/\\")):
            return target
    return url_for("dashboard.home")


# Accounts


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.home"))
    form = SignupForm()
    if form.validate_on_submit():
        try:
            user = accounts.create_user(form.email.data, form.password.data)
            db.session.commit()
        except accounts.AccountError as error:
            form.email.errors.append(str(error))
        except IntegrityError:
            # Another sign-up with this email committed first.
            db.session.rollback()
            form.email.errors.append("An account with that email already exists.")
        else:
            _sign_in(user, remember=False)
            flash("Welcome to kokoro-pay. Create an API key, then buy credits to start.", "success")
            return redirect(url_for("dashboard.keys_page"))
    return render_template("auth/signup.html", form=form)


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(safe_next(request.args.get("next")))
    form = LoginForm()
    if form.validate_on_submit():
        throttle = current_app.extensions["throttle"]
        email, ip = accounts.normalize_email(form.email.data), request.remote_addr or "unknown"
        wait = throttle.login_blocked(email, ip)
        if wait is not None:
            form.password.errors.append(f"Too many failed sign-ins. Try again in {math.ceil(wait / 60)} minutes.")
            response = Response(render_template("auth/login.html", form=form), status=429)
            response.headers["Retry-After"] = str(wait)
            return response
        user = accounts.authenticate(email, form.password.data)
        if user is not None:
            _sign_in(user, remember=form.remember.data)
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


@bp.route("/account", methods=["GET", "POST"])
@login_required
def account():
    """Change the password (which signs out every other browser), or sign out everywhere."""
    form = PasswordForm()
    if form.validate_on_submit():
        if not accounts.check_password(current_user, form.current.data):
            form.current.errors.append("That is not your current password.")
        else:
            accounts.set_password(current_user, form.password.data)
            ended = accounts.end_other_sign_ins(current_user)
            db.session.commit()
            flash(f"Your password is changed; {ended} other sign-in(s) ended.", "success")
            return redirect(url_for("dashboard.account"))
    return render_template(
        "dashboard/account.html", form=form, everywhere=ConfirmForm(), sign_ins=accounts.sign_ins(current_user)
    )


@bp.post("/account/sign-out-everywhere")
@login_required
def sign_out_everywhere():
    if ConfirmForm().validate_on_submit():
        accounts.end_other_sign_ins(current_user)
        accounts.sign_out(current_user)
        flash("You are signed out everywhere.", "success")
        return redirect(url_for("dashboard.login"))
    return redirect(url_for("dashboard.account"))


# Balance, ledger, usage


@bp.get("/")
@login_required
def home():
    ledger = db.session.scalars(
        select(LedgerEntry).where(LedgerEntry.user_id == current_user.id).order_by(LedgerEntry.id.desc()).limit(10)
    ).all()
    usage = db.session.scalars(_usage_query().limit(10)).all()
    return render_template("dashboard/home.html", ledger=ledger, usage=usage)


@bp.get("/ledger")
@login_required
def ledger_page():
    page = db.paginate(
        select(LedgerEntry).where(LedgerEntry.user_id == current_user.id).order_by(LedgerEntry.id.desc()),
        per_page=PER_PAGE,
        max_per_page=PER_PAGE,
    )
    return render_template("dashboard/ledger.html", page=page)


def _usage_query():
    return (
        select(SpeechRequest)
        .where(SpeechRequest.user_id == current_user.id)
        .order_by(SpeechRequest.created_at.desc(), SpeechRequest.id)
    )


@bp.get("/usage")
@login_required
def usage_page():
    page = db.paginate(_usage_query(), per_page=PER_PAGE, max_per_page=PER_PAGE)
    return render_template("dashboard/usage.html", page=page)


def csv_text(value: str) -> str:
    """Text from a user or an API client, made inert for spreadsheets: a leading `'` before a formula start."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


@bp.get("/usage.csv")
@login_required
def usage_csv():
    query = _usage_query().execution_options(yield_per=500)

    def rows():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(
            [
                "time",
                "request_id",
                "key",
                "model",
                "voice",
                "format",
                "characters",
                "credits",
                "state",
                "bytes",
                "duration_ms",
                "error",
            ]
        )
        for speech in db.session.scalars(query):
            key = speech.api_key.prefix + "…" if speech.api_key else ""
            writer.writerow(
                [
                    speech.created_at.isoformat(),
                    speech.id,
                    key,
                    csv_text(speech.model),
                    csv_text(speech.voice),
                    csv_text(speech.response_format),
                    speech.characters,
                    speech.credits,
                    speech.state,
                    speech.bytes_sent,
                    speech.duration_ms or "",
                    csv_text(speech.error or ""),
                ]
            )
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        yield buffer.getvalue()

    response = Response(stream_with_context(rows()), mimetype="text/csv")
    response.headers["Content-Disposition"] = "attachment; filename=kokoro-pay-usage.csv"
    return response


# Keys


def _own_key(key_id: int) -> ApiKey:
    key = db.session.get(ApiKey, key_id)
    if key is None or key.user_id != current_user.id:
        abort(404)
    return key


@bp.route("/keys", methods=["GET", "POST"])
@login_required
def keys_page():
    form = KeyForm()
    if form.validate_on_submit():
        key, secret = keys.create_key(current_user, form.name.data or "")
        db.session.commit()
        # The secret is in this one response and nowhere else: not in the session, not in the database.
        # Like every signed-in page, it is sent with Cache-Control: no-store (app/__init__.py).
        return render_template("dashboard/key_created.html", key=key, secret=secret)
    user_keys = db.session.scalars(
        select(ApiKey).where(ApiKey.user_id == current_user.id).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    ).all()
    return render_template("dashboard/keys.html", form=form, keys=user_keys)


@bp.get("/keys/created")
@login_required
def key_created():
    flash("A key's secret is shown only once, right after it is created. Create a new key if you lost it.", "info")
    return redirect(url_for("dashboard.keys_page"))


@bp.route("/keys/<int:key_id>/revoke", methods=["GET", "POST"])
@login_required
def revoke_key(key_id: int):
    key = _own_key(key_id)
    form = ConfirmForm()
    if form.validate_on_submit():
        if keys.revoke(key):
            db.session.commit()
            flash(f"Key {key.prefix}… is revoked. Requests with it now get 401.", "success")
        return redirect(url_for("dashboard.keys_page"))
    return render_template("dashboard/revoke.html", key=key, form=form)


# Top-ups


def _packs() -> list[payments.Pack]:
    return current_app.extensions["credit_packs"]


@bp.get("/billing")
@login_required
def billing_page():
    recent = db.session.scalars(
        select(Payment).where(Payment.user_id == current_user.id).order_by(Payment.id.desc()).limit(10)
    ).all()
    return render_template(
        "dashboard/billing.html",
        packs=_packs(),
        form=BuyForm(),
        payments=recent,
        enabled=current_app.extensions["stripe"] is not None,
    )


@bp.post("/billing/checkout")
@login_required
def checkout():
    form = BuyForm()
    pack = next((pack for pack in _packs() if pack.id == form.pack.data), None)
    if not form.validate_on_submit() or pack is None:
        flash("Choose one of the credit packs.", "error")
        return redirect(url_for("dashboard.billing_page"))
    client = current_app.extensions["stripe"]
    if client is None:
        flash("Payments are not configured on this server yet.", "error")
        return redirect(url_for("dashboard.billing_page"))
    try:
        url = payments.start_checkout(
            client,
            current_user,
            pack,
            current_app.config["STRIPE_CURRENCY"],
            success_url=external_url("dashboard.billing_success") + "?session_id={CHECKOUT_SESSION_ID}",
            cancel_url=external_url("dashboard.billing_page"),
        )
        db.session.commit()
    except stripe.StripeError:
        db.session.rollback()
        current_app.logger.exception("could not create a checkout session")
        flash("Stripe could not start the payment. Nothing was charged; please try again.", "error")
        return redirect(url_for("dashboard.billing_page"))
    return redirect(url, 303)


@bp.get("/billing/success")
@login_required
def billing_success():
    payment = db.session.scalar(
        select(Payment).where(
            Payment.checkout_session_id == request.args.get("session_id", ""), Payment.user_id == current_user.id
        )
    )
    if payment is None:
        abort(404)
    return render_template("dashboard/billing_success.html", payment=payment)


# Docs


@bp.get("/docs")
def docs():
    base_url = external_url("api.balance").rsplit("/", 1)[0] if _host_is_checked() else "https://YOUR-SERVER/v1"
    return render_template("dashboard/docs.html", base_url=base_url)


def _host_is_checked() -> bool:
    """True when this server's address comes from a setting, or Flask has checked the Host header."""
    return bool(current_app.config["PUBLIC_BASE_URL"] or current_app.config["TRUSTED_HOSTS"])


def external_url(endpoint: str, **values) -> str:
    """An absolute URL on this server: from PUBLIC_BASE_URL when set, never from an unchecked Host then."""
    base = current_app.config["PUBLIC_BASE_URL"]
    if base:
        return base + url_for(endpoint, **values)
    return url_for(endpoint, _external=True, **values)
