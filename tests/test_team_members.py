"""Sharing a team: invitations, the switcher, removal and leaving, closing, and who did what.

What each role may do is walked in test_team_roles.py; here are the flows a team goes through,
as its members see them in the dashboard and through their keys.
"""

import csv
import io
import threading

import pytest
import requests
from flask_migrate import downgrade, upgrade
from sqlalchemy import func, select, text, update

from app import accounts, billing, teams
from app.audit import audit
from app.extensions import db
from app.models import ApiKey, Invitation, Membership, OutboxMail, Payment, Team, TeamRole, User, utcnow
from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_for

PASSWORD = "correct horse battery"


def acme(app, web, credits: int = 1000) -> int:
    """owner@example.com signs up, makes the team Acme (and works on it), which gets `credits`; its id."""
    factories.signed_up(app, web, "owner@example.com")
    web.get("/team")
    assert web.post("/teams", {"name": "Acme"}).status_code == 302
    with app.app_context():
        team = db.session.scalar(select(Team).where(Team.name == "Acme"))
        billing.grant(team, credits, "test credits")
        db.session.commit()
        return team.id


def invite(web, email: str, role: str = "developer"):
    web.get("/team")
    return web.post("/team/invitations", {"email": email, "role": role})


def member(app, team_id: int, email: str) -> Membership | None:
    with app.app_context():
        found = db.session.scalar(
            select(Membership).join(User).where(Membership.team_id == team_id, User.email == email)
        )
        db.session.expunge_all()
        return found


def joined(app, team_id: int, email: str, role: str = "developer") -> factories.WebClient:
    """`email` is invited to the team with `role` and joins it, making an account from the link; their browser."""
    owner = factories.WebClient(app.test_client())
    owner.login("owner@example.com")
    owner.get("/account")
    assert owner.post("/teams/switch", {"team": team_id}).status_code == 302
    assert invite(owner, email, role).status_code == 302
    browser = factories.WebClient(app.test_client())
    link = factories.mail_link(app, email, "invitation")
    browser.get(link)
    assert browser.post(link, {"password": PASSWORD, "confirm": PASSWORD}).status_code == 302
    return browser


def header_team(web) -> str:
    page = web.get("/").get_data(as_text=True)
    start = page.index("<span data-team>") + len("<span data-team>")
    return page[start : page.index("</span>", start)]


def new_key(app, web) -> str:
    web.get("/keys")
    page = web.post("/keys", {"name": "laptop"}).get_data(as_text=True)
    return page[page.index("kp_live_") :].split("<")[0].split('"')[0].strip()


# Invitations


def test_an_invitation_to_a_new_address_makes_its_account_and_joins_it_once(make_app):
    app = make_app(SIGNUP_CREDITS=300)
    web = factories.WebClient(app.test_client())
    team_id = acme(app, web)
    assert invite(web, "dev@example.com").status_code == 302
    [mail] = factories.mails(app, "dev@example.com", "invitation")
    assert "owner@example.com invited you to the team Acme" in mail.subject
    assert "as developer" in mail.body and "works once, for 7 days" in mail.body
    link = factories.mail_link(app, "dev@example.com", "invitation")

    visitor = factories.WebClient(app.test_client())
    page = visitor.get(link).get_data(as_text=True)
    assert "Join Acme" in page and "Make your account" in page and "dev@example.com" in page
    answer = visitor.post(link, {"password": PASSWORD, "confirm": PASSWORD})
    assert answer.status_code == 302
    # Signed in, confirmed (the link reached the address), working on Acme, with a personal team of their own.
    assert header_team(visitor) == "Acme"
    with app.app_context():
        dev = db.session.scalar(select(User).where(User.email == "dev@example.com"))
        assert dev.verified
        assert sorted((m.team.name, m.role) for m in dev.memberships) == [("Acme", "developer"), ("Personal", "owner")]
        # The trial goes to their personal team, as for any sign-up; Acme's balance is untouched.
        assert (teams.personal(dev).balance, db.session.get(Team, team_id).balance) == (300, 1000)
    # The link worked once: not again, not for anyone.
    again = visitor.get(link)
    assert again.status_code == 404 and "used already" in again.get_data(as_text=True)
    assert factories.WebClient(app.test_client()).get(link).status_code == 404
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(Membership.team_id == team_id)) == 2
        assert not audit().problems


