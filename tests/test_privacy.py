"""Accounts, sessions and key secrets stay private: tried as an attacker would.

A key's secret lives only in the response that shows it; sign-out ends a session on the
server; sign-in timing does not tell who has an account; exports cannot carry formulas;
signed-in pages are not cached; unknown keys are throttled; CORS is the operator's choice.
"""

import base64
import csv
import io
import json
import logging
import re
import statistics
import time
import zlib

import pytest
from sqlalchemy import inspect, text

from app.extensions import db
from tests import factories
from tests.test_dashboard import create_key, signed_in

PASSWORD = "correct horse battery"


def session_contents(app, client) -> str:
    """The session cookie as Flask wrote it: signature checked, base64 and zlib undone, as JSON text."""
    cookie = client.get_cookie("session")
    if cookie is None:
        return ""
    serializer = app.session_interface.get_signing_serializer(app)
    serializer.loads(cookie.value)  # raises unless the signature is this app's
    payload = cookie.value
    compressed = payload.startswith(".")
    body = payload.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    return (zlib.decompress(raw) if compressed else raw).decode()


def every_text_in_the_database(app) -> str:
    with app.app_context():
        names = inspect(db.engine).get_table_names()
        return json.dumps(
            [
                [str(value) for value in row]
                for name in names
                for row in db.session.execute(text(f"SELECT * FROM {name}"))
            ]
        )


# 1. A key's secret is in the one response that shows it, and nowhere else


def test_a_new_keys_secret_is_in_no_cookie_session_row_or_log(app, web, caplog):
    caplog.set_level(logging.DEBUG)
    signed_in(web, app)
    before = web.client.get_cookie("session").value
    page = create_key(web).get_data(as_text=True)
    secret = re.search(r'id="new-key">(kp_live_[A-Za-z0-9_-]{43})<', page).group(1)
    after = web.client.get_cookie("session").value
    for value in (before, after):
        web.client.set_cookie("session", value)
        assert secret not in session_contents(app, web.client)
        shown = web.get("/keys/created", follow_redirects=True).get_data(as_text=True)
        assert secret not in shown and "shown only once" in shown
    assert secret not in every_text_in_the_database(app)
    assert secret not in caplog.text


def test_the_secret_page_is_never_cached_and_leaves_no_replayable_address(app, web):
    signed_in(web, app)
    response = create_key(web)
    assert response.headers["Cache-Control"] == "no-store"
    # The page tells the browser to show /keys/created as its address, so a reload asks for that.
    assert 'data-replace-url="/keys/created"' in response.get_data(as_text=True)


# 2. Sign-out ends the session on the server


def sign_in_client(app, email, remember=False):
    web = factories.WebClient(app.test_client())
    web.get("/login")
    data = {"email": email, "password": PASSWORD, **({"remember": "y"} if remember else {})}
    assert web.post("/login", data).status_code == 302
    return web


def signed_in_now(app, cookies: dict) -> bool:
    """Does a browser holding only these cookies get a signed-in page?"""
    client = app.test_client()
    for name, value in cookies.items():
        client.set_cookie(name, value)
    return client.get("/keys").status_code == 200


def cookies_of(web) -> dict:
    return {
        name: web.client.get_cookie(name).value for name in ("session", "remember_token") if web.client.get_cookie(name)
    }


@pytest.fixture
def member(app):
    with app.app_context():
        from app import accounts

        accounts.create_user("member@example.com", PASSWORD)
        db.session.commit()
    return "member@example.com"


def test_sign_out_kills_the_old_session_and_remember_cookies_at_once(app, member):
    web = sign_in_client(app, member, remember=True)
    old = cookies_of(web)
    assert set(old) == {"session", "remember_token"}
    assert signed_in_now(app, old)
    assert signed_in_now(app, {"remember_token": old["remember_token"]})
    web.get("/keys")
    web.post("/logout")
    assert not signed_in_now(app, old)
    assert not signed_in_now(app, {"session": old["session"]})
    assert not signed_in_now(app, {"remember_token": old["remember_token"]})


