"""Teams: a team owns the money; a person works in one or more, each with a role.

The personal team every account gets, the trial that goes to it once per mailbox, keys of
several members spending one balance (and the race that must not overspend it), the mail
the team's billing people get, and the migration that gave existing accounts their teams.
"""

from collections import Counter
from unittest.mock import ANY

import pytest
from flask_migrate import downgrade, upgrade
from sqlalchemy import func, select, text

from app import keys, teams
from app.audit import audit
from app.extensions import db
from app.models import ApiKey, LedgerEntry, Membership, Payment, SpeechRequest, Team, TeamRole, User
from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.servers import race_speech, serve
from tests.stripe_helpers import checkout_session, deliver, event


def person(app, email: str) -> User:
    with app.app_context():
        found = db.session.scalar(select(User).where(User.email == email))
        db.session.expunge_all()
        return found


def join(app, team_id: int, user_id: int, role: TeamRole) -> str:
    """Make the person a member of the team with `role`, and a key of the team made by them; its secret."""
    with app.app_context():
        team, user = db.session.get(Team, team_id), db.session.get(User, user_id)
        teams.add_member(team, user, role)
        _, secret = keys.create_key(team, user, f"{role} key")
        db.session.commit()
        return secret


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


# One person works as before


def test_sign_up_makes_a_personal_team_the_person_owns_and_the_trial_goes_to_it(make_app):
    app = make_app(SIGNUP_CREDITS=300)
    factories.WebClient(app.test_client()).signup("ann@example.com")
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == "ann@example.com"))
        [membership] = user.memberships
        assert (membership.role, membership.team.personal, membership.team.balance) == ("owner", True, 300)
        trial = db.session.scalar(select(LedgerEntry).where(LedgerEntry.kind == "trial"))
        assert (trial.team_id, trial.amount, trial.reference) == (membership.team.id, 300, f"trial:{user.id}")
        # Numbered on their own: a team's id is not its owner's.
        assert membership.team.id != user.id


def test_a_second_team_starts_empty_it_is_not_a_second_trial(make_app):
    app = make_app(SIGNUP_CREDITS=300)
    web = factories.WebClient(app.test_client())
    web.signup("ann@example.com")
    with app.app_context():
        ann = db.session.scalar(select(User).where(User.email == "ann@example.com"))
        acme = teams.create("  Acme  ", ann)
        db.session.commit()
        assert (acme.name, acme.personal, acme.balance) == ("Acme", False, 0)
        assert sorted((m.team.name, m.role) for m in ann.memberships) == [("Acme", "owner"), ("Personal", "owner")]
        assert db.session.scalar(select(func.count()).where(LedgerEntry.kind == "trial")) == 1
    with app.app_context():
        assert not audit().problems


def test_a_person_added_to_someone_elses_personal_team_keeps_their_own(app, customer):
    helper = factories.customer(app, balance=5)
    join(app, customer.team_id, helper.user_id, TeamRole.ADMIN)
    with app.app_context():
        assert teams.personal(db.session.get(User, helper.user_id)).id == helper.team_id
        assert teams.personal(db.session.get(User, customer.user_id)).id == customer.team_id


def test_a_person_is_a_member_of_a_team_once(app, customer):
    with app.app_context():
        team, user = db.session.get(Team, customer.team_id), db.session.get(User, customer.user_id)
        teams.add_member(team, user, TeamRole.DEVELOPER)
        with pytest.raises(Exception, match="UNIQUE|unique"):
            db.session.commit()
        db.session.rollback()
        assert len(db.session.get(Team, customer.team_id).memberships) == 1


# Several members, one balance


@pytest.fixture
def upstream():
    return FakeUpstream([b"ID3\x04audio-", b"bytes"])


@pytest.fixture
def gateway(make_app, upstream):
    with serve(upstream) as url:
        yield make_app(UPSTREAM_URL=f"{url}/v1")


