"""Top-ups: the credit packs, Stripe Checkout and the way back from it, the saved card, automatic
top-up, the billing portal, and each payment's invoice or receipt."""

import stripe
from flask import (
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import or_, select

from app import autotopup, cards, config, payments, services, usage
from app.dashboard import bp, current_team, packs, team_permission, verified_required
from app.extensions import db
from app.forms import AutoTopupForm, BuyForm, ConfirmForm
from app.models import Payment, utcnow
from app.packs import named
from app.teams import Permission
from app.urls import external_url


@bp.get("/billing")
@login_required
@team_permission(Permission.BILLING)
def billing_page(automatic_form: AutoTopupForm | None = None):
    team, now = current_team(), utcnow()
    payments_page = db.paginate(
        select(Payment).where(Payment.team_id == team.id).order_by(Payment.id.desc()),
        page=usage.page_number(request.args),
        per_page=PAYMENTS_PER_PAGE,
    )
    if automatic_form is None:
        automatic_form = _automatic_form()
        if team.auto_topup_below is not None:
            automatic_form.below.data = team.auto_topup_below
            automatic_form.pack.data = team.auto_topup_pack
            automatic_form.monthly_limit.data = team.auto_topup_monthly_limit
    return render_template(
        "dashboard/billing.html",
        packs=packs(),
        form=BuyForm(),
        button=ConfirmForm(),
        automatic_form=automatic_form,
        now=now,
        automatic_this_month=autotopup.counted_this_month(team.id, now),
        in_flight=autotopup.in_flight(team.id),
        payments=payments_page.items,
        payments_page=payments_page,
        enabled=services.stripe_client() is not None,
    ), (400 if automatic_form.errors else 200)


# Payments a page of the billing page lists, newest first; the pager reaches every one.
PAYMENTS_PER_PAGE = 20


def _automatic_form() -> AutoTopupForm:
    form = AutoTopupForm()
    form.pack.choices = [(pack.id, f"{pack.id.capitalize()}: {pack.credits:,} credits") for pack in packs()]
    return form


def _stripe_or_flash():
    client = services.stripe_client()
    if client is None:
        flash("Payments are not configured on this server yet.", "error")
    return client


def _to_stripe(start, failure: str, could_not: str):
    """Send the browser to the Stripe page `start(client)` makes (its URL); back to billing, nothing kept,
    when payments are off, the form's token is wrong or Stripe fails."""
    client = _stripe_or_flash()
    if not ConfirmForm().validate_on_submit() or client is None:
        return redirect(url_for("dashboard.billing_page"))
    try:
        url = start(client)
        db.session.commit()
    except stripe.StripeError:
        db.session.rollback()
        current_app.logger.exception(failure)
        flash(could_not, "error")
        return redirect(url_for("dashboard.billing_page"))
    return redirect(url, 303)


@bp.post("/billing/card")
@login_required
@team_permission(Permission.BILLING)
@verified_required
def save_card():
    """Save (or replace) the team's card in a Stripe Checkout Session in setup mode: nothing is charged."""
    return _to_stripe(
        lambda client: cards.start_card_setup(
            client,
            current_team(),
            current_user,
            config.current().stripe_currency,
            success_url=external_url("dashboard.billing_page", card="saved"),
            cancel_url=external_url("dashboard.billing_page"),
        ),
        "could not start saving a card",
        "Stripe could not be reached; nothing was saved. Please try again.",
    )


@bp.post("/billing/automatic")
@login_required
@team_permission(Permission.BILLING)
@verified_required
def automatic_topup():
    """Turn automatic top-up on (with its settings), or off ("off" in the form)."""
    team = current_team()
    if request.form.get("action") == "off":
        if ConfirmForm().validate_on_submit():
            autotopup.turn_off(team)
            db.session.commit()
            flash("Automatic top-up is off.", "info")
        return redirect(url_for("dashboard.billing_page"))
    form = _automatic_form()
    if not form.validate_on_submit():
        flash("Automatic top-up was not saved: see the fields below.", "error")
        return billing_page(form)
    try:
        settings = autotopup.check(form.below.data, form.pack.data, form.monthly_limit.data)
        queued = autotopup.turn_on(team, current_user, settings)
    except autotopup.NotAllowed as refusal:
        db.session.rollback()
        flash(str(refusal), "error")
        return redirect(url_for("dashboard.billing_page"))
    db.session.commit()
    flash(
        "Automatic top-up is on"
        + (": your balance is below the threshold already, so a top-up is on its way." if queued else "."),
        "info",
    )
    return redirect(url_for("dashboard.billing_page"))


@bp.post("/billing/portal")
@login_required
@team_permission(Permission.BILLING)
@verified_required
def billing_portal():
    """Stripe's billing portal for the team's Customer: cards and invoices; it comes back to the billing page."""
    return _to_stripe(
        lambda client: cards.portal_url(client, current_team(), current_user, external_url("dashboard.billing_page")),
        "could not open the billing portal",
        "Stripe's billing portal could not be opened. Please try again.",
    )


@bp.get("/billing/payments/<int:payment_id>/document")
@login_required
@team_permission(Permission.BILLING)
def payment_document(payment_id: int):
    """The payment's invoice at Stripe (or its receipt), looked up now: a link that does not go stale."""
    payment = db.session.get(Payment, payment_id)
    if payment is None or payment.team_id != current_team().id:
        abort(404)
    client = services.stripe_client()
    try:
        url = None if client is None else cards.document_url(client, payment)
    except stripe.StripeError:
        current_app.logger.exception("could not look up payment %s's invoice", payment.id)
        url = None
    if url is None:
        flash("Stripe has no invoice or receipt for this payment yet. Please try again later.", "info")
        return redirect(url_for("dashboard.billing_page"))
    return redirect(url)


@bp.post("/billing/checkout")
@login_required
@team_permission(Permission.BILLING)
@verified_required
def checkout():
    form = BuyForm()
    pack = named(packs(), form.pack.data)
    if not form.validate_on_submit() or pack is None:
        flash("Choose one of the credit packs.", "error")
        return redirect(url_for("dashboard.billing_page"))
    client = _stripe_or_flash()
    if client is None:
        return redirect(url_for("dashboard.billing_page"))
    try:
        url = payments.start_checkout(
            client,
            current_team(),
            current_user,
            pack,
            config.current().stripe_currency,
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
@team_permission(Permission.BILLING)
def billing_cancelled():
    """Back from Checkout's Cancel: the checkout its link names is expired at Stripe and shown as such.

    Any other GET of this page (an image on another site, a link without the checkout's token)
    shows the message and changes nothing: Stripe's redirect is cross-site too, so only the
    token tells them apart (payments.cancel_token).
    """
    client = services.stripe_client()
    left = payments.checkout_left(current_user, request.args.get("token", ""), current_app.secret_key)
    if left is not None and client is not None:
        payments.cancel_checkout(client, left)
        db.session.commit()
    flash("Checkout was cancelled: nothing was charged. Choose a pack to try again.", "info")
    return redirect(url_for("dashboard.billing_page"))


@bp.get("/billing/success")
@login_required
@team_permission(Permission.BILLING)
def billing_success():
    # The team's payment, or one this person bought (for a team they have switched away from since).
    payment = db.session.scalar(
        select(Payment).where(
            Payment.checkout_session_id == request.args.get("session_id", ""),
            or_(Payment.team_id == current_team().id, Payment.bought_by_id == current_user.id),
        )
    )
    if payment is None:
        abort(404)
    return render_template("dashboard/billing_success.html", payment=payment)