def test_an_invitation_is_for_its_address_only(app, web):
    team_id = acme(app, web)
    other = factories.WebClient(app.test_client())
    factories.signed_up(app, other, "other@example.com")
    invitee = factories.WebClient(app.test_client())
    factories.signed_up(app, invitee, "dev@example.com")
    invitee.logout()
    invite(web, "dev@example.com", "billing")
    link = factories.mail_link(app, "dev@example.com", "invitation")

    # Someone else, signed in, cannot use it: told whose it is, and nothing changes.
    refused = other.get(link)
    assert refused.status_code == 403 and "This invitation is for dev@example.com" in refused.get_data(as_text=True)
    assert other.post(link, {}).status_code == 403
    assert member(app, team_id, "other@example.com") is None

    # Its address, signed out: asked to sign in, and brought back to accept.
    page = invitee.get(link).get_data(as_text=True)
    assert "Sign in to accept" in page and "Make your account" not in page
    invitee.login("dev@example.com", next_url=link)
    assert "Join Acme" in invitee.get(link).get_data(as_text=True)
    assert invitee.post(link).status_code == 302
    assert member(app, team_id, "dev@example.com").role == "billing"
    with app.app_context():
        invitation = db.session.scalar(select(Invitation))
        assert invitation.accepted_by_id == member(app, team_id, "dev@example.com").user_id


def test_an_expired_cancelled_or_replaced_link_joins_nobody(app, web, freeze):
    team_id = acme(app, web)
    advance = freeze(accounts)
    invite(web, "late@example.com")
    first = factories.mail_link(app, "late@example.com", "invitation")
    visitor = factories.WebClient(app.test_client())
    assert "Make your account" in visitor.get(first).get_data(as_text=True)
    advance(7 * 86400 + 1)
    assert "expired" in visitor.get(first).get_data(as_text=True)
    assert visitor.post(first, {"password": PASSWORD, "confirm": PASSWORD}).status_code == 404

    # Resent (past the mail limit's two minutes): a new link, and the one before stops working.
    factories.time_passes(app)
    with app.app_context():
        invitation_id = db.session.scalar(select(Invitation.id))
    web.get("/team")
    assert web.post(f"/team/invitations/{invitation_id}/resend").status_code == 302
    second = factories.mail_link(app, "late@example.com", "invitation")
    assert second != first and visitor.get(first).status_code == 404
    assert visitor.get(second).status_code == 200

    # Cancelled: the new link stops working too.
    web.get("/team")
    assert web.post(f"/team/invitations/{invitation_id}/cancel").status_code == 302
    assert visitor.get(second).status_code == 404
    assert visitor.post(second, {"password": PASSWORD, "confirm": PASSWORD}).status_code == 404
    assert member(app, team_id, "late@example.com") is None
    with app.app_context():
        assert accounts.find_by_email("late@example.com") is None


def test_invitation_mails_keep_to_the_mail_limits(app, web):
    acme(app, web)
    invite(web, "dev@example.com")
    with app.app_context():
        invitation = db.session.scalar(select(Invitation))
        nonce = invitation.nonce
    # A resend right away mails nothing and keeps the link that was mailed.
    web.get("/team")
    answer = web.post(f"/team/invitations/{invitation.id}/resend", follow_redirects=True)
    assert "a moment ago" in answer.get_data(as_text=True)
    assert len(factories.mails(app, "dev@example.com", "invitation")) == 1
    with app.app_context():
        assert db.session.get(Invitation, invitation.id).nonce == nonce
    # A second invitation of the same address is refused: resend the first.
    again = invite(web, "dev@example.com")
    assert again.status_code == 400 and "has an invitation already" in again.get_data(as_text=True)
    # Someone already in the team is not invited.
    assert "in this team already" in invite(web, "owner@example.com").get_data(as_text=True)
    # A form that is not one plain address changes nothing.
    assert invite(web, '"x" <dev2@example.com>').status_code == 400
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Invitation)) == 1


