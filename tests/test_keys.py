"""API keys: their form, storage, revocation, and that a key never reaches logs, error bodies or the database."""

import logging
import re
from datetime import timedelta

import pytest
import responses
from sqlalchemy import make_url, select, text

from app import accounts, keys, teams
from app.extensions import db
from app.models import ApiKey, utcnow
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import stub_catalog

HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}


def _personal(user):
    """A new person's personal team and the person: who a key is made for, and by."""
    return teams.personal(user), user


def test_a_key_is_kp_live_and_43_random_url_safe_characters():
    secret = keys.generate()
    assert re.fullmatch(r"kp_live_[A-Za-z0-9_-]{43}", secret)
    assert len({keys.generate() for _ in range(100)}) == 100


def test_only_the_digest_and_a_short_prefix_are_stored(app):
    with app.app_context():
        user = accounts.create_user("a@example.com")
        key, secret = keys.create_key(teams.personal(user), user, "laptop")
        db.session.commit()
        row = db.session.execute(select(ApiKey.__table__)).one()._asdict()
        stored = " ".join(str(value) for value in row.values())
        assert secret not in stored
        assert secret[len(keys.KEY_PREFIX) :] not in stored
        assert row["digest"] == keys.digest(secret)
        assert row["prefix"] == secret[:12] and len(row["prefix"]) == 12


def test_a_key_is_found_by_its_secret_and_nothing_else(app):
    with app.app_context():
        user = accounts.create_user("a@example.com")
        key, secret = keys.create_key(teams.personal(user), user, "")
        db.session.commit()
        found = keys.lookup(keys.stored_digest(secret))
        assert (found.key_id, found.team_id, found.revoked_at) == (key.id, teams.personal(user).id, None)
        assert keys.lookup(keys.stored_digest(secret[:-1])) is None
        assert keys.stored_digest(keys.digest(secret)) is None
        assert keys.stored_digest("kp_live_" + "x" * 300) is None


def test_revoke_is_remembered_and_reported_once(app):
    with app.app_context():
        key, secret = keys.create_key(*_personal(accounts.create_user("a@example.com")), "")
        db.session.commit()
        assert keys.revoke(key) is True
        assert keys.revoke(key) is False
        db.session.commit()
        assert keys.lookup(keys.stored_digest(secret)).revoked_at is not None


def test_last_use_is_written_at_most_once_per_resolution(app):
    with app.app_context():
        key, _ = keys.create_key(*_personal(accounts.create_user("a@example.com")), "")
        db.session.commit()
        now = utcnow()
        assert keys.touch(key.id, key.last_used_at, 60, now) is True
        db.session.commit()
        db.session.refresh(key)
        assert key.last_used_at == now
        assert keys.touch(key.id, key.last_used_at, 60, now + timedelta(seconds=59)) is False
        # A full minute on, the use is written again.
        assert keys.touch(key.id, key.last_used_at, 60, now + timedelta(seconds=60)) is True


def test_a_busy_key_records_its_last_use_once_a_minute_not_on_every_request(app, customer):
    client = app.test_client()
    assert client.get("/v1/balance", headers=customer.headers).status_code == 200
    with app.app_context():
        first = db.session.get(ApiKey, customer.key_id).last_used_at
    assert first is not None
    assert client.get("/v1/balance", headers=customer.headers).status_code == 200
    with app.app_context():
        assert db.session.get(ApiKey, customer.key_id).last_used_at == first


def test_a_keys_name_is_kept_as_one_line_of_single_spaces_and_at_most_100_characters(app):
    """As the dashboard and the API list it: runs of spaces, tabs or line breaks in a name (the CLI takes
    any) are one space, and a longer name is cut, not refused."""
    with app.app_context():
        team, user = _personal(accounts.create_user("named@example.com"))
        long, _ = keys.create_key(team, user, "  " + "n" * 150 + "  ")
        spaced, _ = keys.create_key(team, user, "  my \t laptop\n\n key ")
        db.session.commit()
        assert db.session.get(ApiKey, long.id).name == "n" * 100
        assert db.session.get(ApiKey, spaced.id).name == "my laptop key"


def test_a_key_never_reaches_logs_error_bodies_or_the_database(app, customer, caplog):
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    with responses.RequestsMock() as upstream:
        stub_catalog(upstream, STUB_UPSTREAM)
        upstream.post(f"{STUB_UPSTREAM}/audio/speech", status=500, json={"detail": "boom"})
        bodies = [
            client.post("/v1/audio/speech", json=HELLO, headers=customer.headers).data,
            client.get("/v1/balance", headers={"Authorization": f"Bearer {customer.secret}x"}).data,
            client.get("/v1/nope", headers=customer.headers).data,
        ]
    assert all(customer.secret.encode() not in body for body in bodies)
    assert customer.secret not in caplog.text
    with app.app_context():
        for table in db.metadata.sorted_tables:
            for row in db.session.execute(text(f"SELECT * FROM {table.name}")):
                assert customer.secret not in " ".join(map(str, row)), table.name


@pytest.fixture
def lost_database(make_app, database_uri, tmp_path):
    """An app whose database cannot be reached: PostgreSQL on a port nothing listens on, SQLite in no folder."""
    if database_uri.startswith("sqlite"):
        unreachable = f"sqlite:///{tmp_path / 'gone' / 'kokoro-pay.sqlite3'}"
    else:
        unreachable = make_url(database_uri).set(port=9).render_as_string(hide_password=False)
    app = make_app(SQLALCHEMY_DATABASE_URI=unreachable)
    # Answered as a client sees it, not raised into the test.
    app.config["PROPAGATE_EXCEPTIONS"] = False
    return app


def test_with_the_database_lost_what_cannot_be_a_key_is_still_401_and_what_could_be_one_is_not(lost_database):
    """What cannot be a key is refused without the database; a token that could be one needs it, and while it is
    lost the client is told the server failed (500), never that a key that may be good is invalid."""
    client = lost_database.test_client()

    def answer(token: str):
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
        return response.status_code, response.get_json()["error"]["code"]

    longest = keys.KEY_PREFIX + "x" * (keys.MAX_KEY_LENGTH - len(keys.KEY_PREFIX))
    assert answer("not-a-key") == (401, "invalid_api_key")
    assert answer(longest + "x") == (401, "invalid_api_key")
    assert answer(longest) == (500, "server_error")
    assert answer(keys.generate()) == (500, "server_error")
