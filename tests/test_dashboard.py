"""The dashboard through Flask's test client: accounts, CSRF, keys shown once, usage."""

import csv
import io
import re
from unittest.mock import ANY

import pytest
from sqlalchemy import func, select

from app import metering
from app.extensions import db
from app.models import Team, User
from tests import factories

PASSWORD = "correct horse battery"


def user_count(app):
    with app.app_context():
        return db.session.scalar(select(func.count(User.id)))


def signed_in(web, app, email="owner@example.com", balance=0):
    factories.customer(app, balance=balance)  # someone else, so ids differ
    return factories.signed_up(app, web, email, balance)


# Accounts


def test_sign_up_verify_and_sign_in(app, web):
    response = web.signup("Someone@Example.com")
    assert response.status_code == 302 and response.headers["Location"] == "/"
    page = web.get("/").get_data(as_text=True)
    assert "0 <small>credits</small>" in page and "Sign out" in page
    with app.app_context():
        user = db.session.scalar(select(User))
        assert user.email == "someone@example.com"
        assert user.password_hash.startswith("scrypt:") and PASSWORD not in user.password_hash


@pytest.mark.parametrize(
    "email,password,confirm,error",
    [
        ("not-an-email", PASSWORD, PASSWORD, "Enter one plain email address, like name@example.com."),
        ("a@example.com", "short", "short", "Use at least 10 characters."),
        ("a@example.com", PASSWORD, PASSWORD + "!", "The passwords do not match."),
        ("", PASSWORD, PASSWORD, "This field is required."),
    ],
)
def test_sign_up_errors_are_shown_and_create_nothing(app, web, email, password, confirm, error):
    web.get("/signup")
    response = web.post("/signup", {"email": email, "password": password, "confirm": confirm})
    assert response.status_code == 400 and error in response.get_data(as_text=True)
    assert user_count(app) == 0


def test_duplicate_emails_make_no_second_account_case_insensitively(app, web):
    web.signup("dup@example.com")
    web.logout()
    response = web.register("DUP@example.COM")
    assert "Check your inbox" in response.get_data(as_text=True)
    assert user_count(app) == 1


def test_a_form_without_its_csrf_token_is_refused(app, web):
    web.get("/signup")
    response = web.post("/signup", {"email": "a@example.com", "password": PASSWORD, "confirm": PASSWORD}, csrf=False)
    assert response.status_code == 400 and "CSRF" in response.get_data(as_text=True)
    assert user_count(app) == 0


def test_a_forged_csrf_token_is_refused(app, web):
    web.get("/signup")
    web.token = "forged"
    response = web.post("/signup", {"email": "a@example.com", "password": PASSWORD, "confirm": PASSWORD})
    assert response.status_code == 400
    assert user_count(app) == 0


def test_sign_in_and_out(app, web):
    web.signup("me@example.com")
    web.get("/")
    assert web.logout().headers["Location"] == "/login"
    assert web.get("/keys").status_code == 302
    assert "Wrong email or password." in web.login("me@example.com", "wrong password").get_data(as_text=True)
    assert web.login("ME@example.com").status_code == 302
    assert web.get("/keys").status_code == 200


def test_sign_out_needs_the_csrf_token(web):
    web.signup("me@example.com")
    web.post("/logout", csrf=False)
    assert web.get("/keys").status_code == 200


@pytest.mark.parametrize(
    "target,expected",
    [
        ("/usage", "/usage"),
        ("//evil.example/steal", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
    ],
)
def test_next_redirects_only_within_this_site(web, target, expected):
    web.signup("me@example.com")
    web.logout()
    response = web.login("me@example.com", next_url=target)
    assert response.headers["Location"] == expected


def test_pages_need_a_signed_in_user(client):
    for path in ("/keys", "/usage", "/ledger", "/usage.csv", "/ledger.csv", "/billing", "/account", "/playground"):
        response = client.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith("/login?next=")


def test_session_cookies_are_httponly_lax_and_secure_when_configured(make_app):
    for secure in (False, True):
        web = factories.WebClient(make_app(SESSION_COOKIE_SECURE=secure).test_client())
        web.signup(f"cookie{secure}@example.com")
        cookie = web.client.get_cookie("session")
        assert cookie.http_only and cookie.same_site == "Lax" and cookie.secure is secure


def test_pages_carry_security_headers(client):
    response = client.get("/login")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in response.get_data(as_text=True)


# Keys


def create_key(web, name="laptop"):
    """The answer to the create-key form: the page with the secret, in that one response."""
    web.get("/keys")
    response = web.post("/keys", {"name": name})
    assert response.status_code == 200
    return response


def test_a_new_key_is_shown_exactly_once_and_works(app, web):
    signed_in(web, app, balance=50)
    page = create_key(web).get_data(as_text=True)
    secret = re.search(r'id="new-key">(kp_live_[A-Za-z0-9_-]{43})<', page).group(1)
    response = app.test_client().get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})
    assert response.get_json() == {"balance": 50, "unlimited": False, "key": ANY}
    # Reloading, going back, or the list never show it again.
    again = web.get("/keys/created", follow_redirects=True).get_data(as_text=True)
    assert secret not in again and "shown only once" in again
    listing = web.get("/keys").get_data(as_text=True)
    assert secret not in listing and secret[:12] in listing and "laptop" in listing


