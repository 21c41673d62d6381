"""Fixtures: a fresh, migrated database per test on SQLite and, when
TEST_DATABASE_URL is set, on PostgreSQL too; the app, its clients, users and keys."""

import os
import shutil

import pytest
import responses
from flask_migrate import upgrade
from sqlalchemy import create_engine, text

from app import accounts, create_app
from app.config import database_url
from app.extensions import db
from bench import launch
from tests import factories
from tests.fake_upstream import stub_catalog
from tests.servers import serve

# The real engine's fixtures, one model and one engine process for the whole session.
pytest_plugins = ["tests.engine_fixtures"]


# Nothing listens here: tests that forget to stub the upstream fail fast with "refused".
STUB_UPSTREAM = "http://127.0.0.1:9/v1"
# Under pytest-xdist (`make test` runs three workers) each worker has a database of its own: <name>_gw0, <name>_gw1…
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
PG_URL = database_url(os.environ["TEST_DATABASE_URL"]) if os.environ.get("TEST_DATABASE_URL") else None
if PG_URL and WORKER:
    PG_URL = f"{PG_URL}_{WORKER}"
# Stripe's API and Checkout pages, stood in for on loopback: stubbed with responses, or intercepted in the browser.
STRIPE_API = "http://127.0.0.1:12111"
STRIPE_CHECKOUT = "http://127.0.0.1:12112"
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])
# Teams are numbered from here in tests, so a team's id is never its owner's user id by chance: code that
# passes one where the other belongs fails.
FIRST_TEAM_ID = 7001


def app_config(uri: str, **overrides) -> dict:
    return {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key",
        "SQLALCHEMY_DATABASE_URI": uri,
        "UPSTREAM_URL": STUB_UPSTREAM,
        "UPSTREAM_API_KEY": None,
        "UPSTREAM_CONNECT_TIMEOUT": 2.0,
        "UPSTREAM_READ_TIMEOUT": 5.0,
        "UPSTREAM_CATALOG_TTL": 60.0,
        "MAX_INPUT_CHARS": 4096,
        "STRIPE_SECRET_KEY": "sk_test_kokoro",
        "STRIPE_WEBHOOK_SECRET": "whsec_kokoro_test",
        "STRIPE_API_BASE": STRIPE_API,
        "STRIPE_CHECKOUT_ORIGIN": STRIPE_CHECKOUT,
        "STRIPE_CURRENCY": "usd",
        "CREDIT_PACKS": "starter:10000:500,pro:250000:8000",
        # The mail sender runs when a test asks for it (tests/test_mail.py).
        "MAIL_WORKER": False,
        # The automatic top-up buyer runs when a test asks for it (tests/test_auto_topups.py).
        "TOPUP_WORKER": False,
        # Landing samples kept in memory only; tests/test_samples.py gives them a directory.
        "SAMPLES_DIR": None,
        **overrides,
    }


def _migrate(uri: str) -> None:
    app = create_app(app_config(uri))
    with app.app_context():
        upgrade()
        if uri.startswith("sqlite"):
            db.session.execute(
                text("UPDATE sqlite_sequence SET seq = :seq WHERE name = 'teams'"), {"seq": FIRST_TEAM_ID - 1}
            )
            db.session.commit()
        db.engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    """One migrated SQLite file; each test gets a copy of it."""
    path = tmp_path_factory.mktemp("template") / "kokoro-pay.sqlite3"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url():
    """The PostgreSQL test database (this worker's, made if missing), emptied and migrated once per session."""
    launch.empty_database(PG_URL)
    _migrate(PG_URL)
    return PG_URL


def _truncate_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        tables = conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
        ).scalars()
        conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        conn.execute(text(f"ALTER SEQUENCE teams_id_seq RESTART WITH {FIRST_TEAM_ID}"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_uri(request, tmp_path):
    if request.param == "sqlite":
        path = tmp_path / "kokoro-pay.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("postgres_url")
    _truncate_postgres(url)
    return url


@pytest.fixture
def postgres_only(database_uri):
    if not database_uri.startswith("postgresql"):
        pytest.skip("PostgreSQL only: row locking, gunicorn on a shared database (set TEST_DATABASE_URL)")


@pytest.fixture
def make_app(database_uri):
    """Build apps on this test's database; engines are disposed afterwards."""
    apps = []

    def make(**overrides):
        app = create_app(app_config(database_uri, **overrides))
        apps.append(app)
        return app

    yield make
    for app in apps:
        # Each thread's round under way ends before the database goes: none outlives its test.
        app.extensions["postman"].stop()
        app.extensions["buyer"].stop()
        app.extensions["lease"].stop()
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def freeze(monkeypatch):
    """Stops a module's `clock` (app/places.py's, app/accounts.py's, …) at its reading now;
    `freeze(module)` returns the function that moves it on by some seconds, in place of a sleep."""

    def freeze(module):
        now = [module.clock()]
        monkeypatch.setattr(module, "clock", lambda: now[0])

        def advance(seconds: float) -> None:
            now[0] += seconds

        return advance

    return freeze


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def customer(app):
    """A user with 1,000 credits and one active key."""
    return factories.customer(app, balance=1000)


@pytest.fixture
def speaking_upstream():
    """The upstream stubbed with `responses`: Kokoro-FastAPI's catalog, and audio for every speech request."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        stub_catalog(mock, STUB_UPSTREAM)
        mock.post(f"{STUB_UPSTREAM}/audio/speech", body=b"ID3audio", content_type="audio/mpeg")
        yield mock


@pytest.fixture
def web(app):
    """A browser-like client: reads CSRF tokens from the pages it gets."""
    return factories.WebClient(app.test_client())


@pytest.fixture
def gateway(make_app):
    """`gateway(upstream, **settings)`: the stand-in `upstream` and the app in front of it, each served on
    loopback by a real HTTP server; (app, the app's base URL). Both stop after the test."""
    stack = []

    def start(upstream, **overrides):
        upstream_server = serve(upstream)
        upstream_url = upstream_server.__enter__()
        stack.append(upstream_server)
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", **overrides)
        app_server = serve(app)
        stack.append(app_server)
        return app, app_server.__enter__()

    yield start
    for server in reversed(stack):
        server.__exit__(None, None, None)


# scrypt at N=2^10 rather than the production 2^15: the same function and format (a stored hash names
# its own cost, so checking one is as the product does it), at a thirtieth of the cost. Half the time
# of the dashboard and account tests went into password hashing. test_accounts checks, marked
# `production_password_hash`, that accounts are stored at the production cost.
TEST_PASSWORD_HASH = "scrypt:1024:8:1"


@pytest.fixture(autouse=True)
def cheap_password_hashes(request, monkeypatch):
    if request.node.get_closest_marker("production_password_hash") is None:
        monkeypatch.setattr(accounts, "PASSWORD_HASH", TEST_PASSWORD_HASH)


@pytest.fixture
def own_redis(tmp_path):
    """A Redis server of this test's own, which the test may stop: yields (its URL, stop)."""
    from tests.servers import private_redis

    with private_redis(tmp_path) as server:
        yield server


@pytest.fixture
def stripe_api():
    """Stripe's API as saved cards, automatic top-ups, invoices and the portal use it (tests.stripe_helpers.FakeStripe),
    on a `responses` mock. tests/test_payments.py has its own: the bare mock, for Checkout."""
    from tests.stripe_helpers import FakeStripe  # it reads this module's Stripe addresses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeStripe(mock)
