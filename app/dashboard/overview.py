"""The home page: what this is and what it costs for visitors, the overview for customers."""

from flask import (
    render_template,
)
from flask_login import current_user
from sqlalchemy import select

from app import catalog, config, services, usage
from app.dashboard import bp, current_team, packs
from app.extensions import db
from app.models import ApiKey, LedgerEntry


@bp.get("/")
def home():
    """Visitors see what this is and what it costs; customers their overview."""
    if not current_user.is_authenticated:
        return render_template("public/landing.html", packs=packs(), samples=_samples())
    ledger = db.session.scalars(
        select(LedgerEntry).where(LedgerEntry.team_id == current_team().id).order_by(LedgerEntry.id.desc()).limit(10)
    ).all()
    recent = db.session.scalars(usage.Filters().usage(current_team().id).limit(10)).all()
    has_key = db.session.scalar(select(ApiKey.id).where(ApiKey.team_id == current_team().id).limit(1)) is not None
    return render_template(
        "dashboard/home.html",
        ledger=ledger,
        usage=recent,
        has_key=has_key,
        stripe_enabled=services.stripe_client() is not None,
    )


def _samples() -> list[dict]:
    return [catalog.describe(voice) for voice in config.current().sample_voices]