def test_each_sign_in_gets_a_new_remember_token_and_a_fresh_session(app, member):
    web = factories.WebClient(app.test_client())
    web.get("/login")
    with web.client.session_transaction() as session:
        session["planted"] = "by someone else"
    first = sign_in_client(app, member, remember=True)
    second = sign_in_client(app, member, remember=True)
    assert cookies_of(first)["remember_token"] != cookies_of(second)["remember_token"]
    assert web.post("/login", {"email": member, "password": PASSWORD}).status_code == 302
    assert "planted" not in session_contents(app, web.client)
    # Neither remember token carries the account's id or email.
    for token in (cookies_of(first)["remember_token"], cookies_of(second)["remember_token"]):
        assert "member@example.com" not in token and not token.startswith("1|")


def test_sign_out_everywhere_ends_every_browser(app, member):
    here, there = sign_in_client(app, member, remember=True), sign_in_client(app, member, remember=True)
    theirs = cookies_of(there)
    here.get("/account")
    response = here.post("/account/sign-out-everywhere")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    assert not signed_in_now(app, theirs) and not signed_in_now(app, cookies_of(here))
    assert not signed_in_now(app, {"remember_token": theirs["remember_token"]})


def test_a_password_change_needs_the_current_one_and_signs_out_every_other_browser(app, member):
    here, there = sign_in_client(app, member), sign_in_client(app, member, remember=True)
    theirs = cookies_of(there)
    assert "in 2 browsers." in here.get("/account").get_data(as_text=True)
    wrong = here.post(
        "/account", {"current": "not my password", "password": "a new long password", "confirm": "a new long password"}
    )
    assert "That is not your current password." in wrong.get_data(as_text=True)
    assert signed_in_now(app, theirs)
    here.get("/account")
    done = here.post(
        "/account", {"current": PASSWORD, "password": "a new long password", "confirm": "a new long password"}
    )
    assert done.status_code == 302
    assert signed_in_now(app, cookies_of(here)) and not signed_in_now(app, theirs)
    assert "in 1 browser." in here.get("/account").get_data(as_text=True)
    assert not signed_in_now(app, {"remember_token": theirs["remember_token"]})
    fresh = factories.WebClient(app.test_client())
    fresh.get("/login")
    assert fresh.post("/login", {"email": member, "password": PASSWORD}).status_code == 200
    fresh.get("/login")
    assert fresh.post("/login", {"email": member, "password": "a new long password"}).status_code == 302


# 3. Sign-in costs the same for known and unknown emails


def test_sign_in_takes_as_long_for_an_unknown_email_and_says_the_same(make_app):
    app = make_app(LOGIN_LIMIT_PER_ACCOUNT="1000/minute", LOGIN_LIMIT_PER_IP="1000/minute")
    with app.app_context():
        from app import accounts

        accounts.create_user("known@example.com", PASSWORD)
        db.session.commit()
    web = factories.WebClient(app.test_client())

    def attempt(email):
        web.get("/login")
        started = time.perf_counter()
        page = web.post("/login", {"email": email, "password": "wrong password!"}).get_data(as_text=True)
        return time.perf_counter() - started, page

    known, unknown = [], []
    for _ in range(12):
        for email, times in (("known@example.com", known), ("nobody@example.com", unknown)):
            seconds, page = attempt(email)
            times.append(seconds)
            assert "Wrong email or password." in page
    ratio = statistics.median(unknown) / statistics.median(known)
    # Before: ~11 ms against ~185 ms (a ratio of 0.06). One hash each way now.
    assert 0.6 < ratio < 1.6, (statistics.median(known), statistics.median(unknown))


# 4. Exports cannot carry formulas


PAYLOADS = ['=HYPERLINK("http://127.0.0.1/x","click")', "=1+1", "+1", "-1+2", "@SUM(A1)", "\tx", "\rx"]


