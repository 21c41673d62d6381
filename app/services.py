"""The app's shared services, each through one typed accessor (its settings: config.current()).

`create_app` builds them once per app and keeps them in `app.extensions` (Flask's place
for what an app owns); everything else asks here, in a request, a CLI command or any
other app context, so no module spells their keys.
"""

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    import stripe

    from app.card_payments import Buyer
    from app.hangups import Watch
    from app.liveness import Lease
    from app.mail import Postman
    from app.throttle import Throttle
    from app.upstream import Upstream


def upstream() -> "Upstream":
    return current_app.extensions["upstream"]


def throttle() -> "Throttle":
    return current_app.extensions["throttle"]


def stripe_client() -> "stripe.StripeClient | None":
    """Stripe; None until STRIPE_SECRET_KEY is set."""
    return current_app.extensions["stripe"]


def buyer() -> "Buyer":
    """The automatic top-up buyer (app/card_payments.py)."""
    return current_app.extensions["buyer"]


def postman() -> "Postman":
    return current_app.extensions["postman"]


def lease() -> "Lease":
    return current_app.extensions["lease"]


def hangups() -> "Watch":
    return current_app.extensions["hangups"]
