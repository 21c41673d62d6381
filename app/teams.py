"""Teams: who pays, and the people in them.

A team owns the money (its balance, ledger, keys, payments, Stripe customer and alert settings,
all app/billing.py's to change); a person belongs to one or more teams, each with a role. Every
person has a personal team, made with their account, which they own. Like billing, the
functions change state inside the caller's transaction; the caller commits.
"""

from sqlalchemy import select

from app.extensions import db
from app.models import Membership, Team, TeamRole, User

# The roles whose people are told of a team's money: receipts, refunds, low balance.
BILLING_ROLES = (TeamRole.OWNER, TeamRole.ADMIN, TeamRole.BILLING)


def create_personal(user: User) -> Team:
    """Add `user`'s personal team, owned by them, to the session."""
    team = Team(name="Personal", personal=True, balance=0)
    db.session.add(team)
    db.session.add(Membership(team=team, user=user, role=TeamRole.OWNER))
    return team


def create(name: str, owner: User) -> Team:
    """Add a team of `owner`'s (not personal: it starts empty, with no trial) to the session."""
    team = Team(name=name.strip()[:100], personal=False, balance=0)
    db.session.add(team)
    add_member(team, owner, TeamRole.OWNER)
    return team


def personal(user: User) -> Team:
    """The personal team of `user`: the one made with the account, which they own (another person's
    personal team they were added to is not theirs). Also before it is flushed."""
    return next(
        membership.team
        for membership in user.memberships
        if membership.role == TeamRole.OWNER and membership.team.personal
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
