"""The customer dashboard: one blueprint, a module per concern (as CTFd's admin package does).

`auth` (sign-up, sign-in, reset), `account`, `team` (members, invitations, the switcher),
`overview` (the home page), `history` (ledger, usage, CSVs), `api_keys`, `topups` (packs,
Stripe Checkout), `public` (pricing, docs) and `dev_outbox`; each adds its routes to `bp`, and
endpoint names are `dashboard.<view>` as before. Every form and query field is refused with 400
when it holds a control character.

Every signed-in page works on the current team (`current_team()`: the one the person switched
to, kept in the session, while they are still in it; else their personal team), and what a view
may do there is what the person's role allows (`team_permission`, app/teams.py's table): else 403,
and nothing changes.
"""

import functools
import re
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Blueprint, abort, flash, g, redirect, request, session, url_for
from flask_login import current_user

from app import accounts, config, teams
from app.models import Membership, Team, User
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


def sign_in(user: User, remember: bool) -> None:
    settings = config.current()
    accounts.sign_in(user, remember, timedelta(hours=settings.sign_in_hours), timedelta(days=settings.remember_days))


def current_membership() -> Membership:
    """The signed-in person's membership of the team they work on: the one they switched to
    (`session["team_id"]`) while they are still in it and it is open, else their personal team.
    Looked up afresh on every request, so a removal takes effect at the next click."""
    if "membership" not in g:
        chosen = teams.membership(current_user, session.get("team_id", 0))
        g.membership = chosen or teams.personal_membership(current_user)
    return g.membership


def current_team() -> Team:
    """The team the signed-in person works on: the pages show its balance, keys and books."""
    return current_membership().team


def can(permission: teams.Permission) -> bool:
    """Whether the signed-in person's role in the current team allows `permission`."""
    return teams.may(current_membership().role, permission)


bp.add_app_template_global(current_team)
bp.add_app_template_global(current_membership)
bp.add_app_template_global(can)
bp.add_app_template_global(teams.Permission, "Permission")


def team_permission(permission: teams.Permission):
    """What a role must allow in the current team for this view (after login_required): else 403."""

    def decorator(view):
        @functools.wraps(view)
        def checked(*args, **kwargs):
            if not can(permission):
                abort(403, f"Your role in {current_team().name} ({current_membership().role}) does not allow this.")
            return view(*args, **kwargs)

        return checked

    return decorator


def packs() -> list[Pack]:
    return config.current().credit_packs


# Each module adds its routes to bp.
from app.dashboard import account, api_keys, auth, dev_outbox, history, overview, public, team, topups  # noqa: E402, F401