def test_the_key_pages_are_not_cached(app, web):
    signed_in(web, app)
    assert create_key(web).headers["Cache-Control"] == "no-store"


def test_revoke_asks_first_then_the_key_gets_401(app, web):
    signed_in(web, app)
    secret = re.search(r"kp_live_[A-Za-z0-9_-]{43}", create_key(web).get_data(as_text=True)).group(0)
    listing = web.get("/keys").get_data(as_text=True)
    revoke_url = re.search(r'href="(/keys/\d+/revoke)"', listing).group(1)
    assert "cannot be undone" in web.get(revoke_url).get_data(as_text=True)
    assert web.post(revoke_url).headers["Location"] == "/keys"
    assert "revoked" in web.get("/keys").get_data(as_text=True)
    response = app.test_client().get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 401


def test_another_users_key_is_404_and_untouched(app, web):
    other = factories.customer(app, balance=10)
    signed_in(web, app)
    web.get("/keys")
    assert web.get(f"/keys/{other.key_id}/revoke").status_code == 404
    assert web.post(f"/keys/{other.key_id}/revoke").status_code == 404
    assert app.test_client().get("/v1/balance", headers=other.headers).status_code == 200


# Balance, ledger, usage


def add_usage(app, user_id, count):
    with app.app_context():
        for index in range(count):
            speech = factories.charge_speech(user_id, characters=3)
            if index % 2:
                metering.refund_speech(speech.id, "upstream down")
            else:
                metering.mark_delivered(speech.id, bytes_sent=100)
        db.session.commit()


def test_home_shows_balance_ledger_and_usage_of_this_user_only(app, web):
    other = factories.customer(app, balance=777)
    add_usage(app, other.team_id, 1)
    team_id = signed_in(web, app, balance=100)
    create_key(web)
    add_usage(app, team_id, 2)
    page = web.get("/").get_data(as_text=True)
    assert "97 <small>credits</small>" in page  # one delivered, one refunded
    assert "welcome" in page and "refund" in page and "debit" in page
    # Not the other team's balance (a random request id in a link may hold "777": look for the figure).
    assert page.count("af_sky") == 2 and "777 <small>credits</small>" not in page and ">777<" not in page


def test_unlimited_accounts_see_unlimited(app, web):
    team_id = signed_in(web, app)
    with app.app_context():
        db.session.get(Team, team_id).unlimited = True
        db.session.commit()
    assert "Unlimited" in web.get("/").get_data(as_text=True)


def test_usage_is_paginated_and_downloadable_as_csv(app, web):
    other = factories.customer(app, balance=100)
    add_usage(app, other.team_id, 3)
    team_id = signed_in(web, app, balance=1000)
    create_key(web)
    add_usage(app, team_id, 25)
    first = web.get("/usage").get_data(as_text=True)
    assert "Page 1 of 2" in first and first.count("<tr>") == 21
    assert web.get("/usage?page=2").get_data(as_text=True).count("<tr>") == 6
    response = web.get("/usage.csv")
    assert response.mimetype == "text/csv" and "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert len(rows) == 25
    assert {row["state"] for row in rows} == {"delivered", "refunded"}
    assert all(row["characters"] == "3" and row["key"].startswith("kp_live_") for row in rows)
    ledger = web.get("/ledger").get_data(as_text=True)
    assert "Page 1 of 2" in ledger  # a grant, 25 debits, 12 refunds


def test_the_docs_show_this_servers_base_url(make_app):
    client = make_app(PUBLIC_BASE_URL="https://tts.example.com").test_client()
    page = client.get("/docs").get_data(as_text=True)
    assert "curl https://tts.example.com/v1/audio/speech" in page
    assert 'OpenAI(base_url="https://tts.example.com/v1"' in page
    assert "402" in page and "Insufficient credits" in page and "/v1/audio/voices" in page


def test_dashboard_errors_are_html_pages(client):
    response = client.get("/no-such-page")
    assert response.status_code == 404 and response.mimetype == "text/html"


# Filters the pages cannot use are ignored, as if absent (app/usage.py): never a 500.

UNUSABLE_FILTERS = [
    "key=%C2%B2",  # '²' is a digit to str.isdigit, not to int()
    "key=99999999999999999999",  # more than the database's integer holds
    "key=2147483648",
    "key=-1",
    "to=9999-12-31",  # the day after it does not exist
    "page=99999999999999999999",
    "page=%C2%B2",
    "page=0",
    "page=-3",
    "per_page=99999999999999999999",
    "key=%C2%B2&key=1&to=9999-12-31&to=2020-01-01",  # repeated: the first counts
]


@pytest.mark.parametrize("path", ["/usage", "/ledger", "/usage.csv", "/ledger.csv"])
@pytest.mark.parametrize("query", UNUSABLE_FILTERS)
def test_a_filter_the_database_cannot_hold_is_ignored_and_the_page_shows_everything(app, web, path, query):
    team_id = signed_in(web, app, balance=100)
    create_key(web)
    add_usage(app, team_id, 2)
    unfiltered = web.get(path)
    response = web.get(f"{path}?{query}")
    assert response.status_code == 200
    if path.endswith(".csv"):
        assert response.get_data(as_text=True).count("\n") == unfiltered.get_data(as_text=True).count("\n") > 2
    else:
        assert response.get_data(as_text=True).count("<tr>") == unfiltered.get_data(as_text=True).count("<tr>") > 1
