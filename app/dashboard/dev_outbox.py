"""The development outbox: mail shown on this machine when no mail server is configured."""

import ipaddress

from flask import (
    Response,
    abort,
    render_template,
    request,
)
from sqlalchemy import select

from app import config
from app.dashboard import bp
from app.extensions import db
from app.models import OutboxMail


def dev_outbox_open() -> bool:
    """Only when DEV_OUTBOX is on (the development .env), with no mail server configured, and only to
    this machine: the mails hold sign-in links. Behind a proxy on the same host every request would
    come from loopback, hence the setting, which production leaves off."""
    if not config.current().dev_outbox or config.current().mail_url:
        return False
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


@bp.get("/dev/outbox")
def dev_outbox():
    if not dev_outbox_open():
        abort(404)
    mails = db.session.scalars(select(OutboxMail).order_by(OutboxMail.id.desc()).limit(50)).all()
    response = Response(render_template("dashboard/outbox.html", mails=mails))
    response.headers["Cache-Control"] = "no-store"
    return response
