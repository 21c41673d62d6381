"""Who may do what in a team: every dashboard route and action, walked for every role.

Each case runs in a team of its own, made fresh: the signed-in person (the actor) has the role
under test, and an owner, an admin, a developer and a billing member are there beside them, each
with a key, with one pending invitation, a payment and some credits. Allowed → the action works
(its effect is checked); not allowed → 403 or 404 and nothing of the team changed. The table
here is docs/teams.md's, and a test checks that every route of the dashboard is walked or named
as one that acts on the person, not on a team.
"""

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
import responses
from sqlalchemy import func, select

from app import billing, keys, teams
from app.extensions import db
from app.models import ApiKey, Invitation, LedgerEntry, Membership, OutboxMail, Payment, Team, TeamRole, User, utcnow
from tests import factories
from tests.stripe_helpers import FakeStripe, stub_checkout

ROLES = [TeamRole.OWNER, TeamRole.ADMIN, TeamRole.DEVELOPER, TeamRole.BILLING]
EVERYONE = set(ROLES)
SPEND = {TeamRole.OWNER, TeamRole.ADMIN, TeamRole.DEVELOPER}
BILLING = {TeamRole.OWNER, TeamRole.ADMIN, TeamRole.BILLING}
MANAGERS = {TeamRole.OWNER, TeamRole.ADMIN}
OWNERS = {TeamRole.OWNER}

# Routes that act on the signed-in person (or on nobody yet), not on the current team: every role
# of every team may use them, and they are tested where they live (test_dashboard, test_accounts).
PERSONAL = {
    "dashboard.signup",
    "dashboard.verify_email",
    "dashboard.resend_verification",
    "dashboard.forgot_password",
    "dashboard.reset_password",
    "dashboard.login",
    "dashboard.logout",
    "dashboard.account",
    "dashboard.request_email_change",
    "dashboard.change_email",
    "dashboard.sign_out_everywhere",
    "dashboard.delete_account",
    "dashboard.pricing",
    "dashboard.docs",
    "dashboard.dev_outbox",
    "dashboard.key_created",
    "dashboard.invitation",
    "dashboard.switch_team",
    "playground.sample",
}


@dataclass
class Team_:
    """The team of one case and who is in it."""

    id: int
    actor: int
    owner: int
    admin: int
    developer: int
    billing: int
    keys: dict = field(default_factory=dict)  # person id → key id
    member_ids: dict = field(default_factory=dict)  # "actor", "owner", … → membership id
    invitation: int = 0
    owner_invitation: int = 0
    session_id: str = ""
    payment: int = 0
    n: int = 0


@dataclass
class Case:
    name: str
    method: str
    path: Callable[[Team_], str]
    allowed: set
    endpoint: str
    data: Callable[[Team_], dict] = lambda team: {}
    works: Callable = lambda app, team, response: None
    json: bool = False


def one(app, query):
    with app.app_context():
        return db.session.scalar(query)


def role_of(app, team: Team_, person: int):
    return one(app, select(Membership.role).where(Membership.team_id == team.id, Membership.user_id == person))


def revoked(app, key_id: int) -> bool:
    return one(app, select(ApiKey.revoked_at).where(ApiKey.id == key_id)) is not None


def created_a_key(app, team, response):
    assert response.status_code == 200 and "kp_live_" in response.get_data(as_text=True)
    assert one(app, select(func.count()).where(ApiKey.team_id == team.id, ApiKey.created_by_id == team.actor)) == 2


def made_a_management_key(app, team, response):
    assert response.status_code == 200 and "kp_live_" in response.get_data(as_text=True)
    kinds = select(ApiKey.kind).where(ApiKey.team_id == team.id, ApiKey.created_by_id == team.actor)
    with app.app_context():
        assert sorted(db.session.scalars(kinds)) == ["management", "speech"]


LIMITS = {"name": "capped", "spend_limit": "300", "spend_period": "day", "allowed_voices": "alloy af_sky"}


def limited(app, key_id: int) -> None:
    limits = select(ApiKey.name, ApiKey.spend_limit, ApiKey.spend_period, ApiKey.allowed_voices)
    with app.app_context():
        assert db.session.execute(limits.where(ApiKey.id == key_id)).one() == ("capped", 300, "day", "alloy af_sky")


