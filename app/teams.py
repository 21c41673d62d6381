"""Teams: who pays, the people in them, and what each role may do.

A team owns the money (its balance, ledger, keys, payments, Stripe customer and alert settings,
all app/billing.py's to change); a person belongs to one or more teams, each with a role. Every
person has a personal team, made with their account, which they own and nobody else joins.
Other teams are made by their owner and joined by invitation (a mailed link that works once,
for one address, until it expires). Like billing, the functions change state inside the
caller's transaction; the caller commits.

`PERMISSIONS` is the one table of who may do what: the dashboard asks `may()` and docs/teams.md
shows the same table (a test compares them).
"""

import secrets
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import func, select, update

from app.extensions import db
from app.models import ApiKey, Invitation, KeyKind, Membership, Payment, PaymentStatus, Team, TeamRole, User, utcnow

# The roles whose people are told of a team's money: receipts, refunds, low balance.
BILLING_ROLES = (TeamRole.OWNER, TeamRole.ADMIN, TeamRole.BILLING)


class Permission(StrEnum):
    """What a member may do in a team, beyond seeing its name, balance and members (everyone may)."""

    # Create keys, set the controls of their own, roll and revoke them; the playground (which spends the
    # team's credits); their own usage.
    SPEND = "spend"
    # See, change and revoke every member's keys; make management keys (the key-management API).
    MANAGE_KEYS = "manage keys"
    # Every member's usage and its CSV.
    SEE_USAGE = "see usage"
    # Buy credits, the saved card, automatic top-up, Stripe's billing portal, the payments and their invoices,
    # the ledger and its CSV, the low-balance alert.
    BILLING = "billing"
    # Invite people, resend and cancel invitations, change roles and remove members (owners aside).
    MANAGE_MEMBERS = "manage members"
    # Make and unmake owners, remove an owner, close the team.
    OWN = "own"


PERMISSIONS: dict[Permission, frozenset[TeamRole]] = {
    Permission.SPEND: frozenset({TeamRole.OWNER, TeamRole.ADMIN, TeamRole.DEVELOPER}),
    Permission.MANAGE_KEYS: frozenset({TeamRole.OWNER, TeamRole.ADMIN}),
    Permission.SEE_USAGE: frozenset({TeamRole.OWNER, TeamRole.ADMIN, TeamRole.BILLING}),
    Permission.BILLING: frozenset({TeamRole.OWNER, TeamRole.ADMIN, TeamRole.BILLING}),
    Permission.MANAGE_MEMBERS: frozenset({TeamRole.OWNER, TeamRole.ADMIN}),
    Permission.OWN: frozenset({TeamRole.OWNER}),
}


def may(role: TeamRole | str, permission: Permission) -> bool:
    return role in PERMISSIONS[permission]


class TeamError(ValueError):
    """A change to a team's members that is not allowed; the message says why, for people."""


def create_personal(user: User) -> Team:
    """Add `user`'s personal team, owned by them, to the session."""
    team = Team(name="Personal", personal=True, balance=0)
    db.session.add(team)
    db.session.add(Membership(team=team, user=user, role=TeamRole.OWNER))
    return team


def create(name: str, owner: User) -> Team:
    """Add a team of `owner`'s (not personal: it starts empty, with no trial) to the session; its name is
    made one line (the dashboard's form refuses control and formatting characters before this)."""
    team = Team(name=" ".join(name.split())[:100], personal=False, balance=0)
    db.session.add(team)
    add_member(team, owner, TeamRole.OWNER)
    return team


def personal_membership(user: User) -> Membership:
    """`user`'s membership of their personal team: the one made with the account, which they own
    (another person's personal team they were added to is not theirs). Also before it is flushed."""
    return next(
        membership for membership in user.memberships if membership.role == TeamRole.OWNER and membership.team.personal
    )


def personal(user: User) -> Team:
    """The personal team of `user` (personal_membership's)."""
    return personal_membership(user).team