def test_a_personal_team_takes_no_invitations(app, web):
    factories.signed_up(app, web, "solo@example.com")
    page = web.get("/team").get_data(as_text=True)
    assert "Invite someone" not in page and "Make a team" in page
    assert invite(web, "friend@example.com").status_code == 403
    assert factories.mails(app, "friend@example.com") == []


# Switching


def test_a_person_in_two_teams_switches_and_every_page_shows_that_teams_money(app, web):
    team_id = acme(app, web, credits=1234)
    web.get("/account")
    personal = web.post(
        "/teams/switch", {"team": factories.team_of(app, member(app, team_id, "owner@example.com").user_id)}
    )
    assert personal.status_code == 302
    assert header_team(web) == "Personal" and 'id="balance">0 <small>' in web.get("/").get_data(as_text=True)
    account = web.get("/account").get_data(as_text=True)
    assert "Work on Acme" in account and "current" in account
    web.post("/teams/switch", {"team": team_id})
    assert header_team(web) == "Acme" and "1,234" in web.get("/").get_data(as_text=True)
    assert "1,234" in web.get("/billing").get_data(as_text=True)
    # Not theirs: 404, and they stay where they were.
    stranger = factories.customer(app)
    assert web.post("/teams/switch", {"team": stranger.team_id}).status_code == 404
    assert header_team(web) == "Acme"


# Removal and leaving


def test_removing_a_member_revokes_their_keys_at_once_and_keeps_their_usage_under_their_name(app, web):
    team_id = acme(app, web)
    dev = joined(app, team_id, "dev@example.com")
    secret = new_key(app, dev)
    client = app.test_client()
    assert client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"}).get_json()["balance"] == 1000
    with app.app_context():
        key = db.session.scalar(select(ApiKey).where(ApiKey.team_id == team_id))
        factories.charge_speech(team_id, 40, made_by_id=key.created_by_id, key_id=key.id)
        db.session.commit()
        prefix = key.prefix

    web.get("/team")
    removal = web.post(f"/team/members/{member(app, team_id, 'dev@example.com').id}/remove", follow_redirects=True)
    assert "dev@example.com is no longer in Acme; 1 key(s) they made are revoked." in removal.get_data(as_text=True)
    refused = client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 401 and refused.get_json()["detail"] == "This API key has been revoked."
    # Their next page is their personal team's; Acme's pages are closed to them.
    assert header_team(dev) == "Personal"
    assert dev.post("/teams/switch", {"team": team_id}).status_code == 404
    # What they spent stays under their name: usage, its CSV, the ledger's CSV.
    assert "dev@example.com" in web.get("/usage").get_data(as_text=True)
    [row] = csv.DictReader(io.StringIO(web.get("/usage.csv").get_data(as_text=True)))
    assert (row["member"], row["key"], row["credits"]) == ("dev@example.com", prefix + "…", "40")
    debit = next(
        row
        for row in csv.DictReader(io.StringIO(web.get("/ledger.csv").get_data(as_text=True)))
        if row["kind"] == "debit"
    )
    assert (debit["member"], debit["key"]) == ("dev@example.com", prefix + "…")
    with app.app_context():
        assert not audit().problems


def test_a_stream_running_when_its_member_is_removed_finishes_and_is_paid(gateway):
    gate = threading.Event()
    upstream = FakeUpstream([b"ID3first-part", b"second-part"], gate=gate)
    app, url = gateway(upstream)
    web = factories.WebClient(app.test_client())
    team_id = acme(app, web)
    dev = joined(app, team_id, "dev@example.com")
    secret = new_key(app, dev)
    body = {"model": "kokoro", "input": "Hello from the team.", "voice": "af_sky"}
    headers = {"Authorization": f"Bearer {secret}"}
    with requests.post(f"{url}/v1/audio/speech", json=body, headers=headers, stream=True, timeout=10) as response:
        chunks = response.iter_content(chunk_size=None)
        assert next(chunks) == b"ID3first-part"
        with app.app_context():
            owner = db.session.scalar(
                select(Membership).where(Membership.team_id == team_id, Membership.role == "owner")
            )
            leaving = db.session.scalar(
                select(Membership).join(User).where(Membership.team_id == team_id, User.email == "dev@example.com")
            )
            teams.remove(owner, leaving)
            db.session.commit()
        gate.set()
        assert b"".join(chunks) == b"second-part"
    wait_for(lambda: [s.state for s in factories.speech_requests(app, team_id)] == ["delivered"])
    assert factories.balance(app, team_id) == 1000 - len(body["input"])
    again = requests.post(f"{url}/v1/audio/speech", json=body, headers=headers, timeout=10)
    assert again.status_code == 401
    assert len(upstream.received) == 1