def rolled(app, key_id: int, response) -> None:
    assert response.status_code == 200 and "kp_live_" in response.get_data(as_text=True)
    assert one(app, select(ApiKey.rolled_at).where(ApiKey.id == key_id)) is not None


def bought(app, team, response):
    assert response.status_code == 303
    payment = one(app, select(Payment).where(Payment.team_id == team.id, Payment.bought_by_id == team.actor))
    assert payment is not None


def card_setup_started(app, team, response):
    assert response.status_code == 303
    assert one(app, select(Team.stripe_customer_id).where(Team.id == team.id)) == FakeStripe.CUSTOMER


def automatic_on(app, team, response):
    assert response.status_code == 302
    row = one(app, select(Team).where(Team.id == team.id))
    assert (row.auto_topup_below, row.auto_topup_by_id) == (5000, team.actor)


def went_to(url: str):
    def check(app, team, response):
        assert response.status_code in (302, 303) and response.headers["Location"].endswith(url)

    return check


def invited(app, team, response):
    assert one(app, select(func.count()).where(Invitation.team_id == team.id)) == 3
    assert one(app, select(func.count()).where(OutboxMail.recipient == f"new{team.n}@example.com")) == 1


def renewed(app, team, response):
    assert one(app, select(Invitation.nonce).where(Invitation.id == team.invitation)) != "first"


def cancelled(app, team, response):
    assert one(app, select(Invitation.cancelled_at).where(Invitation.id == team.invitation)) is not None


def removed(person: str):
    def check(app, team, response):
        gone = getattr(team, person)
        assert role_of(app, team, gone) is None
        assert revoked(app, team.keys[gone])

    return check


def role_now(person: str, role: TeamRole):
    def check(app, team, response):
        assert role_of(app, team, getattr(team, person)) == role

    return check


def closed(app, team, response):
    assert one(app, select(Team.closed_at).where(Team.id == team.id)) is not None
    assert all(revoked(app, key) for key in team.keys.values())


def alert_set(app, team, response):
    assert one(app, select(Team.low_balance_credits).where(Team.id == team.id)) == 77


def new_team(app, team, response):
    assert one(app, select(func.count()).where(Team.name == f"New {team.n}")) == 1


def page(app, team, response):
    assert response.status_code == 200


def reached_the_playground(app, team, response):
    # Past the role's check: the format is refused before anything is charged or sent upstream.
    assert response.status_code == 400 and "The playground plays" in response.get_json()["detail"]


