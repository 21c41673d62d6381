"""The key-management API, /v1/keys: a management key creates, lists, changes, rolls and revokes its
team's speech keys; a speech key may not, and a management key cannot speak."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from app import keys
from app.extensions import db
from app.models import ApiKey, KeyKind, Team, User
from tests import factories

KEYS = "/v1/keys"


@pytest.fixture
def upstream(speaking_upstream):
    return speaking_upstream


class Team_:
    """A customer's team with a speech key (`customer`) and a management key (`manager`)."""

    def __init__(self, app):
        self.customer = factories.customer(app, balance=1000)
        with app.app_context():
            team = db.session.get(Team, self.customer.team_id)
            key, secret = keys.create_key(
                team, db.session.get(User, self.customer.user_id), "ci", kind=KeyKind.MANAGEMENT
            )
            db.session.commit()
            self.management_key_id = key.id
        self.manager = {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def team(app):
    return Team_(app)


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def error_of(response) -> tuple:
    body = response.get_json()
    assert body["detail"] == body["error"]["message"]
    return response.status_code, body["error"]["code"], body["error"]["param"]


def key_state(app, team_id: int) -> list:
    with app.app_context():
        return [
            (key.id, key.name, key.digest, key.revoked_at, keys.controls_of(key))
            for key in db.session.scalars(select(ApiKey).where(ApiKey.team_id == team_id).order_by(ApiKey.id))
        ]


def test_a_management_key_makes_a_speech_key_whose_secret_is_shown_once_and_works(app, client, team, upstream):
    body = {
        "name": "end-user 42",
        "spend_limit": 100,
        "spend_period": "day",
        "allowed_voices": ["alloy", "af_sky"],
        "expires_at": "2099-01-01T00:00:00Z",
    }
    response = client.post(KEYS, json=body, headers=team.manager)
    assert response.status_code == 201
    made = response.get_json()
    secret = made.pop("secret")
    assert secret.startswith("kp_live_") and made["prefix"] == secret[:12]
    assert {
        field: made[field] for field in ("object", "name", "spend_limit", "spend_period", "spent", "allowed_voices")
    } == {
        "object": "api_key",
        "name": "end-user 42",
        "spend_limit": 100,
        "spend_period": "day",
        "spent": 0,
        "allowed_voices": ["alloy", "af_sky"],
    }
    assert made["expires_at"] == "2099-01-01T00:00:00Z" and made["allowed_ips"] is None
    speech = client.post("/v1/audio/speech", json={"input": "0123456789", "voice": "alloy"}, headers=bearer(secret))
    # Read to its end, as a client does: the request is then settled as delivered, before the listing below.
    assert speech.status_code == 200 and speech.get_data()
    # Recorded as made by the member who made the management key; never listed with its secret.
    with app.app_context():
        assert db.session.get(ApiKey, made["id"]).created_by_id == team.customer.user_id
    listing = client.get(KEYS, headers=team.manager)
    assert secret not in listing.get_data(as_text=True)
    [shown] = [key for key in listing.get_json()["data"] if key["id"] == made["id"]]
    assert shown["spent"] == 10 and shown["last_used_at"] is not None
    assert client.get(f"{KEYS}/{made['id']}", headers=team.manager).get_json() == shown


def test_the_list_holds_the_teams_speech_keys_only(app, client, team):
    other = factories.customer(app, balance=10)
    listed = [key["id"] for key in client.get(KEYS, headers=team.manager).get_json()["data"]]
    assert listed == [team.customer.key_id]
    # Another team's key, and the management key itself: not there.
    for key_id in (other.key_id, team.management_key_id):
        assert error_of(client.get(f"{KEYS}/{key_id}", headers=team.manager))[:2] == (404, "not_found")
        assert client.delete(f"{KEYS}/{key_id}", headers=team.manager).status_code == 404
    assert key_state(app, other.team_id)[0][3] is None


def test_a_speech_key_may_not_manage_keys_and_a_management_key_cannot_speak(app, client, team, upstream):
    before = key_state(app, team.customer.team_id)
    for method, path in (("get", KEYS), ("post", KEYS), ("patch", f"{KEYS}/{team.customer.key_id}")):
        response = getattr(client, method)(path, json={"name": "x"}, headers=team.customer.headers)
        assert error_of(response) == (403, "management_key_required", None)
    for path in ("/v1/audio/speech", "/dev/captioned_speech"):
        speech = client.post(path, json={"input": "Hello.", "voice": "af_sky"}, headers=team.manager)
        assert error_of(speech) == (403, "speech_key_required", None)
    assert key_state(app, team.customer.team_id) == before
    assert factories.balance(app, team.customer.team_id) == 1000


def test_a_change_touches_only_the_fields_it_names_and_null_clears_one(app, client, team):
    path = f"{KEYS}/{team.customer.key_id}"
    first = client.patch(
        path, json={"spend_limit": 500, "spend_period": "month", "allowed_ips": "10.0.0.0/8"}, headers=team.manager
    )
    assert first.status_code == 200
    changed = client.patch(path, json={"spend_limit": 50, "allowed_ips": None}, headers=team.manager).get_json()
    assert (changed["spend_limit"], changed["spend_period"], changed["allowed_ips"]) == (50, "month", None)
    assert changed["limit_resets_at"] is not None and changed["name"] == "test key"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"spend_period": "year", "spend_limit": 5}, "spend_period"),
        ({"spend_limit": -1, "spend_period": "day"}, "spend_limit"),
        ({"spend_limit": "lots", "spend_period": "day"}, "spend_limit"),
        ({"spend_limit": True, "spend_period": "day"}, "spend_limit"),
        ({"spend_limit": 5}, "spend_period"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": 12}, "expires_at"),
        ({"allowed_ips": ["10.0.0.0/8", "nowhere"]}, "allowed_ips"),
        ({"allowed_ips": [1, 2]}, "allowed_ips"),
        ({"allowed_voices": "af_sky(2)+af_bella"}, "allowed_voices"),
        ({"name": "two\nlines"}, "name"),
        ({"owner": "me"}, "owner"),
    ],
)
def test_bad_input_is_400_naming_the_field_and_changes_nothing(app, client, team, body, param):
    before = key_state(app, team.customer.team_id)
    for method, path in (("patch", f"{KEYS}/{team.customer.key_id}"), ("post", KEYS)):
        response = getattr(client, method)(path, json=body, headers=team.manager)
        status, code, named = error_of(response)
        assert (status, named) == (400, param), response.get_json()
    assert key_state(app, team.customer.team_id) == before


