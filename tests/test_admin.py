"""The admin console: only admins see it; every action is ledgered or logged, CSRF-protected."""

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app import accounts, billing, keys, teams
from app.extensions import db
from app.models import AdminAction, SpeechRequest, Team, TeamRole, User, utcnow
from tests import factories
from tests.stripe_helpers import checkout_session, deliver, event

PASSWORD = "correct horse battery"


@pytest.fixture
def admin(app, runner):
    runner.invoke(args=["users", "create", "boss@example.com", "--password", PASSWORD])
    result = runner.invoke(args=["users", "admin", "boss@example.com", "--on"])
    assert "is now an admin" in result.output
    web = factories.WebClient(app.test_client())
    web.login("boss@example.com")
    return web


@pytest.fixture
def shopper(app):
    """A customer with 1,000 credits, a key, a paid starter pack and two speech requests."""
    customer = factories.customer(app, balance=1000, password=PASSWORD)
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_test_admin", payment_intent_id="pi_admin")
        db.session.commit()
    paid = checkout_session(customer.team_id, "cs_test_admin", payment_intent="pi_admin")
    assert deliver(app.test_client(), event("checkout.session.completed", paid)).status_code == 200
    factories.charged(app, customer.team_id, count=2, characters=40)
    return customer


def actions(app):
    with app.app_context():
        return [(row.action, row.details) for row in db.session.scalars(select(AdminAction).order_by(AdminAction.id))]


def test_the_console_is_not_there_for_anyone_but_admins(app, web, shopper):
    for path in (
        "/admin",
        "/admin/users?q=a",
        f"/admin/users/{shopper.user_id}",
        "/admin/teams?q=a",
        f"/admin/teams/{shopper.team_id}",
        "/admin/payments",
        "/admin/audit",
    ):
        assert app.test_client().get(path).status_code == 404
    web.login(shopper.email)
    assert web.get("/admin").status_code == 404
    assert web.post(f"/admin/teams/{shopper.team_id}/unlimited").status_code == 404
    assert web.get(f"/admin/teams/{shopper.team_id}").status_code == 404
    assert "Admin" not in web.get("/keys").get_data(as_text=True).split("</nav>")[0]


def test_an_admin_finds_a_customer_and_sees_their_money_on_one_page(app, admin, shopper):
    found = admin.get("/admin/users?q=CUSTOMER").get_data(as_text=True)
    assert f'href="/admin/users/{shopper.user_id}">{shopper.email}</a>' in found
    person = admin.get(f"/admin/users/{shopper.user_id}").get_data(as_text=True)
    assert f'href="/admin/teams/{shopper.team_id}">{shopper.team_id}: Personal</a>' in person
    page = admin.get(f"/admin/teams/{shopper.team_id}").get_data(as_text=True)
    assert "10,920" in page  # 1,000 + 10,000 − 2 × 40
    assert "cs_test_admin" in page and "pi_admin" in page and '<span class="tag paid">paid</span>' in page
    assert page.count('data-label="Voice"') == 2 and "topup" in page and "kp_live_" in page
    # Each key's use, as its own page shows it: the two requests of 40 credits, its whole life.
    assert '<td data-label="Spent" class="num">80 <small class="muted">spent in all</small></td>' in page


def test_grants_and_deductions_are_ledgered_with_the_reason_and_the_admin(app, admin, shopper):
    url = f"/admin/teams/{shopper.team_id}/credits"
    admin.get(f"/admin/teams/{shopper.team_id}")
    admin.post(url, {"direction": "grant", "amount": "500", "reason": "Sorry for the outage"})
    admin.get(f"/admin/teams/{shopper.team_id}")
    too_much = admin.client.post(
        url,
        data={"direction": "deduct", "amount": "99999", "reason": "x", "csrf_token": admin.token},
        follow_redirects=True,
    )
    assert "cannot be deducted. Nothing changed." in too_much.get_data(as_text=True)
    admin.post(url, {"direction": "deduct", "amount": "20", "reason": "Goodwill taken back"})
    assert factories.ledger_notes(app, shopper.team_id)[-2:] == [
        ("grant", 500, "Sorry for the outage (by admin boss@example.com)"),
        ("deduction", -20, "Goodwill taken back (by admin boss@example.com)"),
    ]
    assert factories.balance(app, shopper.team_id) == 10_920 + 500 - 20
    assert actions(app) == [
        ("grant", "500 credits: Sorry for the outage"),
        ("deduct", "20 credits: Goodwill taken back"),
    ]
    # Without its CSRF token nothing happens; a bad amount is refused.
    assert admin.post(url, {"direction": "grant", "amount": "5", "reason": "forged"}, csrf=False).status_code == 400
    admin.get(f"/admin/teams/{shopper.team_id}")
    admin.post(url, {"direction": "grant", "amount": "-5", "reason": "negative"})
    assert factories.balance(app, shopper.team_id) == 11_400 and len(actions(app)) == 2
    factories.assert_books_balance(app, shopper.team_id)


