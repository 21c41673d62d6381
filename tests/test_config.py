"""Settings: read from the environment by the service, never under test; refused at start-up when wrong."""

import re

import pytest
import sqlalchemy
from sqlalchemy import text

import app as app_module
from app import config, create_app
from app.config import SettingError
from app.extensions import db
from tests.conftest import app_config


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """A clean process environment for the service (no developer's .env), with a database of its own."""
    monkeypatch.setattr(app_module, "load_dotenv", lambda *args, **kwargs: None)
    for name in ("DATABASE_URL", "UPSTREAM_URL", "CREDIT_PACKS", "VOICE_ALIASES", "MODEL_ALIASES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SECRET_KEY", "from-the-environment")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'settings.sqlite3'}")
    return monkeypatch


def test_the_service_reads_its_settings_from_the_environment(environment):
    environment.setenv("STREAM_CHUNK_BYTES", "7")
    environment.setenv("UPSTREAM_URL", "http://127.0.0.1:8881/v1/")
    environment.setenv("SESSION_COOKIE_SECURE", "yes")
    environment.setenv("CORS_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    app = create_app()
    settings = app.extensions["settings"]
    assert app.config["SECRET_KEY"] == "from-the-environment"
    assert settings.stream_chunk_bytes == 7
    assert settings.upstream_url == "http://127.0.0.1:8881/v1"
    assert app.config["SESSION_COOKIE_SECURE"] is True and app.config["REMEMBER_COOKIE_SECURE"] is True
    assert settings.cors_allowed_origins == ["https://a.example", "https://b.example"]


def test_an_app_under_test_never_reads_the_environment(environment, tmp_path):
    # Whatever the shell running the tests has exported, a test's app is its defaults and its own config.
    environment.setenv("STREAM_CHUNK_BYTES", "7")
    environment.setenv("SESSION_COOKIE_SECURE", "true")
    environment.setenv("MAX_INPUT_CHARS", "not a number")
    app = create_app(app_config(f"sqlite:///{tmp_path / 'test.sqlite3'}"))
    assert app.extensions["settings"].stream_chunk_bytes == 16384
    assert app.config["SESSION_COOKIE_SECURE"] is False
    assert app.config["SECRET_KEY"] == "test-secret-key"


def test_a_missing_secret_key_is_refused_at_start_up(environment):
    environment.delenv("SECRET_KEY")
    with pytest.raises(SettingError, match="SECRET_KEY is not set"):
        create_app()


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("MAX_INPUT_CHARS", "many", "MAX_INPUT_CHARS must be a whole number, not 'many'"),
        ("MAX_INPUT_CHARS", "0", "MAX_INPUT_CHARS must be above zero, not 0"),
        ("MAX_REQUEST_BYTES", "-1", "MAX_REQUEST_BYTES must be above zero, not -1"),
        ("DATABASE_POOL_SIZE", "0", "DATABASE_POOL_SIZE must be above zero"),
        ("UPSTREAM_READ_TIMEOUT", "soon", "UPSTREAM_READ_TIMEOUT must be a number, not 'soon'"),
        ("SPEECH_CHARS_PER_SECOND", "0", "SPEECH_CHARS_PER_SECOND must be above zero"),
        ("TRUSTED_PROXIES", "-1", "TRUSTED_PROXIES must not be negative"),
        ("SESSION_COOKIE_SECURE", "maybe", "SESSION_COOKIE_SECURE must be true or false, not 'maybe'"),
        ("UPSTREAM_URL", "127.0.0.1:8880/v1", "UPSTREAM_URL must be an http:// or https:// address"),
        ("PUBLIC_BASE_URL", "kokoro.example", "PUBLIC_BASE_URL must be an http:// or https:// address"),
        ("RATE_LIMIT_PER_KEY", "lots", "RATE_LIMIT_PER_KEY must read like 600/minute, not 'lots'"),
        ("MAILS_PER_IP", "lots", "MAILS_PER_IP must read like 600/minute, not 'lots'"),
        ("TRIALS_PER_IP_PER_DAY", "-1", "TRIALS_PER_IP_PER_DAY must not be negative"),
        ("CREDIT_PACKS", "starter:0:500", "CREDIT_PACKS: CREDIT_PACKS entry 'starter:0:500' needs a name"),
        ("CREDIT_PACKS", "starter:many:500", "CREDIT_PACKS: CREDIT_PACKS entry 'starter:many:500' is not id:"),
        ("VOICE_ALIASES", "alloy", "VOICE_ALIASES: expected name=target, got 'alloy'"),
        ("MODEL_ALIASES", "=kokoro", "MODEL_ALIASES: expected name=target, got '=kokoro'"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_by_name(environment, name, value, message):
    environment.setenv(name, value)
    with pytest.raises(SettingError) as refused:
        create_app()
    assert str(refused.value).startswith(message)


def test_sqlite_settings_apply_to_this_apps_database_only(environment):
    app = create_app()
    with app.app_context():
        assert db.session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert db.session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        db.session.remove()
        db.engine.dispose()
    # Another SQLAlchemy engine in the same process (a script, a library) keeps SQLite's defaults.
    other = sqlalchemy.create_engine("sqlite://")
    with other.connect() as connection:
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 0
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "memory"
    other.dispose()


# Read by others than the app: `make run` (bin/run) and the embedded engine (engine/assets.py).
NOT_THE_APPS = {"ENGINE_BIND": "bin/run", "ENGINE_CACHE": "engine/assets.py"}


def test_every_setting_is_documented_and_every_documented_key_is_read():
    documented = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", (config.ROOT / ".env.example").read_text(), re.M))
    read = set(config.read({}))
    assert read - documented == set(), "read but not in .env.example"
    assert documented - read - set(NOT_THE_APPS) == set(), "in .env.example but read by nothing"
    for name, reader in NOT_THE_APPS.items():
        assert name in (config.ROOT / reader).read_text()


def test_a_misspelt_override_is_refused(tmp_path):
    with pytest.raises(SettingError, match="MAX_INPUT_CHAR is not a setting"):
        create_app(app_config(f"sqlite:///{tmp_path / 'test.sqlite3'}", MAX_INPUT_CHAR=10))
