"""The customer dashboard: one blueprint, a module per concern (as CTFd's admin package does).

`auth` (sign-up, sign-in, reset), `account`, `overview` (the home page), `history` (ledger,
usage, CSVs), `api_keys`, `topups` (packs, Stripe Checkout), `public` (pricing, docs) and
`dev_outbox`; each adds its routes to `bp`, and endpoint names are `dashboard.<view>` as before.
Every form and query field is refused with 400 when it holds a control character.
"""

import functools
import re
from urllib.parse import urlsplit

from flask import Blueprint, abort, flash, g, redirect, request, url_for
from flask_login import current_user

from app import config, teams
from app.models import Team
from app.packs import Pack

bp = Blueprint("dashboard", __name__)

PER_PAGE = 20


# No field of a form or query may carry NUL or another control character (tab and line breaks
# aside): the database refuses NUL in text, and nobody types the others.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@bp.before_request
def refuse_control_characters():
    for values in (*request.args.listvalues(), *request.form.listvalues()):
        if any(_CONTROL_CHARACTERS.search(value) for value in values):
            abort(400, "A field holds a control character; remove it and try again.")


def safe_next(target: str | None) -> str:
    """Only a path on this site: no scheme, no host, no protocol-relative `//` or `/\\`."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith(("//", "/\\")):
            return target
    return url_for("dashboard.home")


def verified_required(view):
    """What only an account with a confirmed email may do (create keys, buy credits); beside login_required.

    A GET still shows the page; a change asked for before the email is confirmed is answered with
    the redirect that says what to do first.
    """

    @functools.wraps(view)
    def checked(*args, **kwargs):
        if request.method != "GET" and not current_user.verified:
            flash("Confirm your email first: open the link we mailed you (or send a new one above).", "error")
            return redirect(url_for("dashboard.home"))
        return view(*args, **kwargs)

    return checked


def current_team() -> Team:
    """The team the signed-in person works on: the pages show its balance, keys and books."""
    if "team" not in g:
        g.team = teams.personal(current_user)
    return g.team


bp.add_app_template_global(current_team)


def packs() -> list[Pack]:
    return config.current().credit_packs


# Each module adds its routes to bp.
from app.dashboard import account, api_keys, auth, dev_outbox, history, overview, public, topups  # noqa: E402, F401