def memberships(user: User) -> list[Membership]:
    """The teams `user` works in (closed ones aside), personal first, then by name."""
    return sorted(
        (membership for membership in user.memberships if membership.team.closed_at is None),
        key=lambda membership: (not membership.team.personal, membership.team.name.lower(), membership.team_id),
    )


def membership(user: User, team_id: int) -> Membership | None:
    """`user`'s membership of the open team `team_id`; None when they have none."""
    return next(
        (found for found in user.memberships if found.team_id == team_id and found.team.closed_at is None), None
    )


def add_member(team: Team, user: User, role: TeamRole) -> Membership:
    """Add `user` to `team` with `role`; the unique (team, person) pair refuses a second membership."""
    membership = Membership(team=team, user=user, role=role)
    db.session.add(membership)
    return membership


def billing_people(team_id: int) -> list[User]:
    """The people told of the team's money (receipts, refunds, low balance), in the order they joined."""
    return list(
        db.session.scalars(
            select(User)
            .join(Membership)
            .where(Membership.team_id == team_id, Membership.role.in_(BILLING_ROLES), User.deleted_at.is_(None))
            .order_by(Membership.id)
        )
    )


def members(team_id: int) -> list[Membership]:
    """The team's members, in the order they joined."""
    return list(db.session.scalars(select(Membership).where(Membership.team_id == team_id).order_by(Membership.id)))


def _lock(team_id: int) -> None:
    """Take the team's row for this transaction: changes to its owners queue behind each other, so two owners
    demoting each other at once cannot leave it with none (on SQLite, the database's write lock: app/__init__.py)."""
    db.session.execute(select(Team.id).where(Team.id == team_id).with_for_update())


def _owners(team_id: int) -> int:
    return db.session.scalar(
        select(func.count(Membership.id)).where(Membership.team_id == team_id, Membership.role == TeamRole.OWNER)
    )


def roles_given_by(role: TeamRole) -> list[TeamRole]:
    """The roles a member with `role` may give (in an invitation or a change of role)."""
    if may(role, Permission.OWN):
        return list(TeamRole)
    if may(role, Permission.MANAGE_MEMBERS):
        return [TeamRole.ADMIN, TeamRole.DEVELOPER, TeamRole.BILLING]
    return []


def _check_may_change(actor: Membership, target: Membership, new_role: TeamRole | None) -> None:
    """Refuse a change of `target` (to `new_role`, or its removal for None) that `actor`'s role does not allow."""
    if actor.team_id != target.team_id:
        raise TeamError("That person is not in this team.")
    touches_owner = target.role == TeamRole.OWNER or new_role == TeamRole.OWNER
    if touches_owner and not may(actor.role, Permission.OWN):
        raise TeamError("Only an owner can change an owner, or make one.")
    if not may(actor.role, Permission.MANAGE_MEMBERS):
        raise TeamError("Your role does not allow changing members.")


def change_role(actor: Membership, target: Membership, role: TeamRole) -> int:
    """Give `target` a new role; the last owner keeps theirs. What the new role may not do goes with the
    old one: keys they made, when it has no keys (`spend`), the management keys they made, when it does
    not manage keys, and invitations they sent that it could not give. The number of keys revoked.
    Raises TeamError."""
    _check_may_change(actor, target, role)
    _lock(target.team_id)
    if target.role == TeamRole.OWNER and role != TeamRole.OWNER and _owners(target.team_id) <= 1:
        raise TeamError("A team needs an owner: make someone else owner first.")
    target.role = role
    _cancel_invitations_beyond(target.team_id, target.user_id, role)
    if not may(role, Permission.SPEND):
        return revoke_keys(target.team_id, target.user_id)
    if not may(role, Permission.MANAGE_KEYS):
        return revoke_keys(target.team_id, target.user_id, KeyKind.MANAGEMENT)
    return 0


