"""kokoro-pay: prepaid credits and a metered, OpenAI-compatible text-to-speech API."""

import sqlite3

from dotenv import load_dotenv
from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app import config as settings
from app.extensions import db, migrate
from app.upstream import Upstream


def create_app(config: dict | None = None) -> Flask:
    """Build the app: defaults and the environment (`.env` in development), then `config`."""
    config = config or {}
    if not config.get("TESTING"):
        load_dotenv(settings.ROOT / ".env")
    app = Flask(__name__, template_folder=str(settings.ROOT / "templates"),
                static_folder=str(settings.ROOT / "static"))
    app.config.from_mapping(settings.from_environment())
    app.config.update(config)
    check_settings(app)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    return app


def check_settings(app: Flask) -> None:
    """Fail at start-up, not at the first request, when a required setting is missing."""
    if not app.config.get("SECRET_KEY"):
        raise RuntimeError("SECRET_KEY is not set; see .env.example.")
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite:///"):
        settings.DEFAULT_SQLITE_PATH.parent.mkdir(exist_ok=True)
    else:
        app.config.setdefault(
            "SQLALCHEMY_ENGINE_OPTIONS",
            {"pool_size": app.config["SQLALCHEMY_POOL_SIZE"], "max_overflow": 10, "pool_pre_ping": True},
        )


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets readers carry on while a debit writes; the busy timeout queues writers instead of failing them.
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def register_extensions(app: Flask) -> None:
    db.init_app(app)
    migrate.init_app(app, db, directory=str(settings.ROOT / "migrations"), render_as_batch=True)
    app.extensions["upstream"] = Upstream.from_config(app.config)


def register_blueprints(app: Flask) -> None:
    from app import api

    app.register_blueprint(api.bp)


def register_errorhandlers(app: Flask) -> None:
    from app import errors

    errors.register_errorhandlers(app)


def register_commands(app: Flask) -> None:
    from app import commands

    commands.register_commands(app)
