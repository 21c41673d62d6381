"""Health for load balancers and process managers: is the process up, can it serve speech.

`/healthz` answers from the process alone. `/readyz` asks the database and the speech
servers and says what each answered; 503 when either cannot serve. Neither needs a key
nor reveals anything a visitor could use: states, not addresses or errors' details.
"""

import time

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app import services
from app.extensions import db
from app.upstream import UpstreamError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    database = _database()
    upstream = _upstream()
    ready = database["ok"] and upstream["ok"]
    response = jsonify(status="ready" if ready else "not ready", database=database, upstream=upstream)
    response.status_code = 200 if ready else 503
    response.headers["Cache-Control"] = "no-store"
    return response


def _database() -> dict:
    started = time.monotonic()
    try:
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
    except SQLAlchemyError:
        db.session.rollback()
        current_app.logger.exception("readiness: the database did not answer")
        return {"ok": False}
    return {"ok": True, "ms": round((time.monotonic() - started) * 1000, 2)}


def _upstream() -> dict:
    """Whether the speech servers' catalog can be read (cached like every catalog read), and each server's load."""
    upstream = services.upstream()
    servers = upstream.states()
    try:
        upstream.catalog("models")
    except UpstreamError:
        return {"ok": False, "servers": servers}
    return {"ok": True, "servers": servers}
