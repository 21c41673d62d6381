"""The team page: members and their roles, invitations, leaving, closing; making and switching teams.

Who may do what is app/teams.py's table; these views ask it and change nothing on a refusal.
An invitation's link (`/invitations/<token>`) is the one page here open to a visitor: it asks
them to sign in with the invited address, or to make an account with it right there (the link
was mailed to that address, so opening it proves the address as a verification link does).
"""

from datetime import timedelta

from flask import abort, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required
from sqlalchemy.exc import IntegrityError

from app import accounts, config, teams
from app.dashboard import bp, can, current_membership, current_team, sign_in, verified_required
from app.extensions import db
from app.forms import ConfirmForm, InviteForm, JoinForm, RoleForm, SwitchTeamForm, TeamForm, role_choices
from app.models import Invitation, Membership, TeamRole


def _lifetime() -> timedelta:
    return timedelta(days=config.current().invite_days)


def _team_page(**forms):
    membership = current_membership()
    givable = role_choices(teams.roles_given_by(membership.role))
    invite_form = forms.get("invite_form") or InviteForm(formdata=None, role=TeamRole.DEVELOPER.value)
    invite_form.role.choices = givable
    role_form = RoleForm(formdata=None)
    role_form.role.choices = givable
    page = render_template(
        "dashboard/team.html",
        members=teams.members(membership.team_id),
        invitations=teams.pending_invitations(membership.team_id) if can(teams.Permission.MANAGE_MEMBERS) else [],
        invite_form=invite_form,
        role_form=role_form,
        team_form=forms.get("team_form") or TeamForm(formdata=None),
        confirm=ConfirmForm(),
        memberships=teams.memberships(current_user),
    )
    return page, 400 if any(form.errors for form in forms.values()) else 200


@bp.get("/team")
@login_required
def team_page():
    return _team_page()


@bp.post("/teams")
@login_required
@verified_required
def create_team():
    form = TeamForm()
    if not form.validate_on_submit() or not form.name.data.strip():
        if not form.name.errors:
            form.name.errors.append("Give the team a name.")
        return _team_page(team_form=form)
    team = teams.create(form.name.data, current_user)
    db.session.commit()
    session["team_id"] = team.id
    flash(f"The team {team.name} is made and you are its owner. Invite people below.", "success")
    return redirect(url_for("dashboard.team_page"))


@bp.post("/teams/switch")
@login_required
def switch_team():
    form = SwitchTeamForm()
    membership = teams.membership(current_user, form.team.data or 0) if form.validate_on_submit() else None
    if membership is None:
        abort(404)
    session["team_id"] = membership.team_id
    flash(f"You now work on {membership.team.name}.", "success")
    return redirect(url_for("dashboard.home"))


def _member(membership_id: int) -> Membership:
    target = db.session.get(Membership, membership_id)
    if target is None or target.team_id != current_team().id:
        abort(404)
    return target


def _refused(error: teams.TeamError):
    db.session.rollback()
    abort(403, str(error))


@bp.post("/team/members/<int:membership_id>/role")
@login_required
def change_role(membership_id: int):
    target = _member(membership_id)
    form = RoleForm()
    form.role.choices = role_choices(list(TeamRole))
    if not form.validate_on_submit():
        abort(400, "Choose one of the roles.")
    try:
        revoked = teams.change_role(current_membership(), target, TeamRole(form.role.data))
    except teams.TeamError as error:
        _refused(error)
    db.session.commit()
    keys_gone = f"; the {revoked} key(s) they made are revoked (a {target.role} has none)" if revoked else ""
    flash(f"{target.user.email} is now {target.role} of {target.team.name}{keys_gone}.", "success")
    return redirect(url_for("dashboard.team_page"))


@bp.post("/team/members/<int:membership_id>/remove")
@login_required
def remove_member(membership_id: int):
    target = _member(membership_id)
    if not ConfirmForm().validate_on_submit():
        abort(400, "The form expired; try again.")
    email, leaving = target.user.email, target.user_id == current_user.id
    try:
        revoked = teams.remove(current_membership(), target)
    except teams.TeamError as error:
        _refused(error)
    db.session.commit()
    team = current_team()
    if leaving:
        session.pop("team_id", None)
        flash(f"You left {team.name}; {revoked} key(s) you made for it are revoked.", "success")
        return redirect(url_for("dashboard.home"))
    flash(f"{email} is no longer in {team.name}; {revoked} key(s) they made are revoked.", "success")
    return redirect(url_for("dashboard.team_page"))


@bp.post("/team/leave")
@login_required
def leave_team():
    return remove_member(current_membership().id)


@bp.post("/team/close")
@login_required
def close_team():
    if not ConfirmForm().validate_on_submit():
        abort(400, "The form expired; try again.")
    team = current_team()
    try:
        teams.close(current_membership())
    except teams.TeamError as error:
        _refused(error)
    db.session.commit()
    session.pop("team_id", None)
    flash(f"The team {team.name} is closed: its keys are revoked. Its books are kept.", "success")
    return redirect(url_for("dashboard.home"))


# Invitations