def test_a_members_key_spends_the_teams_balance_and_is_recorded_under_its_maker(gateway):
    owner = factories.customer(gateway, balance=1000)
    developer = factories.customer(gateway, balance=7)
    secret = join(gateway, owner.team_id, developer.user_id, TeamRole.DEVELOPER)
    client = gateway.test_client()
    spoken = client.post("/v1/audio/speech", json={"input": "Hello team", "voice": "af_sky"}, headers=bearer(secret))
    assert spoken.status_code == 200 and spoken.get_data() == b"ID3\x04audio-bytes"
    assert spoken.headers["X-Credits-Remaining"] == "990"
    assert client.get("/v1/balance", headers=bearer(secret)).get_json() == {
        "balance": 990,
        "unlimited": False,
        "key": ANY,
    }
    # Their own key still spends their own personal team's balance.
    assert client.get("/v1/balance", headers=developer.headers).get_json() == {
        "balance": 7,
        "unlimited": False,
        "key": ANY,
    }
    [request] = factories.speech_requests(gateway, owner.team_id)
    assert (request.made_by_id, request.credits) == (developer.user_id, 10)
    assert factories.speech_requests(gateway, developer.team_id) == []
    factories.assert_books_balance(gateway, owner.team_id)
    factories.assert_books_balance(gateway, developer.team_id)


def test_a_key_whose_maker_is_disabled_is_refused_the_teams_other_keys_are_not(gateway):
    owner = factories.customer(gateway, balance=1000)
    developer = factories.customer(gateway)
    secret = join(gateway, owner.team_id, developer.user_id, TeamRole.DEVELOPER)
    with gateway.app_context():
        from app import accounts

        accounts.set_disabled(db.session.get(User, developer.user_id), True)
        db.session.commit()
    client = gateway.test_client()
    assert client.get("/v1/balance", headers=bearer(secret)).status_code == 401
    assert client.get("/v1/balance", headers=owner.headers).get_json()["balance"] == 1000


def test_receipts_go_to_the_teams_owners_admins_and_billing_people_only(app, customer):
    roles = {"admin": TeamRole.ADMIN, "billing": TeamRole.BILLING, "developer": TeamRole.DEVELOPER}
    members = {name: factories.customer(app) for name in roles}
    for name, role in roles.items():
        join(app, customer.team_id, members[name].user_id, role)
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_team")
        db.session.commit()
    payload = event("checkout.session.completed", checkout_session(customer.team_id, "cs_team"))
    assert deliver(app.test_client(), payload).status_code == 200
    told = sorted(mail.recipient for mail in factories.mails(app, kind="receipt"))
    assert told == sorted([customer.email, members["admin"].email, members["billing"].email])
    assert factories.balance(app, customer.team_id) == 11_000


def test_two_members_keys_racing_on_one_balance_never_overspend_it(app, database_uri, postgres_only):
    owner = factories.customer(app, balance=500)
    developer = factories.customer(app)
    secrets = [owner.secret, join(app, owner.team_id, developer.user_id, TeamRole.DEVELOPER)]
    answers = race_speech(
        database_uri,
        FakeUpstream([b"ID3", b"audio"]),
        secrets,
        count=200,
        text="0123456789",
        threads=32,
        timeout=60,
        env={"MAX_STREAMS_PER_ACCOUNT": "1000"},
    )
    assert Counter(status for status, _ in answers) == {200: 50, 402: 150}
    served_by = Counter(row.made_by_id for row in factories.speech_requests(app, owner.team_id))
    assert sum(served_by.values()) == 50 and set(served_by) <= {owner.user_id, developer.user_id}
    assert factories.balance(app, owner.team_id) == 0
    factories.assert_books_balance(app, owner.team_id)


# Existing accounts get their teams