CASES = [
    Case("overview", "GET", lambda t: "/", EVERYONE, "dashboard.home", works=page),
    Case("team page", "GET", lambda t: "/team", EVERYONE, "dashboard.team_page", works=page),
    Case("keys page", "GET", lambda t: "/keys", SPEND, "dashboard.keys_page", works=page),
    Case(
        "create a key",
        "POST",
        lambda t: "/keys",
        SPEND,
        "dashboard.keys_page",
        data=lambda t: {"name": "mine"},
        works=created_a_key,
    ),
    Case(
        "revoke their own key",
        "POST",
        lambda t: f"/keys/{t.keys[t.actor]}/revoke",
        SPEND,
        "dashboard.revoke_key",
        works=lambda app, t, r: revoked(app, t.keys[t.actor]),
    ),
    Case(
        "see the revoke page of another's key",
        "GET",
        lambda t: f"/keys/{t.keys[t.developer]}/revoke",
        MANAGERS,
        "dashboard.revoke_key",
        works=page,
    ),
    Case(
        "revoke another member's key",
        "POST",
        lambda t: f"/keys/{t.keys[t.developer]}/revoke",
        MANAGERS,
        "dashboard.revoke_key",
        works=lambda app, t, r: revoked(app, t.keys[t.developer]),
    ),
    Case(
        "make a management key",
        "POST",
        lambda t: "/keys",
        MANAGERS,
        "dashboard.keys_page",
        data=lambda t: {"name": "automation", "kind": "management"},
        works=made_a_management_key,
    ),
    Case("their own key's page", "GET", lambda t: f"/keys/{t.keys[t.actor]}", SPEND, "dashboard.key_page", works=page),
    Case(
        "another member's key's page",
        "GET",
        lambda t: f"/keys/{t.keys[t.developer]}",
        MANAGERS,
        "dashboard.key_page",
        works=page,
    ),
    Case(
        "limit their own key",
        "POST",
        lambda t: f"/keys/{t.keys[t.actor]}",
        SPEND,
        "dashboard.key_page",
        data=lambda t: LIMITS,
        works=lambda app, t, r: limited(app, t.keys[t.actor]),
    ),
    Case(
        "limit another member's key",
        "POST",
        lambda t: f"/keys/{t.keys[t.developer]}",
        MANAGERS,
        "dashboard.key_page",
        data=lambda t: LIMITS,
        works=lambda app, t, r: limited(app, t.keys[t.developer]),
    ),
    Case(
        "roll their own key",
        "POST",
        lambda t: f"/keys/{t.keys[t.actor]}/roll",
        SPEND,
        "dashboard.roll_key",
        data=lambda t: {"grace": "3600"},
        works=lambda app, t, r: rolled(app, t.keys[t.actor], r),
    ),
    Case(
        "roll another member's key",
        "POST",
        lambda t: f"/keys/{t.keys[t.developer]}/roll",
        MANAGERS,
        "dashboard.roll_key",
        data=lambda t: {"grace": "0"},
        works=lambda app, t, r: rolled(app, t.keys[t.developer], r),
    ),
    Case("usage", "GET", lambda t: "/usage", EVERYONE, "dashboard.usage_page", works=page),
    Case("usage CSV", "GET", lambda t: "/usage.csv", EVERYONE, "dashboard.usage_csv", works=page),
    Case("ledger", "GET", lambda t: "/ledger", BILLING, "dashboard.ledger_page", works=page),
    Case("ledger CSV", "GET", lambda t: "/ledger.csv", BILLING, "dashboard.ledger_csv", works=page),
    Case("billing page", "GET", lambda t: "/billing", BILLING, "dashboard.billing_page", works=page),
    Case(
        "buy credits",
        "POST",
        lambda t: "/billing/checkout",
        BILLING,
        "dashboard.checkout",
        data=lambda t: {"pack": "starter"},
        works=bought,
    ),
    Case("save a card", "POST", lambda t: "/billing/card", BILLING, "dashboard.save_card", works=card_setup_started),
    Case(
        "turn on automatic top-up",
        "POST",
        lambda t: "/billing/automatic",
        BILLING,
        "dashboard.automatic_topup",
        data=lambda t: {"below": 5000, "pack": "starter", "monthly_limit": 3},
        works=automatic_on,
    ),
    Case(
        "open the billing portal",
        "POST",
        lambda t: "/billing/portal",
        BILLING,
        "dashboard.billing_portal",
        works=went_to(FakeStripe.PORTAL),
    ),
    Case(
        "a payment's invoice",
        "GET",
        lambda t: f"/billing/payments/{t.payment}/document",
        BILLING,
        "dashboard.payment_document",
        works=went_to("/invoices/in_team"),
    ),
    Case(
        "a payment's page",
        "GET",
        lambda t: f"/billing/success?session_id={t.session_id}",
        BILLING,
        "dashboard.billing_success",
        works=page,
    ),
    Case("back from Checkout", "GET", lambda t: "/billing/cancelled", BILLING, "dashboard.billing_cancelled"),
    Case(
        "set the low-balance alert",
        "POST",
        lambda t: "/account/alert",
        BILLING,
        "dashboard.set_alert",
        data=lambda t: {"threshold": "77"},
        works=alert_set,
    ),
    Case(
        "invite someone",
        "POST",
        lambda t: "/team/invitations",
        MANAGERS,
        "dashboard.invite",
        data=lambda t: {"email": f"new{t.n}@example.com", "role": "developer"},
        works=invited,
    ),
    Case(
        "invite an owner",
        "POST",
        lambda t: "/team/invitations",
        OWNERS,
        "dashboard.invite",
        data=lambda t: {"email": f"new{t.n}@example.com", "role": "owner"},
        works=invited,
    ),
    Case(
        "resend an invitation to be owner",
        "POST",
        lambda t: f"/team/invitations/{t.owner_invitation}/resend",
        OWNERS,
        "dashboard.resend_invitation",
        works=lambda app, t, r: (
            one(app, select(Invitation.nonce).where(Invitation.id == t.owner_invitation)) != "owner"
        ),
    ),
    Case(
        "cancel an invitation to be owner",
        "POST",
        lambda t: f"/team/invitations/{t.owner_invitation}/cancel",
        OWNERS,
        "dashboard.cancel_invitation",
        works=lambda app, t, r: (
            one(app, select(Invitation.cancelled_at).where(Invitation.id == t.owner_invitation)) is not None
        ),
    ),
    Case(
        "resend an invitation",
        "POST",
        lambda t: f"/team/invitations/{t.invitation}/resend",
        MANAGERS,
        "dashboard.resend_invitation",
        works=renewed,
    ),
    Case(
        "cancel an invitation",
        "POST",
        lambda t: f"/team/invitations/{t.invitation}/cancel",
        MANAGERS,
        "dashboard.cancel_invitation",
        works=cancelled,
    ),
    Case(
        "change a developer's role",
        "POST",
        lambda t: f"/team/members/{t.member_ids['developer']}/role",
        MANAGERS,
        "dashboard.change_role",
        data=lambda t: {"role": "billing"},
        works=role_now("developer", TeamRole.BILLING),
    ),
    Case(
        "make someone owner",
        "POST",
        lambda t: f"/team/members/{t.member_ids['developer']}/role",
        OWNERS,
        "dashboard.change_role",
        data=lambda t: {"role": "owner"},
        works=role_now("developer", TeamRole.OWNER),
    ),
    Case(
        "demote an owner",
        "POST",
        lambda t: f"/team/members/{t.member_ids['owner']}/role",
        OWNERS,
        "dashboard.change_role",
        data=lambda t: {"role": "admin"},
        works=role_now("owner", TeamRole.ADMIN),
    ),
    Case(
        "remove a developer",
        "POST",
        lambda t: f"/team/members/{t.member_ids['developer']}/remove",
        MANAGERS,
        "dashboard.remove_member",
        works=removed("developer"),
    ),
    Case(
        "remove an owner",
        "POST",
        lambda t: f"/team/members/{t.member_ids['owner']}/remove",
        OWNERS,
        "dashboard.remove_member",
        works=removed("owner"),
    ),
    Case("leave", "POST", lambda t: "/team/leave", EVERYONE, "dashboard.leave_team", works=removed("actor")),
    Case("close the team", "POST", lambda t: "/team/close", OWNERS, "dashboard.close_team", works=closed),
    Case(
        "make a new team",
        "POST",
        lambda t: "/teams",
        EVERYONE,
        "dashboard.create_team",
        data=lambda t: {"name": f"New {t.n}"},
        works=new_team,
    ),
    Case("playground", "GET", lambda t: "/playground", SPEND, "playground.page", works=page),
    Case(
        "speak in the playground",
        "POST",
        lambda t: "/playground/speech",
        SPEND,
        "playground.speak",
        data=lambda t: {"input": "Hello.", "voice": "af_sky", "response_format": "pcm"},
        works=reached_the_playground,
        json=True,
    ),
]