@bp.post("/team/invitations")
@login_required
@verified_required
def invite():
    form = InviteForm()
    form.role.choices = role_choices(list(TeamRole))
    asked = next((role for role in TeamRole if role.value == form.role.data), None)
    if asked is not None and asked not in teams.roles_given_by(current_membership().role):
        abort(403, f"Your role in {current_team().name} ({current_membership().role}) cannot invite a {asked}.")
    if not form.validate_on_submit():
        return _team_page(invite_form=form)
    email = accounts.parse_email(form.email.data)
    try:
        invitation = teams.invite(current_membership(), email, TeamRole(form.role.data), _lifetime())
        db.session.flush()
    except teams.TeamError as error:
        db.session.rollback()
        if not can(teams.Permission.MANAGE_MEMBERS) or current_team().personal:
            abort(403, str(error))
        form.email.errors.append(str(error))
        return _team_page(invite_form=form)
    sent = accounts.send_invitation(invitation, current_user, request.remote_addr)
    db.session.commit()
    if sent:
        flash(
            f"We mailed an invitation to {email}: its link works for {round(config.current().invite_days)} days.",
            "success",
        )
    else:
        flash(
            f"The invitation to {email} is listed below, not mailed yet: too many mails were asked for "
            "just now. Resend it in a few minutes.",
            "info",
        )
    return redirect(url_for("dashboard.team_page"))


def _invitation(invitation_id: int) -> Invitation:
    if not can(teams.Permission.MANAGE_MEMBERS):
        abort(403, f"Your role in {current_team().name} does not allow managing invitations.")
    invitation = teams.pending_invitation(current_team().id, invitation_id)
    if invitation is None:
        abort(404)
    if invitation.role not in teams.roles_given_by(current_membership().role):
        abort(403, f"Only an owner can resend or cancel an invitation to be {invitation.role}.")
    return invitation


@bp.post("/team/invitations/<int:invitation_id>/resend")
@login_required
def resend_invitation(invitation_id: int):
    invitation = _invitation(invitation_id)
    if not ConfirmForm().validate_on_submit():
        abort(400, "The form expired; try again.")
    teams.renew(invitation, _lifetime())
    if accounts.send_invitation(invitation, current_user, request.remote_addr):
        db.session.commit()
        flash(f"We mailed a new link to {invitation.email}; the one sent before no longer works.", "success")
    else:
        db.session.rollback()
        flash(f"An invitation went to {invitation.email} a moment ago; try again in a few minutes.", "info")
    return redirect(url_for("dashboard.team_page"))


@bp.post("/team/invitations/<int:invitation_id>/cancel")
@login_required
def cancel_invitation(invitation_id: int):
    invitation = _invitation(invitation_id)
    if not ConfirmForm().validate_on_submit():
        abort(400, "The form expired; try again.")
    teams.cancel(invitation)
    db.session.commit()
    flash(f"The invitation to {invitation.email} is cancelled: its link no longer works.", "success")
    return redirect(url_for("dashboard.team_page"))


@bp.route("/invitations/<token>", methods=["GET", "POST"])
def invitation(token: str):
    """Accept an invitation: signed in with its address, or by making an account with it here."""
    try:
        invitation_id, nonce = accounts.read_invitation(token)
    except accounts.TokenError as error:
        return render_template("dashboard/invitation.html", problem=str(error)), 404
    found = db.session.get(Invitation, invitation_id)
    if found is None or found.nonce != nonce or teams.pending_invitation(found.team_id, found.id) is None:
        problem = "This invitation has expired, was cancelled or was used already: ask for a new one."
        return render_template("dashboard/invitation.html", problem=problem), 404
    form = ConfirmForm()
    signup_form = JoinForm()
    has_account = accounts.find_by_email(found.email) is not None
    if current_user.is_authenticated and current_user.email != found.email:
        problem = (
            f"This invitation is for {found.email}; you are signed in as {current_user.email}. "
            "Sign out, then open the link again."
        )
        return render_template("dashboard/invitation.html", problem=problem, invitation=found), 403
    if current_user.is_authenticated and form.validate_on_submit():
        return _accept(invitation_id, nonce, current_user)
    if not current_user.is_authenticated and not has_account and signup_form.validate_on_submit():
        try:
            user = accounts.create_user(found.email, signup_form.password.data)
            db.session.flush()
        except IntegrityError:
            db.session.rollback()
            flash("An account with this address was made a moment ago: sign in to accept.", "info")
            return redirect(url_for("dashboard.invitation", token=token))
        # The account, its membership and its sign-in are committed together, or none of them.
        return _accept(invitation_id, nonce, user, new_account=True)
    status = 400 if signup_form.errors and request.method == "POST" else 200
    return render_template(
        "dashboard/invitation.html", invitation=found, form=form, signup_form=signup_form, has_account=has_account
    ), status


def _accept(invitation_id: int, nonce: str, user, new_account: bool = False):
    try:
        membership = teams.accept(invitation_id, nonce, user)
        if not user.verified:
            # The link reached this address: it is proven, as a verification link proves it.
            accounts.mark_verified(user, accounts.client_digest(request.remote_addr))
        if new_account:
            sign_in(user, remember=False)  # commits
        db.session.commit()
    except teams.TeamError as error:
        db.session.rollback()
        flash(str(error), "error")
        return redirect(url_for("dashboard.home"))
    except IntegrityError:
        # Two invitations of one team accepted at once: the other request made the membership
        # (or, for a new account, another sign-up of the address committed first).
        db.session.rollback()
        if new_account:
            flash("An account with this address was made a moment ago: sign in to accept.", "info")
            return redirect(url_for("dashboard.login"))
        membership = teams.membership(user, db.session.get(Invitation, invitation_id).team_id)
        if membership is None:
            flash("This invitation was used a moment ago: ask for a new one.", "error")
            return redirect(url_for("dashboard.home"))
    session["team_id"] = membership.team_id
    flash(f"Welcome to {membership.team.name}: you are {membership.role} here.", "success")
    return redirect(url_for("dashboard.home"))
