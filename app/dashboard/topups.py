"""Top-ups: the credit packs, Stripe Checkout, and the way back from it."""

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

from app import config, payments, services
from app.dashboard import bp, current_team, packs, team_permission, verified_required
from app.extensions import db
from app.forms import (
    BuyForm,
)
from app.models import Payment
from app.teams import Permission
from app.urls import external_url


@bp.get("/billing")
@login_required
@team_permission(Permission.BILLING)
def billing_page():
    recent = db.session.scalars(
        select(Payment).where(Payment.team_id == current_team().id).order_by(Payment.id.desc()).limit(10)
    ).all()
    return render_template(
        "dashboard/billing.html",
        packs=packs(),
        form=BuyForm(),
        payments=recent,
        enabled=services.stripe_client() is not None,
    )


@bp.post("/billing/checkout")
@login_required
@team_permission(Permission.BILLING)
@verified_required
def checkout():
    form = BuyForm()
    pack = next((pack for pack in packs() if pack.id == form.pack.data), None)
    if not form.validate_on_submit() or pack is None:
        flash("Choose one of the credit packs.", "error")
        return redirect(url_for("dashboard.billing_page"))
    client = services.stripe_client()
    if client is None:
        flash("Payments are not configured on this server yet.", "error")
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