def make_team(app, actor: User, role: TeamRole, n: int) -> Team_:
    """A fresh team: the actor with `role`, one person of every role beside them, a key each, an invitation,
    a payment and 1,000 credits."""
    with app.app_context():
        team = teams.create(f"Team {n}", db.session.get(User, actor.id))
        team.balance = 0
        db.session.flush()
        found = {}
        mine = db.session.scalar(select(Membership).where(Membership.team_id == team.id))
        mine.role = role
        found["actor"] = (actor.id, mine.id)
        for other in ROLES:
            person = User(email=f"{other}{n}@example.com", email_verified_at=utcnow())
            db.session.add(person)
            teams.create_personal(person)
            membership = teams.add_member(team, person, other)
            db.session.flush()
            found[str(other)] = (person.id, membership.id)
        billing.grant(team, 1000, "test credits")
        case = Team_(team.id, *(found[name][0] for name in ("actor", "owner", "admin", "developer", "billing")), n=n)
        case.member_ids = {name: membership_id for name, (_, membership_id) in found.items()}
        for person_id, _ in found.values():
            key, _secret = keys.create_key(team, db.session.get(User, person_id), "key")
            db.session.flush()
            case.keys[person_id] = key.id
        invitation = Invitation(
            team_id=team.id,
            email=f"pending{n}@example.com",
            role=TeamRole.DEVELOPER,
            invited_by_id=case.owner,
            nonce="first",
            expires_at=utcnow() + timedelta(days=7),
        )
        db.session.add(invitation)
        to_be_owner = Invitation(
            team_id=team.id,
            email=f"future-owner{n}@example.com",
            role=TeamRole.OWNER,
            invited_by_id=case.owner,
            nonce="owner",
            expires_at=utcnow() + timedelta(days=7),
        )
        db.session.add(to_be_owner)
        case.session_id = f"cs_team_{n}"
        payment = factories.starter_payment(team.id, case.session_id, status="paid", invoice_id="in_team")
        team.card_payment_method, team.card_brand, team.card_last4 = "pm_test_1", "visa", "4242"
        db.session.commit()
        case.payment = payment.id
        case.invitation = invitation.id
        case.owner_invitation = to_be_owner.id
        return case


