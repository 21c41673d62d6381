"""kokoro-pay: prepaid credits and a metered, OpenAI-compatible text-to-speech API."""

import os
import sqlite3
from datetime import timedelta

import stripe
from dotenv import load_dotenv
from flask import Flask, g, request
from flask_cors import CORS
from flask_login import current_user
from sqlalchemy import event
from werkzeug.middleware.proxy_fix import ProxyFix

from app import card_payments, config, hangups, liveness, logs, mail, number_format
from app.config import Settings
from app.extensions import csrf, db, login_manager, migrate
from app.models import new_request_id
from app.throttle import Throttle
from app.upstream import Upstream


def create_app(overrides: dict | None = None) -> Flask:
    """Build the app: defaults and the environment (`.env` in development), then `overrides`.

    With `TESTING` in `overrides` the environment is not read at all: a test's app is its
    defaults and its own overrides (settings by their names in .env.example), whatever the
    shell that runs the tests has set.
    """
    overrides = dict(overrides or {})
    testing = overrides.pop("TESTING", False)
    if testing:
        environ = {}
    else:
        load_dotenv(config.ROOT / ".env")
        environ = os.environ
    settings = config.load(environ, overrides)
    app = Flask(__name__, template_folder=str(config.ROOT / "templates"), static_folder=str(config.ROOT / "static"))
    app.extensions["settings"] = settings
    configure_flask(app, settings, testing)
    if settings.trusted_proxies:
        # Behind N reverse proxies, take the client's address and scheme from their headers.
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    logs.configure(app, settings.log_format)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    register_security_headers(app)
    return app


CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "object-src 'none'; "
    "base-uri 'self'; frame-ancestors 'none'; form-action 'self' {checkout} {portal}"
)


def register_security_headers(app: Flask) -> None:
    from app.errors import is_api_request

    # form-action also governs the redirect after the buy form, to Stripe Checkout.
    settings = app.extensions["settings"]
    policy = CONTENT_SECURITY_POLICY.format(
        checkout=settings.stripe_checkout_origin, portal=settings.stripe_portal_origin
    )

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if is_api_request():
            # Every /v1 answer, errors of routing included: the id its log lines carry (app/api.py).
            response.headers.setdefault("X-Request-Id", g.get("request_id") or new_request_id())
        if settings.session_cookie_secure:
            # Served over HTTPS: browsers are to come back only that way.
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        if not is_api_request():
            response.headers.setdefault("Content-Security-Policy", policy)
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("Referrer-Policy", "same-origin")
            if request.endpoint != "static" and current_user.is_authenticated:
                # A signed-in page or download is nobody else's: no shared or back-button cache keeps it.
                response.headers["Cache-Control"] = "no-store"
        return response


def configure_flask(app: Flask, settings: Settings, testing: bool) -> None:
    """Flask's and its extensions' own config, from the settings: the one place that writes app.config."""
    app.config.update(
        TESTING=testing,
        SECRET_KEY=settings.secret_key,
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        SESSION_COOKIE_SECURE=settings.session_cookie_secure,
        TRUSTED_HOSTS=settings.trusted_hosts,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=settings.session_cookie_secure,
        REMEMBER_COOKIE_DURATION=timedelta(days=settings.remember_days),
    )
    if settings.database_url.startswith("sqlite:///"):
        config.DEFAULT_SQLITE_PATH.parent.mkdir(exist_ok=True)
    else:
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
            "pool_size": settings.database_pool_size,
            "max_overflow": 10,
            "pool_pre_ping": True,
        }
    # Templates read settings as attributes too (`settings.stripe_currency`).
    app.jinja_env.globals["settings"] = settings


