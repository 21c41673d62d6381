"""The customer dashboard: accounts, keys, balance, usage, top-ups and the docs."""

import csv
import io
import ipaddress
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
    session,
    stream_with_context,
    url_for,
)
from flask_login import current_user, login_required, logout_user
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import accounts, billing, catalog, keys, mail, payments, usage
from app.extensions import db, login_manager
from app.forms import (
    AlertForm,
    BuyForm,
    ConfirmForm,
    DeleteForm,
    EmailForm,
    ForgotForm,
    KeyForm,
    LoginForm,
    PasswordForm,
    ResetForm,
    SignupForm,
)
from app.models import ApiKey, LedgerEntry, OutboxMail, Payment, User
from app.urls import external_url, host_is_checked

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
    return render_template("auth/check_inbox.html", email=email, outbox=_dev_outbox_open())


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


def verified_only():
    """None for an account whose email is confirmed; else the redirect that says what to do first."""
    if current_user.verified:
        return None
    flash("Confirm your email first: open the link we mailed you (or send a new one above).", "error")
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
        throttle = current_app.extensions["throttle"]
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


def _account_page(**forms):
    """The account page, with the forms a request just checked (and their errors) in place of blank ones."""
    forms = {
        "form": PasswordForm(formdata=None),
        "email_form": EmailForm(formdata=None),
        "alert_form": AlertForm(formdata=None, threshold=billing.alert_threshold(current_user)),
        "delete_form": DeleteForm(formdata=None),
        **forms,
    }
    status = 400 if any(form.errors for form in forms.values()) else 200
    page = render_template(
        "dashboard/account.html", everywhere=ConfirmForm(), sign_ins=accounts.sign_ins(current_user), **forms
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
        mail.notify(current_user, "password_changed", forgot_url=external_url("dashboard.forgot_password"))
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
            accounts.change_email(change)
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
def set_alert():
    form = AlertForm()
    if form.validate_on_submit():
        current_user.low_balance_credits = form.threshold.data
        # A new threshold arms the alert again: the next debit that crosses it sends one mail.
        current_user.low_balance_sent_at = None
        db.session.commit()
        message = (
            f"We will email you when your balance falls below {form.threshold.data:,} credits."
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
        accounts.delete_account(current_user)
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


# Balance, ledger, usage


@bp.get("/")
def home():
    """Visitors see what this is and what it costs; customers their overview."""
    if not current_user.is_authenticated:
        return render_template("public/landing.html", packs=_packs(), samples=_samples())
    ledger = db.session.scalars(
        select(LedgerEntry).where(LedgerEntry.user_id == current_user.id).order_by(LedgerEntry.id.desc()).limit(10)
    ).all()
    recent = db.session.scalars(_usage_query().limit(10)).all()
    has_key = db.session.scalar(select(ApiKey.id).where(ApiKey.user_id == current_user.id).limit(1)) is not None
    return render_template(
        "dashboard/home.html",
        ledger=ledger,
        usage=recent,
        has_key=has_key,
        stripe_enabled=current_app.extensions["stripe"] is not None,
    )


@bp.get("/ledger")
@login_required
def ledger_page():
    filters = usage.Filters.from_args(request.args)
    page = db.paginate(filters.ledger(current_user.id), page=usage.page_number(request.args), per_page=PER_PAGE)
    return render_template("dashboard/ledger.html", page=page, filters=filters)


def _usage_query():
    return usage.Filters().usage(current_user.id)


@bp.get("/usage")
@login_required
def usage_page():
    filters = usage.Filters.from_args(request.args)
    page = db.paginate(filters.usage(current_user.id), page=usage.page_number(request.args), per_page=PER_PAGE)
    series = usage.credits_per_day(current_user.id, filters)
    bars, top = usage.bars(series)
    return render_template(
        "dashboard/usage.html",
        page=page,
        filters=filters,
        keys=usage.user_keys(current_user.id),
        bars=bars,
        top=top,
        total=sum(credits for _, credits in series),
        month=usage.this_month(current_user.id, filters),
    )


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
    query = usage.Filters.from_args(request.args).usage(current_user.id).execution_options(yield_per=500)
    header = [
        "time",
        "request_id",
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
            speech.api_key.prefix + "…" if speech.api_key else usage.PLAYGROUND,
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
def ledger_csv():
    query = usage.Filters.from_args(request.args).ledger(current_user.id).execution_options(yield_per=500)
    header = ["time", "kind", "credits", "balance_after", "reference", "note"]
    rows = lambda: (  # noqa: E731
        [
            entry.created_at.isoformat(),
            entry.kind,
            entry.amount,
            entry.balance_after,
            csv_text(entry.reference),
            csv_text(entry.note or ""),
        ]
        for entry in db.session.scalars(query)
    )
    return _csv_download("kokoro-pay-ledger.csv", header, rows)


def ledger_link(entry: LedgerEntry) -> str | None:
    """Where a ledger entry's request or payment is shown: the usage row, or the payment on the billing page."""
    kind, _, rest = entry.reference.partition(":")
    if kind in ("speech", "refund"):
        return url_for("dashboard.usage_page", request=rest)
    if kind in ("topup", "payment_refund", "chargeback"):
        return url_for("dashboard.billing_page", _anchor="payment-" + rest.split(":")[0])
    return None


bp.add_app_template_global(ledger_link)


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
        if (refused := verified_only()) is not None:
            return refused
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


# Public pages


def _samples() -> list[dict]:
    return [catalog.describe(voice) for voice in current_app.config["SAMPLE_VOICES"]]


@bp.get("/pricing")
def pricing():
    return render_template("public/pricing.html", packs=_packs())


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
    if (refused := verified_only()) is not None:
        return refused
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
            cancel_url=external_url(
                "dashboard.billing_cancelled", token=payments.cancel_token(current_user, current_app.secret_key)
            ),
        )
        db.session.commit()
    except stripe.StripeError:
        db.session.rollback()
        current_app.logger.exception("could not create a checkout session")
        flash("Stripe could not start the payment. Nothing was charged; please try again.", "error")
        return redirect(url_for("dashboard.billing_page"))
    return redirect(url, 303)


@bp.get("/billing/cancelled")
@login_required
def billing_cancelled():
    """Back from Checkout's Cancel: the checkout its link names is expired at Stripe and shown as such.

    Any other GET of this page (an image on another site, a link without the checkout's token)
    shows the message and changes nothing: Stripe's redirect is cross-site too, so only the
    token tells them apart (payments.cancel_token).
    """
    client = current_app.extensions["stripe"]
    left = payments.checkout_left(current_user, request.args.get("token", ""), current_app.secret_key)
    if left is not None and client is not None:
        payments.cancel_checkout(client, left)
        db.session.commit()
    flash("Checkout was cancelled: nothing was charged. Choose a pack to try again.", "info")
    return redirect(url_for("dashboard.billing_page"))


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


# The development outbox


def _dev_outbox_open() -> bool:
    """Only when DEV_OUTBOX is on (the development .env), with no mail server configured, and only to
    this machine: the mails hold sign-in links. Behind a proxy on the same host every request would
    come from loopback, hence the setting, which production leaves off."""
    if not current_app.config["DEV_OUTBOX"] or current_app.config["MAIL_URL"]:
        return False
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


@bp.get("/dev/outbox")
def dev_outbox():
    if not _dev_outbox_open():
        abort(404)
    mails = db.session.scalars(select(OutboxMail).order_by(OutboxMail.id.desc()).limit(50)).all()
    response = Response(render_template("dashboard/outbox.html", mails=mails))
    response.headers["Cache-Control"] = "no-store"
    return response


# Docs


@bp.get("/docs")
def docs():
    base_url = external_url("api.balance").rsplit("/", 1)[0] if host_is_checked() else "https://YOUR-SERVER/v1"
    return render_template("dashboard/docs.html", base_url=base_url)