def test_unlimited_revoke_and_disable_take_effect_at_once(app, admin, shopper):
    api = app.test_client()
    assert api.get("/v1/balance", headers=shopper.headers).json["unlimited"] is False
    admin.get(f"/admin/teams/{shopper.team_id}")
    admin.post(f"/admin/teams/{shopper.team_id}/unlimited")
    assert api.get("/v1/balance", headers=shopper.headers).json["unlimited"] is True

    customer_web = factories.WebClient(app.test_client())
    customer_web.login(shopper.email)
    admin.get(f"/admin/users/{shopper.user_id}")
    admin.post(f"/admin/users/{shopper.user_id}/disabled")
    refused = api.get("/v1/balance", headers=shopper.headers)
    assert refused.status_code == 401
    assert refused.json["detail"] == "This account is disabled. Contact the operator of this service."
    assert customer_web.get("/keys").status_code == 302  # signed out
    assert customer_web.login(shopper.email).status_code == 403
    admin.get(f"/admin/users/{shopper.user_id}")
    admin.post(f"/admin/users/{shopper.user_id}/disabled")
    assert api.get("/v1/balance", headers=shopper.headers).status_code == 200
    assert customer_web.login(shopper.email).status_code == 302

    admin.get(f"/admin/users/{shopper.user_id}")
    admin.post(f"/admin/keys/{shopper.key_id}/revoke")
    assert api.get("/v1/balance", headers=shopper.headers).status_code == 401
    assert [action for action, _ in actions(app)] == ["unlimited on", "disable", "enable", "revoke key"]


def test_payments_and_charged_requests_are_listed_and_stale_ones_settled(app, admin, shopper):
    payments = admin.get("/admin/payments").get_data(as_text=True)
    assert "cs_test_admin" in payments and "pi_admin" in payments and "$5.00" in payments
    alive = app.extensions["lease"].process_id()
    with app.app_context():
        # Both quiet for an hour: one request's worker died; the other's process is alive (a paused reader).
        stale, live = db.session.scalars(select(SpeechRequest.id).where(SpeechRequest.team_id == shopper.team_id))
        db.session.execute(
            update(SpeechRequest)
            .where(SpeechRequest.id.in_([stale, live]))
            .values(created_at=utcnow() - timedelta(hours=1))
        )
        db.session.execute(update(SpeechRequest).where(SpeechRequest.id == live).values(process_id=alive))
        db.session.commit()
    page = admin.get("/admin/charged").get_data(as_text=True)
    assert stale in page and live in page
    rows = {row.split("<code>")[1].split("</code>")[0]: row for row in page.split("<tr>")[2:]}
    assert ">gone</td>" in rows[stale] and ">alive</td>" in rows[live]
    admin.post("/admin/charged/settle")
    assert "settled 1, refunding 40 credits" in admin.get("/admin/charged").get_data(as_text=True)
    states = {row.id: row.state for row in factories.speech_requests(app, shopper.team_id)}
    assert states == {stale: "refunded", live: "charged"}
    assert actions(app) == [("settle", "1 stale, 1 settled, 40 credits refunded")]


def test_the_audit_page_runs_the_audits_checks(app, admin, shopper):
    assert 'data-state="passed"' in admin.get("/admin/audit").get_data(as_text=True)
    with app.app_context():
        db.session.execute(update(Team).where(Team.id == shopper.team_id).values(balance=Team.balance + 7))
        db.session.commit()
    page = admin.get("/admin/audit").get_data(as_text=True)
    assert 'data-state="failed"' in page and f"team {shopper.team_id}" in page


def test_totals_per_day(app, admin, shopper):
    page = admin.get("/admin").get_data(as_text=True)
    today = page.split("<tbody>")[1].split("</tr>")[0]
    for cell in ('data-label="Credits sold" class="num">10,000', "$5.00", 'data-label="Credits spent" class="num">80'):
        assert cell in today
    assert 'data-label="Requests" class="num">2' in today and 'data-label="Failures" class="num">0' in today


def test_the_admin_log_cannot_be_changed_from_the_console(app, admin, shopper):
    admin.get(f"/admin/teams/{shopper.team_id}")
    admin.post(f"/admin/teams/{shopper.team_id}/unlimited")
    log = admin.get("/admin/log").get_data(as_text=True)
    assert "boss@example.com" in log and "unlimited on" in log
    for method in ("post", "put", "delete"):
        assert getattr(admin.client, method)("/admin/log").status_code == 405