def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets readers carry on while a debit writes; the busy timeout queues writers instead of failing them.
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def _sqlite_for_update(_connection, cursor, _statement, _parameters, context, _executemany):
    # SELECT … FOR UPDATE holds the rows it reads on PostgreSQL until the transaction ends. SQLite has no row
    # locks, SQLAlchemy leaves the clause out there, and the driver begins a transaction only at the first
    # write, so the same read would hold nothing: a debit could commit between it and the write it decides.
    # On SQLite it takes the database's write lock first (waiting, as for any write, up to the busy timeout);
    # not on a connection in autocommit (isolation_level None), where nothing would ever end that transaction.
    # `_for_update_arg` is where Select.with_for_update keeps its clause (SQLAlchemy has no public reader):
    # tests/test_row_locks.py fails on SQLite if an upgrade moves it.
    compiled = context.compiled if context is not None else None
    statement = compiled.statement if compiled is not None else None
    dbapi_connection = cursor.connection
    if (
        getattr(statement, "_for_update_arg", None) is not None
        and dbapi_connection.isolation_level is not None
        and not dbapi_connection.in_transaction
    ):
        cursor.execute("BEGIN IMMEDIATE")


def register_extensions(app: Flask) -> None:
    db.init_app(app)
    with app.app_context():
        # This app's engine only: other engines in the same process keep their own settings.
        event.listen(db.engine, "connect", _sqlite_pragmas)
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "before_cursor_execute", _sqlite_for_update)
    migrate.init_app(app, db, directory=str(config.ROOT / "migrations"), render_as_batch=True)
    login_manager.init_app(app)
    login_manager.login_view = "dashboard.login"
    login_manager.login_message = "Sign in to continue."
    csrf.init_app(app)
    settings = app.extensions["settings"]
    # The shared services, asked for through app/services.py.
    app.extensions["lease"] = lease = liveness.Lease(app, settings.process_lease_seconds)
    app.extensions["upstream"] = Upstream.from_settings(settings, app, lease)
    app.extensions["stripe"] = stripe_client(settings)
    app.extensions["throttle"] = Throttle(settings)
    app.extensions["postman"] = postman = mail.Postman(app, settings)
    app.extensions["buyer"] = buyer = card_payments.Buyer(app, settings.topup_poll_seconds, app.extensions["stripe"])
    app.extensions["hangups"] = hangups.Watch()
    number_format.register(app)
    if settings.mail_worker:
        # Each process sends its mail from a thread of its own, started with its first request.
        app.before_request(postman.start)
    if settings.topup_worker and app.extensions["stripe"] is not None:
        # Each process pays the queued automatic top-ups from a thread of its own (app/card_payments.py).
        app.before_request(buyer.start)
    if settings.cors_allowed_origins:
        # Pages on these origins may call /v1 from the browser with a key; nothing else is opened.
        CORS(
            app,
            resources={
                r"/v1/*": {"origins": settings.cors_allowed_origins},
                r"/dev/captioned_speech": {"origins": settings.cors_allowed_origins},
            },
            methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[
                "X-Request-Id",
                "X-Credits-Charged",
                "X-Credits-Remaining",
                "X-Key-Limit-Reset",
                "Retry-After",
            ],
            max_age=600,
        )


def stripe_client(settings: Settings) -> stripe.StripeClient | None:
    """Stripe, through its requests-based HTTP client; None until a secret key is configured."""
    if not settings.stripe_secret_key:
        return None
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(settings.stripe_secret_key, http_client=stripe.RequestsClient(), base_addresses=base)


def register_blueprints(app: Flask) -> None:
    # notifications queues the mail that money events cause (a step billing does not import).
    from app import admin, api, dashboard, health, key_api, metrics, notifications, playground, webhooks  # noqa: F401
    from app.urls import DatabaseId

    # Before any route is added: an id in a path the database cannot hold is 404, not a 500.
    app.url_map.converters["int"] = DatabaseId
    csrf.exempt(api.bp)
    csrf.exempt(api.captioned)
    csrf.exempt(key_api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.after_request(metrics.count_request)
    app.register_blueprint(api.bp)
    app.register_blueprint(api.captioned)
    app.register_blueprint(key_api.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(playground.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(webhooks.bp)


def register_errorhandlers(app: Flask) -> None:
    from app import errors

    errors.register_errorhandlers(app)


def register_commands(app: Flask) -> None:
    from app import commands

    commands.register_commands(app)