def test_the_last_owner_cannot_leave_be_removed_or_demoted(app, web):
    team_id = acme(app, web)
    web.get("/team")
    me = member(app, team_id, "owner@example.com")
    leave = web.post("/team/leave")
    assert leave.status_code == 403 and "A team needs an owner" in leave.get_data(as_text=True)
    web.get("/team")
    assert web.post(f"/team/members/{me.id}/role", {"role": "admin"}).status_code == 403
    assert member(app, team_id, "owner@example.com").role == "owner"
    # With a second owner, the first may step down, then leave.
    joined(app, team_id, "second@example.com", "owner")
    web.get("/team")
    assert web.post(f"/team/members/{me.id}/role", {"role": "admin"}).status_code == 302
    web.get("/team")
    assert web.post("/team/leave").status_code == 302
    assert member(app, team_id, "owner@example.com") is None
    assert member(app, team_id, "second@example.com").role == "owner"


def test_two_owners_stepping_down_at_once_leave_the_team_one(app, web, postgres_only):
    """PostgreSQL: each change of an owner takes the team's row first, so the second waits and is refused."""
    team_id = acme(app, web)
    joined(app, team_id, "second@example.com", "owner")
    barrier = threading.Barrier(2)
    outcomes = []

    def step_down(email):
        with app.app_context():
            mine = db.session.scalar(
                select(Membership).join(User).where(Membership.team_id == team_id, User.email == email)
            )
            barrier.wait()
            try:
                teams.change_role(mine, mine, TeamRole.ADMIN)
                db.session.commit()
                outcomes.append("stepped down")
            except teams.TeamError:
                db.session.rollback()
                outcomes.append("refused")

    threads = [
        threading.Thread(target=step_down, args=(email,)) for email in ("owner@example.com", "second@example.com")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "stepped down"]
    with app.app_context():
        owners = db.session.scalar(
            select(func.count()).where(Membership.team_id == team_id, Membership.role == TeamRole.OWNER)
        )
        assert owners == 1


def test_deleting_the_account_of_a_teams_only_owner_is_refused_until_someone_else_owns_it(app, web):
    team_id = acme(app, web)
    dev = joined(app, team_id, "dev@example.com")
    web.get("/account")
    form = {"current": PASSWORD, "understood": "y"}
    refused = web.post("/account/delete", form)
    assert refused.status_code == 400 and "only owner of the team Acme" in refused.get_data(as_text=True)
    assert accounts_left(app) == {"owner@example.com", "dev@example.com"}
    # The developer's own deletion takes them out of Acme; their keys go too.
    dev.get("/account")
    assert dev.post("/account/delete", form).status_code == 302
    assert member(app, team_id, "dev@example.com") is None
    with app.app_context():
        assert not audit().problems


def accounts_left(app) -> set[str]:
    with app.app_context():
        return set(db.session.scalars(select(User.email).where(User.deleted_at.is_(None))))