def _cancel_invitations_beyond(team_id: int, user_id: int, role: TeamRole | None) -> None:
    """Cancel the pending invitations `user_id` sent for the team that `role` (None: no role) could not give."""
    now = utcnow()
    allowed = roles_given_by(role) if role is not None and may(role, Permission.MANAGE_MEMBERS) else []
    db.session.execute(
        update(Invitation)
        .where(
            Invitation.team_id == team_id,
            Invitation.invited_by_id == user_id,
            Invitation.role.not_in(allowed),
            _pending(now),
        )
        .values(cancelled_at=now)
        .execution_options(synchronize_session=False)
    )


def remove(actor: Membership, target: Membership) -> int:
    """Remove `target` from the team (by `actor`, who may be `target` leaving): their access ends at once
    and the keys they made for the team are revoked (a stream already running finishes and is paid).
    What they spent stays in the books under their name. The number of keys revoked. Raises TeamError."""
    if actor.id != target.id:
        _check_may_change(actor, target, None)
    if target.team.personal:
        raise TeamError("Nobody leaves their personal team; delete the account instead.")
    return _take_out(target, "A team needs an owner: make someone else owner first, or close the team.")


def _take_out(target: Membership, last_owner: str) -> int:
    """End `target`'s membership: the keys they made for the team revoked, the invitations they sent
    cancelled. TeamError(`last_owner`) while they are its only owner. The number of keys revoked."""
    _lock(target.team_id)
    if target.role == TeamRole.OWNER and _owners(target.team_id) <= 1:
        raise TeamError(last_owner)
    revoked = revoke_keys(target.team_id, target.user_id)
    _cancel_invitations_beyond(target.team_id, target.user_id, None)
    db.session.delete(target)
    return revoked


def revoke_keys(team_id: int, made_by_id: int, kind: KeyKind | None = None) -> int:
    """Revoke the keys (of `kind`; None: of every kind) `made_by_id` made for the team; how many were live."""
    query = update(ApiKey).where(
        ApiKey.team_id == team_id, ApiKey.created_by_id == made_by_id, ApiKey.revoked_at.is_(None)
    )
    if kind is not None:
        query = query.where(ApiKey.kind == kind)
    return db.session.execute(query.values(revoked_at=utcnow())).rowcount


def close(actor: Membership) -> None:
    """Close the team: every key revoked, every member's access ended, open invitations cancelled.
    Its balance, ledger, payments and requests stay for the books. Raises TeamError."""
    if not may(actor.role, Permission.OWN):
        raise TeamError("Only an owner can close the team.")
    team = actor.team
    if team.personal:
        raise TeamError("A personal team closes with its account.")
    _lock(team.id)
    # A checkout still open or being paid, or an automatic top-up queued or at Stripe, would credit
    # (and charge) a team nobody works on any more.
    unsettled = db.session.scalar(
        select(func.min(Payment.created_at)).where(
            Payment.team_id == team.id,
            Payment.status.in_(
                (PaymentStatus.OPEN, PaymentStatus.PENDING, PaymentStatus.QUEUED, PaymentStatus.PROCESSING)
            ),
        )
    )
    if unsettled is not None:
        raise TeamError(
            f"A payment for this team started {unsettled:%Y-%m-%d %H:%M} UTC is still open at Stripe: close the team "
            "once it is paid or has expired (an unpaid checkout expires within a day)."
        )
    now = utcnow()
    team.closed_at = now
    team.auto_topup_below = None
    db.session.execute(
        update(ApiKey).where(ApiKey.team_id == team.id, ApiKey.revoked_at.is_(None)).values(revoked_at=now)
    )
    db.session.execute(update(Invitation).where(Invitation.team_id == team.id, _pending(now)).values(cancelled_at=now))


def leave_every_team(user: User) -> None:
    """Take a closing account out of the teams it shares (their keys revoked, as the caller revokes the rest).
    Raises TeamError while it is the last owner of a team others still work in."""
    for found in memberships(user):
        if not found.team.personal:
            _take_out(
                found,
                f"You are the only owner of the team {found.team.name}: make someone else owner, or close it, first.",
            )


# Invitations


