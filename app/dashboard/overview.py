"""The home page: what this is and what it costs for visitors, the overview for customers."""

from flask import (
    render_template,
)
from flask_login import current_user

from app import catalog, config, services, usage
from app.dashboard import bp, can, current_team, packs
from app.dashboard.api_keys import visible_keys
from app.extensions import db
from app.models import ApiKey
from app.teams import Permission


@bp.get("/")
def home():
    """Visitors see what this is and what it costs; customers their overview."""
    if not current_user.is_authenticated:
        return render_template("public/landing.html", packs=packs(), samples=_samples())
    # What the member's role shows: the ledger to billing roles, everyone's usage or their own.
    ledger = []
    if can(Permission.BILLING):
        ledger = db.session.scalars(usage.Filters().ledger(current_team().id).limit(10)).all()
    everyone = can(Permission.SEE_USAGE)
    filters = usage.Filters(member="" if everyone else str(current_user.id))
    recent = db.session.scalars(filters.usage(current_team().id).limit(10)).all()
    # The next step is a key of one's own, unless one sees (and may use) everyone's.
    has_key = db.session.scalar(visible_keys(ApiKey.id).limit(1)) is not None
    return render_template(
        "dashboard/home.html",
        ledger=ledger,
        usage=recent,
        has_key=has_key,
        stripe_enabled=services.stripe_client() is not None,
    )


def _samples() -> list[dict]:
    return [catalog.describe(voice) for voice in config.current().sample_voices]