def test_a_closed_team_takes_no_more_work_and_keeps_its_books(app, web):
    team_id = acme(app, web)
    dev = joined(app, team_id, "dev@example.com")
    secret = new_key(app, dev)
    web.get("/team")
    closing = web.post("/team/close", follow_redirects=True)
    assert "The team Acme is closed" in closing.get_data(as_text=True)
    assert app.test_client().get("/v1/balance", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert header_team(web) == "Personal" and header_team(dev) == "Personal"
    assert web.post("/teams/switch", {"team": team_id}).status_code == 404
    assert factories.balance(app, team_id) == 1000
    with app.app_context():
        assert not audit().problems


def test_a_team_with_a_checkout_still_open_is_not_closed(app, web):
    """Its payment would credit a team nobody works on any more."""
    team_id = acme(app, web)
    with app.app_context():
        payment = factories.starter_payment(team_id, "cs_open")
        db.session.commit()
        payment_id = payment.id
    web.get("/team")
    refused = web.post("/team/close")
    assert refused.status_code == 403 and "is still open at Stripe" in refused.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(Team, team_id).closed_at is None
        db.session.get(Payment, payment_id).status = "expired"
        db.session.commit()
    web.get("/team")
    assert web.post("/team/close").status_code == 302
    with app.app_context():
        assert db.session.get(Team, team_id).closed_at is not None


def test_a_buyer_who_switched_team_still_sees_their_payment_come_back_from_checkout(app, web):
    team_id = acme(app, web)
    with app.app_context():
        factories.starter_payment(team_id, "cs_acme")
        db.session.commit()
    owner_id = member(app, team_id, "owner@example.com").user_id
    web.get("/account")
    web.post("/teams/switch", {"team": factories.team_of(app, owner_id)})
    page = web.get("/billing/success?session_id=cs_acme")
    assert page.status_code == 200
    # Another team's payment, bought by someone else, stays out of sight.
    stranger = factories.customer(app)
    with app.app_context():
        factories.starter_payment(stranger.team_id, "cs_theirs")
        db.session.commit()
    assert web.get("/billing/success?session_id=cs_theirs").status_code == 404


# Who did what


def test_a_developer_sees_their_own_usage_and_those_who_see_everyones_can_filter_by_member(app, web):
    team_id = acme(app, web)
    dev = joined(app, team_id, "dev@example.com")
    with app.app_context():
        owner_id, dev_id = (member(app, team_id, email).user_id for email in ("owner@example.com", "dev@example.com"))
        factories.charge_speech(team_id, 11, made_by_id=owner_id)
        factories.charge_speech(team_id, 22, made_by_id=dev_id)
        db.session.commit()

    def credits(browser, path):
        return sorted(row["credits"] for row in csv.DictReader(io.StringIO(browser.get(path).get_data(as_text=True))))

    assert credits(dev, "/usage.csv") == ["22"]
    # Asking for another member's rows gives a developer their own still.
    assert credits(dev, f"/usage.csv?member={owner_id}") == ["22"]
    assert "owner@example.com" not in dev.get("/usage").get_data(as_text=True)
    assert credits(web, "/usage.csv") == ["11", "22"]
    assert credits(web, f"/usage.csv?member={dev_id}") == ["22"]
    assert 'id="member"' in web.get("/usage").get_data(as_text=True)


def test_an_admin_sees_every_key_with_its_maker_a_developer_only_their_own(app, web):
    team_id = acme(app, web)
    dev = joined(app, team_id, "dev@example.com")
    new_key(app, dev)
    new_key(app, web)
    keys_seen_by_owner = web.get("/keys").get_data(as_text=True)
    assert "Made by" in keys_seen_by_owner and keys_seen_by_owner.count("Revoke</a>") == 2
    assert "dev@example.com" in keys_seen_by_owner
    assert dev.get("/keys").get_data(as_text=True).count("Revoke</a>") == 1
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(ApiKey.team_id == team_id)) == 2
        assert (
            db.session.scalar(select(func.count()).select_from(OutboxMail).where(OutboxMail.kind == "invitation")) == 1
        )


def test_migration_0011_goes_back_with_invitations_pending_but_not_while_a_team_is_closed(app, web, caplog):
    team_id = acme(app, web)
    invite(web, "dev@example.com")
    with app.app_context():
        downgrade(revision="0010")
        assert db.session.scalar(text("SELECT version_num FROM alembic_version")) == "0010"
        upgrade()
        assert db.session.scalar(select(Team.balance).where(Team.id == team_id)) == 1000
        db.session.get(Team, team_id).closed_at = utcnow()
        db.session.commit()
        with pytest.raises(SystemExit):
            downgrade(revision="0010")
        assert "1 teams are closed or disabled" in caplog.text
        db.session.rollback()
        # Read as the schema stands: on SQLite the later migrations went back before 0011 refused.
        closed_at = db.session.scalar(text("SELECT closed_at FROM teams WHERE id = :id"), {"id": team_id})
        assert closed_at is not None