def test_every_csv_cell_from_input_is_inert_and_numbers_stay_numbers(app, web):
    team_id = signed_in(web, app, balance=100)
    create_key(web)
    with app.app_context():
        for payload in PAYLOADS:
            speech = factories.charge_speech(team_id, 3)
            speech.model, speech.voice, speech.error = payload, payload, payload
        db.session.commit()
    data = web.get("/usage.csv").get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(data)))
    assert len(rows) == len(PAYLOADS)
    for row in rows:
        for column in ("model", "voice", "error", "format", "key", "request_id"):
            assert not row[column].startswith(("=", "+", "-", "@", "\t", "\r")), (column, row[column])
        assert row["characters"] == "3" and row["credits"] == "3"
    assert {row["voice"] for row in rows} == {"'" + payload for payload in PAYLOADS}


# 5. Headers


SIGNED_IN_PAGES = ["/", "/keys", "/usage", "/usage.csv", "/ledger", "/billing", "/account", "/docs"]


def test_every_signed_in_page_and_download_is_no_store(app, web):
    signed_in(web, app)
    for path in SIGNED_IN_PAGES:
        response = web.get(path)
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store", path


def test_hsts_only_when_served_over_https(make_app):
    assert "Strict-Transport-Security" not in make_app().test_client().get("/login").headers
    secure = make_app(SESSION_COOKIE_SECURE=True).test_client()
    for path in ("/login", "/docs"):
        assert secure.get(path).headers["Strict-Transport-Security"].startswith("max-age=31536000")


def test_the_docs_never_reflect_an_unchecked_host(make_app):
    forged = make_app().test_client().get("/docs", headers={"Host": "evil.example"}).get_data(as_text=True)
    assert "evil.example" not in forged and "https://YOUR-SERVER/v1" in forged
    configured = make_app(PUBLIC_BASE_URL="https://tts.example.com").test_client()
    page = configured.get("/docs", headers={"Host": "evil.example"}).get_data(as_text=True)
    assert "evil.example" not in page and "curl https://tts.example.com/v1/audio/speech" in page
    trusted = make_app(TRUSTED_HOSTS=["tts.example.com"]).test_client()
    assert trusted.get("/docs", headers={"Host": "evil.example"}).status_code == 400
    assert "https://tts.example.com/v1" in trusted.get("/docs", base_url="https://tts.example.com").get_data(
        as_text=True
    )


# 6. Unknown keys are throttled per address


def test_key_guessing_is_limited_per_address_and_other_addresses_are_not_slowed(make_app, customer):
    app = make_app(KEY_FAILURES_PER_IP="5/minute")
    client = app.test_client()
    guesser = {"REMOTE_ADDR": "127.0.0.9"}

    def balance(secret, environ):
        return client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"}, environ_base=environ)

    statuses = [balance(f"kp_live_guess{n}", guesser).status_code for n in range(7)]
    assert statuses == [401] * 5 + [429] * 2
    blocked = balance(customer.secret, guesser)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    assert blocked.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert balance(customer.secret, {"REMOTE_ADDR": "127.0.0.10"}).status_code == 200


# 7. CORS is the operator's choice


PREFLIGHT = {
    "Origin": "http://127.0.0.1:5173",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_without_allowed_origins_browsers_are_refused(client):
    response = client.options("/v1/audio/speech", headers=PREFLIGHT)
    assert response.status_code == 401 and "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/dev/captioned_speech"])
def test_an_allowed_origin_gets_its_preflight_without_a_key(make_app, customer, path):
    client = make_app(CORS_ALLOWED_ORIGINS=["http://127.0.0.1:5173"]).test_client()
    response = client.options(path, headers=PREFLIGHT)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:5173"
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
    real = client.get("/v1/balance", headers={"Origin": "http://127.0.0.1:5173", **customer.headers})
    assert real.status_code == 200 and real.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:5173"
    other = client.options("/v1/audio/speech", headers={**PREFLIGHT, "Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    # The dashboard is never opened to other origins.
    assert (
        "Access-Control-Allow-Origin" not in client.get("/login", headers={"Origin": "http://127.0.0.1:5173"}).headers
    )