@pytest.mark.parametrize(
    "path",
    [
        "/admin/users?q=%C2%B2",
        "/admin/users?q=99999999999999999999",
        "/admin/users?q=2147483648",
        "/admin/teams?q=%C2%B2",
        "/admin/teams?q=99999999999999999999",
        "/admin/teams?q=100%25",
        "/admin/payments?page=99999999999999999999",
        "/admin/payments?page=%C2%B2",
        "/admin/log?page=-1",
        "/admin/log?page=0&per_page=99999999999999999999",
    ],
)
def test_an_admin_filter_the_database_cannot_hold_is_ignored_not_a_500(app, admin, shopper, path):
    response = admin.get(path)
    assert response.status_code == 200


def test_an_admin_search_for_a_control_character_is_refused_with_400(app, admin, shopper):
    response = admin.get("/admin/users?q=a%00b")
    assert response.status_code == 400 and "control character" in response.get_data(as_text=True)


def test_an_id_too_big_for_the_database_in_a_path_is_404_not_a_500(app, admin, shopper, web):
    assert admin.get("/admin/users/99999999999999999999").status_code == 404
    assert admin.get("/admin/teams/99999999999999999999").status_code == 404
    web.login(shopper.email, PASSWORD)
    assert web.get("/keys/99999999999999999999/revoke").status_code == 404


def acme_with_a_developer(app, shopper):
    """A shared team Acme (the shopper owns it) with 500 credits and a developer, dev@example.com, who spent
    30 credits through a key of theirs; (team id, the developer's key secret, its prefix)."""
    with app.app_context():
        owner = db.session.get(User, shopper.user_id)
        acme = teams.create("Acme", owner)
        dev = accounts.create_user("dev@example.com")
        db.session.flush()
        teams.add_member(acme, dev, TeamRole.DEVELOPER)
        billing.grant(acme, 500, "test credits")
        key, secret = keys.create_key(acme, dev, "dev laptop")
        db.session.flush()
        factories.charge_speech(acme.id, 30, made_by_id=dev.id, key_id=key.id)
        db.session.commit()
        return acme.id, secret, key.prefix


def test_an_admin_finds_a_team_by_name_or_member_and_sees_who_did_what(app, admin, shopper):
    team_id, _, prefix = acme_with_a_developer(app, shopper)
    for query in ("acm", "dev@example", str(team_id)):
        found = admin.get(f"/admin/teams?q={query}").get_data(as_text=True)
        assert f'href="/admin/teams/{team_id}">Acme</a>' in found, query
    page = admin.get(f"/admin/teams/{team_id}").get_data(as_text=True)
    # The admin's own (empty) team is in the balance banner; every form on the page acts on Acme.
    assert 'id="balance-banner"' in page and 'id="balance">470 <small>' in page
    assert f'action="/admin/teams/{team_id}/credits"' in page and f'action="/admin/teams/{team_id}/unlimited"' in page
    members = page.split('id="team-members"')[1].split("</table>")[0]
    assert "dev@example.com</a></td>" in members and ">developer<" in members and shopper.email in members
    keys_table = page.split('id="customer-keys"')[1].split("</table>")[0]
    assert f"<code>{prefix}…</code>" in keys_table and 'data-label="Made by">dev@example.com' in keys_table
    assert 'data-label="Member">dev@example.com' in page  # the request
    assert f'data-label="By">dev@example.com <code>{prefix}…</code>' in page  # its ledger row
    assert "470" in page
    # The person's page lists both their teams.
    person = admin.get(f"/admin/users/{shopper.user_id}").get_data(as_text=True)
    assert f"{shopper.team_id}: Personal" in person and f"{team_id}: Acme" in person


def test_a_disabled_team_s_keys_get_401_until_it_is_enabled(app, admin, shopper):
    team_id, secret, _ = acme_with_a_developer(app, shopper)
    api = app.test_client()
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.get("/v1/balance", headers=headers).json["balance"] == 470
    admin.get(f"/admin/teams/{team_id}")
    admin.post(f"/admin/teams/{team_id}/disabled")
    refused = api.get("/v1/balance", headers=headers)
    assert refused.status_code == 401
    assert refused.json["detail"] == "This key's team is disabled. Contact the operator of this service."
    # The owner's personal team is not touched; the playground refuses for Acme.
    assert api.get("/v1/balance", headers=shopper.headers).status_code == 200
    owner = factories.WebClient(app.test_client())
    owner.login(shopper.email, PASSWORD)
    owner.get("/account")
    owner.post("/teams/switch", {"team": team_id})
    owner.get("/playground")
    speech = {"input": "Hello.", "voice": "af_sky"}
    spoken = owner.client.post("/playground/speech", json=speech, headers={"X-CSRFToken": owner.token})
    assert spoken.status_code == 403 and spoken.json["error"]["code"] == "team_disabled"
    admin.get(f"/admin/teams/{team_id}")
    admin.post(f"/admin/teams/{team_id}/disabled")
    assert api.get("/v1/balance", headers=headers).status_code == 200
    with app.app_context():
        logged = db.session.scalars(select(AdminAction).where(AdminAction.team_id == team_id)).all()
        assert [row.action for row in logged] == ["disable team", "enable team"]