def test_a_body_that_is_not_an_object_is_400(client, team):
    for raw in (b"[]", b"not json", b"42"):
        response = client.post(KEYS, data=raw, headers={**team.manager, "Content-Type": "application/json"})
        assert response.status_code == 400


def test_rolling_over_the_api_returns_the_new_secret_once_and_keeps_the_old_for_the_grace(app, client, team):
    path = f"{KEYS}/{team.customer.key_id}/roll"
    assert error_of(client.post(path, json={"grace_seconds": 604801}, headers=team.manager))[:1] == (400,)
    rolled = client.post(path, json={"grace_seconds": 600}, headers=team.manager).get_json()
    new = rolled.pop("secret")
    assert rolled["previous_secret_expires_at"] is not None and rolled["prefix"] == new[:12]
    assert client.get("/v1/balance", headers=bearer(new)).status_code == 200
    assert client.get("/v1/balance", headers=team.customer.headers).status_code == 200
    assert new not in client.get(KEYS, headers=team.manager).get_data(as_text=True)


def test_revoking_over_the_api_ends_the_key_at_once(app, client, team):
    revoked = client.delete(f"{KEYS}/{team.customer.key_id}", headers=team.manager)
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"] is not None
    assert error_of(client.get("/v1/balance", headers=team.customer.headers))[:2] == (401, "invalid_api_key")
    # A revoked key is not changed or rolled; revoking again says it is revoked.
    for method, path in (("patch", ""), ("post", "/roll")):
        response = getattr(client, method)(f"{KEYS}/{team.customer.key_id}{path}", json={}, headers=team.manager)
        assert error_of(response)[:2] == (409, "key_revoked")
    assert client.delete(f"{KEYS}/{team.customer.key_id}", headers=team.manager).status_code == 200


def test_a_management_key_has_its_own_expiry_and_addresses(app, client, team):
    with app.app_context():
        key = db.session.get(ApiKey, team.management_key_id)
        keys.set_controls(key, keys.read_controls(allowed_ips="10.0.0.0/8"))
        db.session.commit()
    response = client.get(KEYS, headers=team.manager, environ_base={"REMOTE_ADDR": "192.0.2.1"})
    assert error_of(response)[:2] == (403, "ip_not_allowed")
    assert client.get(KEYS, headers=team.manager, environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code == 200


def test_two_changes_at_once_of_different_fields_both_stay(app, team, postgres_only):
    """Each change reads the key as locked: one made meanwhile to another field is not written over."""
    path = f"{KEYS}/{team.customer.key_id}"
    changes = [{"spend_limit": 100, "spend_period": "day"}, {"allowed_ips": ["10.0.0.0/8"]}]
    for round_ in range(10):
        barrier = threading.Barrier(2)

        def change(body, barrier=barrier):
            barrier.wait(timeout=10)
            return app.test_client().patch(path, json=body, headers=team.manager).status_code

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(change, changes)) == [200, 200]
        with app.app_context():
            key = db.session.get(ApiKey, team.customer.key_id)
            assert (key.spend_limit, key.allowed_ips) == (100, "10.0.0.0/8"), f"round {round_}"
            keys.set_controls(key, keys.Controls())
            db.session.commit()


def test_every_field_being_optional_no_body_at_all_is_none_sent(app, client, team):
    made = client.post(KEYS, headers=team.manager)
    assert made.status_code == 201 and made.get_json()["name"] == ""
    rolled = client.post(f"{KEYS}/{team.customer.key_id}/roll", headers=team.manager)
    assert rolled.status_code == 200 and rolled.get_json()["secret"].startswith("kp_live_")
    # No grace: the old secret stopped at once, and says so.
    assert error_of(client.get("/v1/balance", headers=team.customer.headers))[:2] == (401, "key_rolled")


@pytest.mark.parametrize("when", ["9999-12-31T23:00:00-05:00", "9999-12-31T23:59:59.999999-00:01"])
def test_an_expiry_past_the_calendar_is_400_naming_it(app, client, team, when):
    before = key_state(app, team.customer.team_id)
    for method, path in (("patch", f"{KEYS}/{team.customer.key_id}"), ("post", KEYS)):
        response = getattr(client, method)(path, json={"expires_at": when}, headers=team.manager)
        assert error_of(response) == (400, "invalid_request_error", "expires_at")
    assert key_state(app, team.customer.team_id) == before