# Everything of a key that an action could change.
KEY_STATE = (
    ApiKey.id,
    ApiKey.name,
    ApiKey.kind,
    ApiKey.digest,
    ApiKey.revoked_at,
    ApiKey.spend_limit,
    ApiKey.spend_period,
    ApiKey.expires_at,
    ApiKey.allowed_ips,
    ApiKey.allowed_voices,
    ApiKey.allowed_models,
    ApiKey.previous_digest,
)


def snapshot(app, team: Team_) -> tuple:
    """Everything of the team an action could change, and the outbox."""
    with app.app_context():
        row = db.session.get(Team, team.id)
        return (
            (row.name, row.balance, row.low_balance_credits, row.closed_at, row.stripe_customer_id),
            (row.card_payment_method, row.auto_topup_below, row.auto_topup_pack, row.auto_topup_monthly_limit),
            sorted(
                db.session.execute(select(Membership.user_id, Membership.role).where(Membership.team_id == team.id))
            ),
            sorted(db.session.execute(select(*KEY_STATE).where(ApiKey.team_id == team.id))),
            sorted(
                db.session.execute(
                    select(Invitation.id, Invitation.nonce, Invitation.accepted_at, Invitation.cancelled_at).where(
                        Invitation.team_id == team.id
                    )
                )
            ),
            db.session.scalar(select(func.count()).where(LedgerEntry.team_id == team.id)),
            sorted(db.session.execute(select(Payment.id, Payment.status).where(Payment.team_id == team.id))),
            db.session.scalar(select(func.count()).select_from(OutboxMail)),
            db.session.scalar(select(func.count()).select_from(Team)),
        )


def act(web, case: Case, team: Team_):
    path = case.path(team)
    if case.method == "GET":
        return web.get(path)
    if case.json:
        return web.client.post(path, json=case.data(team), headers={"X-CSRFToken": web.token})
    return web.post(path, case.data(team))


@pytest.mark.parametrize("role", ROLES)
def test_every_route_for_every_role(app, web, role):
    factories.signed_up(app, web, "actor@example.com")
    with app.app_context():
        actor = db.session.scalar(select(User).where(User.email == "actor@example.com"))
        db.session.expunge_all()
    outcomes = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as stripe_api:
        stub_checkout(stripe_api, "cs_bought")
        FakeStripe(stripe_api)
        for n, case in enumerate(CASES):
            team = make_team(app, actor, role, n)
            web.get("/account")
            assert web.post("/teams/switch", {"team": team.id}).status_code == 302
            web.get("/team")
            before = snapshot(app, team)
            response = act(web, case, team)
            if role in case.allowed:
                assert response.status_code not in (403, 404, 500), (case.name, response.status_code)
                case.works(app, team, response)
                outcomes.append((case.name, "works"))
            else:
                assert response.status_code in (403, 404), (case.name, response.status_code)
                assert snapshot(app, team) == before, case.name
                outcomes.append((case.name, response.status_code))
    assert len(outcomes) == len(CASES)


def test_every_dashboard_route_is_walked_or_acts_on_the_person_alone(app):
    walked = {case.endpoint for case in CASES}
    routes = {
        rule.endpoint for rule in app.url_map.iter_rules() if rule.endpoint.split(".")[0] in ("dashboard", "playground")
    }
    assert routes - walked - PERSONAL == set()
    assert walked | PERSONAL <= routes


def test_the_docs_table_is_the_code_table():
    """docs/teams.md's table of roles says what app/teams.py's PERMISSIONS allow."""
    text = (Path(__file__).parent.parent / "docs" / "teams.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1] in ("✓", "—"):
            rows[cells[0]] = {role for role, cell in zip(ROLES, cells[1:], strict=True) if cell == "✓"}
    for permission, roles in teams.PERMISSIONS.items():
        [documented] = [found for name, found in rows.items() if f"`{permission.value}`" in name]
        assert documented == set(roles), permission