# What a change of role or membership takes with it


@pytest.mark.parametrize(
    "name", ["Acme\r\nBcc: victim@example.com", "Acme\n\nClick here", "Acme\u202eevil", "Acme\x00"]
)
def test_a_team_name_is_one_line_of_plain_text(app, web, name):
    factories.signed_up(app, web, "owner@example.com")
    web.get("/team")
    answer = web.post("/teams", {"name": name})
    assert answer.status_code == 400
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Team)) == 1


def test_a_member_moved_to_billing_keeps_no_key(app, web):
    team_id = acme(app, web)
    dev = joined(app, team_id, "dev@example.com")
    secret = new_key(app, dev)
    headers = {"Authorization": f"Bearer {secret}"}
    assert app.test_client().get("/v1/balance", headers=headers).status_code == 200
    web.get("/team")
    changed = web.post(
        f"/team/members/{member(app, team_id, 'dev@example.com').id}/role", {"role": "billing"}, follow_redirects=True
    )
    assert "the 1 key(s) they made are revoked (a billing has none)" in changed.get_data(as_text=True)
    assert app.test_client().get("/v1/balance", headers=headers).status_code == 401
    # Back to developer: the old key stays revoked; a new one works.
    web.get("/team")
    web.post(f"/team/members/{member(app, team_id, 'dev@example.com').id}/role", {"role": "developer"})
    assert app.test_client().get("/v1/balance", headers=headers).status_code == 401


@pytest.mark.parametrize("then", ["removed", "demoted"])
def test_an_invitation_goes_with_the_power_of_whoever_sent_it(app, web, then):
    team_id = acme(app, web)
    admin = joined(app, team_id, "admin@example.com", "admin")
    invite(admin, "friend@example.com", "admin")
    link = factories.mail_link(app, "friend@example.com", "invitation")
    web.get("/team")
    sender = member(app, team_id, "admin@example.com").id
    if then == "removed":
        web.post(f"/team/members/{sender}/remove")
    else:
        web.post(f"/team/members/{sender}/role", {"role": "developer"})
    visitor = factories.WebClient(app.test_client())
    assert visitor.get(link).status_code == 404
    assert visitor.post(link, {"password": PASSWORD, "confirm": PASSWORD}).status_code in (400, 404)
    assert member(app, team_id, "friend@example.com") is None
    with app.app_context():
        assert accounts.find_by_email("friend@example.com") is None


def test_an_invitation_whose_sender_lost_the_power_to_give_it_is_refused_at_accept(app, web):
    """Should an invitation stay pending (written before senders' invitations were cancelled with them),
    accepting checks the sender still may give its role."""
    team_id = acme(app, web)
    admin = joined(app, team_id, "admin@example.com", "admin")
    invite(admin, "friend@example.com", "admin")
    link = factories.mail_link(app, "friend@example.com", "invitation")
    with app.app_context():
        db.session.execute(
            update(Membership)
            .where(Membership.id == member(app, team_id, "admin@example.com").id)
            .values(role=TeamRole.DEVELOPER)
        )
        db.session.commit()
    visitor = factories.WebClient(app.test_client())
    visitor.get(link)
    answer = visitor.post(link, {"password": PASSWORD, "confirm": PASSWORD}, follow_redirects=True)
    assert "can no longer give it" in answer.get_data(as_text=True)
    assert member(app, team_id, "friend@example.com") is None
    with app.app_context():
        assert accounts.find_by_email("friend@example.com") is None


def test_accepting_an_invitation_confirms_the_address_it_was_sent_to(app, web):
    team_id = acme(app, web)
    invitee = factories.WebClient(app.test_client())
    invitee.register("dev@example.com")  # never opened the verification mail
    invite(web, "dev@example.com")
    link = factories.mail_link(app, "dev@example.com", "invitation")
    invitee.login("dev@example.com", next_url=link)
    invitee.get(link)
    assert invitee.post(link).status_code == 302
    with app.app_context():
        assert accounts.find_by_email("dev@example.com").verified
    assert member(app, team_id, "dev@example.com").role == "developer"