def _pending(now):
    return Invitation.accepted_at.is_(None) & Invitation.cancelled_at.is_(None) & (Invitation.expires_at > now)


def pending_invitation(team_id: int, invitation_id: int) -> Invitation | None:
    """The team's invitation `invitation_id` while it is pending (not accepted, cancelled or expired)."""
    return db.session.scalar(
        select(Invitation).where(Invitation.id == invitation_id, Invitation.team_id == team_id, _pending(utcnow()))
    )


def pending_invitations(team_id: int) -> list[Invitation]:
    return list(
        db.session.scalars(
            select(Invitation).where(Invitation.team_id == team_id, _pending(utcnow())).order_by(Invitation.id)
        )
    )


def invite(actor: Membership, email: str, role: TeamRole, lifetime: timedelta) -> Invitation:
    """A new invitation of `email` (already normalised) to `actor`'s team; the caller mails it. Raises TeamError."""
    if not may(actor.role, Permission.MANAGE_MEMBERS):
        raise TeamError("Your role does not allow inviting people.")
    if actor.team.personal:
        raise TeamError("A personal team is yours alone: create a team to work with others.")
    if role not in roles_given_by(actor.role):
        raise TeamError("Your role cannot give that role.")
    in_team = db.session.scalar(
        select(Membership.id).join(User).where(Membership.team_id == actor.team_id, User.email == email)
    )
    if in_team:
        raise TeamError(f"{email} is in this team already.")
    now = utcnow()
    if db.session.scalar(
        select(Invitation.id).where(Invitation.team_id == actor.team_id, Invitation.email == email, _pending(now))
    ):
        raise TeamError(f"{email} has an invitation already: resend it from the list below.")
    invitation = Invitation(
        team_id=actor.team_id,
        email=email,
        role=role,
        invited_by_id=actor.user_id,
        nonce=secrets.token_hex(16),
        created_at=now,
        sent_at=now,
        expires_at=now + lifetime,
    )
    db.session.add(invitation)
    return invitation


def renew(invitation: Invitation, lifetime: timedelta) -> None:
    """For a resend: a new link (the one mailed before stops working) and a new expiry."""
    now = utcnow()
    invitation.nonce = secrets.token_hex(16)
    invitation.sent_at = now
    invitation.expires_at = now + lifetime


def cancel(invitation: Invitation) -> None:
    invitation.cancelled_at = utcnow()


def accept(invitation_id: int, nonce: str, user: User) -> Membership:
    """`user` takes up the invitation whose link names `invitation_id` and `nonce`: one conditional update
    lets one acceptance through, however many are tried at once. Raises TeamError."""
    invitation = db.session.get(Invitation, invitation_id)
    if invitation is None or invitation.nonce != nonce:
        raise TeamError("This invitation link is not valid any more: ask for a new one.")
    sender = db.session.scalar(
        select(Membership.role).where(
            Membership.team_id == invitation.team_id, Membership.user_id == invitation.invited_by_id
        )
    )
    if sender is None or invitation.role not in roles_given_by(sender):
        # Sent by someone who has left the team, or may no longer give that role.
        raise TeamError("Whoever sent this invitation can no longer give it: ask the team for a new one.")
    if invitation.email != user.email:
        raise TeamError(
            f"This invitation is for {invitation.email}; you are signed in as {user.email}. "
            "Sign out and sign in (or sign up) with that address."
        )
    now = utcnow()
    taken = db.session.execute(
        update(Invitation)
        .where(Invitation.id == invitation.id, Invitation.nonce == nonce, _pending(now))
        .values(accepted_at=now, accepted_by_id=user.id)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not taken:
        raise TeamError("This invitation has expired, was cancelled or was used already: ask for a new one.")
    if invitation.team.closed_at is not None:
        raise TeamError("That team is closed.")
    existing = db.session.scalar(
        select(Membership).where(Membership.team_id == invitation.team_id, Membership.user_id == user.id)
    )
    return existing or add_member(invitation.team, user, invitation.role)
