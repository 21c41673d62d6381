"""Public pages: pricing and the API docs."""

from flask import (
    render_template,
)

from app.dashboard import bp, packs
from app.urls import external_url, host_is_checked


@bp.get("/pricing")
def pricing():
    return render_template("public/pricing.html", packs=packs())


@bp.get("/docs")
def docs():
    base_url = external_url("api.balance").rsplit("/", 1)[0] if host_is_checked() else "https://YOUR-SERVER/v1"
    return render_template("dashboard/docs.html", base_url=base_url)