def _books(app) -> dict:
    """What the books say, team by team, by each team owner's email."""
    with app.app_context():
        owners = dict(db.session.execute(select(Membership.team_id, User.email).join(User)).all())
        return {
            "balances": {owners[team.id]: team.balance for team in db.session.scalars(select(Team))},
            "ledger": sorted(
                (owners[row.team_id], row.reference, row.amount) for row in db.session.scalars(select(LedgerEntry))
            ),
            "keys": sorted(
                (owners[key.team_id], key.prefix, key.created_by.email) for key in db.session.scalars(select(ApiKey))
            ),
            "payments": sorted(
                (owners[p.team_id], p.checkout_session_id, p.status) for p in db.session.scalars(select(Payment))
            ),
            "requests": sorted((owners[r.team_id], r.id, r.state) for r in db.session.scalars(select(SpeechRequest))),
        }


def test_the_migration_moves_every_account_into_a_personal_team_and_back(app, client):
    # Books as the service writes them: a paying customer with a delivered request and a top-up, an unlimited
    # one, one with a low-balance alert of their own, and one who deleted their account.
    payer = factories.customer(app, balance=1000)
    unlimited = factories.customer(app, unlimited=True)
    alerted = factories.customer(app, balance=50)
    gone = factories.customer(app, balance=30)
    with app.app_context():
        from app import accounts

        accounts.delete_account(db.session.get(User, gone.user_id))
        speech = factories.charge_speech(payer.team_id, 12)
        factories.starter_payment(payer.team_id, "cs_before", status="paid")
        db.session.get(Team, alerted.team_id).low_balance_credits = 40
        db.session.commit()
        speech_id = speech.id
    before = _books(app)
    with app.app_context():
        downgrade(revision="0009")
        # Each account holds its money again, under its own id.
        rows = db.session.execute(text("SELECT email, balance, unlimited, low_balance_credits FROM users ORDER BY id"))
        assert [tuple(row) for row in rows] == [
            (payer.email, 988, False, None),
            (unlimited.email, 0, True, None),
            (alerted.email, 50, False, 40),
            (f"deleted-{gone.user_id}@deleted.invalid", 30, False, None),
        ]
        db.session.commit()
        upgrade()
    after = _books(app)
    assert after == before
    with app.app_context():
        # Each team has the id its owner had: references written before (trial:<user id>) still read true.
        for user in db.session.scalars(select(User)):
            team = teams.personal(user)
            assert team.id == user.id and team.name == "Personal" and user.memberships[0].role == "owner"
        assert db.session.get(SpeechRequest, speech_id).made_by_id == person(app, payer.email).id
        assert db.session.get(Team, person(app, alerted.email).id).low_balance_credits == 40
        assert not audit().problems
        # A team made after the upgrade is numbered after the highest id taken.
        fresh = teams.create("Fresh", db.session.get(User, person(app, payer.email).id))
        db.session.commit()
        assert fresh.id == max(user.id for user in db.session.scalars(select(User))) + 1
    # Every key still works, for the same money; the deleted account's stays revoked.
    for customer, balance in ((payer, 988), (unlimited, 0), (alerted, 50)):
        answer = client.get("/v1/balance", headers=customer.headers)
        assert answer.status_code == 200 and answer.get_json()["balance"] == balance
    assert client.get("/v1/balance", headers=gone.headers).status_code == 401


def test_the_migration_will_not_go_back_while_a_team_is_shared(app, customer, caplog):
    member = factories.customer(app)
    join(app, customer.team_id, member.user_id, TeamRole.DEVELOPER)
    with app.app_context():
        with pytest.raises(SystemExit):
            downgrade(revision="0009")
        # Flask-Migrate logs the refusal and exits 1, as `flask db downgrade` does.
        assert "1 teams are shared or not personal" in caplog.text
        db.session.rollback()
        # Nothing below 0010 was undone (PostgreSQL rolls back the whole run, SQLite stops after 0011's step).
        assert db.session.scalar(text("SELECT version_num FROM alembic_version")) >= "0010"
        assert db.session.scalar(select(func.count()).select_from(Membership)) == 3
