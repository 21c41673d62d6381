"""kokoro-pay: prepaid credits and a metered, OpenAI-compatible text-to-speech API."""

import os
import sqlite3
from datetime import timedelta
from urllib.parse import urlsplit

import limits
import stripe
from dotenv import load_dotenv
from flask import Flask, g, request
from flask_cors import CORS
from flask_login import current_user
from sqlalchemy import event
from werkzeug.middleware.proxy_fix import ProxyFix

from app import config as settings
from app import hangups, liveness, logs, mail, number_format
from app.catalog import Names
from app.extensions import csrf, db, login_manager, migrate
from app.models import new_request_id
from app.payments import parse_packs
from app.throttle import Throttle
from app.upstream import Upstream, base_urls


def create_app(config: dict | None = None) -> Flask:
    """Build the app: defaults and the environment (`.env` in development), then `config`.

    With `TESTING` in `config` the environment is not read at all: a test's app is its
    defaults and its own `config`, whatever the shell that runs the tests has set.
    """
    config = config or {}
    if config.get("TESTING"):
        environ = {}
    else:
        load_dotenv(settings.ROOT / ".env")
        environ = os.environ
    app = Flask(__name__, template_folder=str(settings.ROOT / "templates"), static_folder=str(settings.ROOT / "static"))
    app.config.from_mapping(settings.from_environment(environ))
    app.config.update(config)
    check_settings(app.config)
    derive_settings(app)
    if app.config["TRUSTED_PROXIES"]:
        # Behind N reverse proxies, take the client's address and scheme from their headers.
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    logs.configure(app)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    register_security_headers(app)
    return app


CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "object-src 'none'; "
    "base-uri 'self'; frame-ancestors 'none'; form-action 'self' {checkout}"
)


def register_security_headers(app: Flask) -> None:
    from app.errors import is_api_request

    # form-action also governs the redirect after the buy form, to Stripe Checkout.
    policy = CONTENT_SECURITY_POLICY.format(checkout=app.config["STRIPE_CHECKOUT_ORIGIN"])

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if is_api_request():
            # Every /v1 answer, errors of routing included: the id its log lines carry (app/api.py).
            response.headers.setdefault("X-Request-Id", g.get("request_id") or new_request_id())
        if app.config["SESSION_COOKIE_SECURE"]:
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


# Settings that must be above zero (or at least zero), by the environment variable that sets them.
POSITIVE = {
    "SQLALCHEMY_POOL_SIZE": "DATABASE_POOL_SIZE",
    "UPSTREAM_POOL_SIZE": "UPSTREAM_POOL_SIZE",
    "UPSTREAM_CONNECT_TIMEOUT": "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT": "UPSTREAM_READ_TIMEOUT",
    "STREAM_CHUNK_BYTES": "STREAM_CHUNK_BYTES",
    "MAX_INPUT_CHARS": "MAX_INPUT_CHARS",
    "MAX_CONTENT_LENGTH": "MAX_REQUEST_BYTES",
    "STALE_CHARGE_SECONDS": "STALE_CHARGE_SECONDS",
    "PROCESS_LEASE_SECONDS": "PROCESS_LEASE_SECONDS",
    "CLIENT_IDLE_SECONDS": "CLIENT_IDLE_SECONDS",
    "MAX_STREAM_SECONDS": "MAX_STREAM_SECONDS",
    "SPEECH_CHARS_PER_SECOND": "SPEECH_CHARS_PER_SECOND",
    "UPSTREAM_RETRY_SECONDS": "UPSTREAM_RETRY_SECONDS",
    "SIGN_IN_HOURS": "SIGN_IN_HOURS",
    "REMEMBER_DAYS": "REMEMBER_DAYS",
    "MAIL_TIMEOUT": "MAIL_TIMEOUT",
    "MAIL_POLL_SECONDS": "MAIL_POLL_SECONDS",
    "VERIFY_HOURS": "VERIFY_HOURS",
    "RESET_MINUTES": "RESET_MINUTES",
}
# 0 streams per account pauses speech; a heartbeat of 0 records progress after every chunk.
NOT_NEGATIVE = (
    "UPSTREAM_CATALOG_TTL",
    "KEY_LAST_USED_RESOLUTION",
    "TRUSTED_PROXIES",
    "MAX_STREAMS_PER_ACCOUNT",
    "STREAM_HEARTBEAT_SECONDS",
    "UPSTREAM_MAX_STREAMS",
    "UPSTREAM_QUEUE",
    "UPSTREAM_QUEUE_SECONDS",
    "UPSTREAM_QUEUE_PER_ACCOUNT",
    "SIGNUP_CREDITS",
    "TRIALS_PER_IP_PER_DAY",
    "LOW_BALANCE_CREDITS",
)
RATE_LIMITS = (
    "RATE_LIMIT_PER_KEY",
    "RATE_LIMIT_PER_ACCOUNT",
    "LOGIN_LIMIT_PER_ACCOUNT",
    "LOGIN_LIMIT_PER_IP",
    "KEY_FAILURES_PER_IP",
    "MAILS_PER_IP",
    "SAMPLE_LIMIT_PER_IP",
)


def check_settings(config) -> None:
    """Refuse to start, with a message naming the setting, when one is missing or cannot work."""
    if not config.get("SECRET_KEY"):
        raise settings.SettingError("SECRET_KEY is not set; see .env.example.")
    for key, name in POSITIVE.items():
        if not config[key] > 0:
            raise settings.SettingError(f"{name} must be above zero, not {config[key]!r}.")
    for key in NOT_NEGATIVE:
        if config[key] < 0:
            raise settings.SettingError(f"{key} must not be negative, not {config[key]!r}.")
    addresses = [("UPSTREAM_URL", url) for url in base_urls(config["UPSTREAM_URL"]) or [""]]
    if config["PUBLIC_BASE_URL"]:
        addresses.append(("PUBLIC_BASE_URL", config["PUBLIC_BASE_URL"]))
    for key, address in addresses:
        url = urlsplit(address)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise settings.SettingError(f"{key} must be an http:// or https:// address, not {address!r}.")
    if config["MAIL_URL"]:
        try:
            mail.Smtp.from_url(config["MAIL_URL"])
        except ValueError as error:
            raise settings.SettingError(f"MAIL_URL: {error}") from None
        if not config["PUBLIC_BASE_URL"]:
            # Links in mail must not take their host from a request's Host header (reset-link poisoning).
            raise settings.SettingError("MAIL_URL needs PUBLIC_BASE_URL: the address the links in mail point to.")
    stale, lease = config["STALE_CHARGE_SECONDS"], config["PROCESS_LEASE_SECONDS"]
    if stale < lease:
        raise settings.SettingError("STALE_CHARGE_SECONDS: " + liveness.too_short(stale, lease))
    if config["LOG_FORMAT"] not in ("text", "json"):
        raise settings.SettingError(f"LOG_FORMAT must be text or json, not {config['LOG_FORMAT']!r}.")
    for key in RATE_LIMITS:
        try:
            limits.parse(config[key])
        except ValueError:
            raise settings.SettingError(f"{key} must read like 600/minute, not {config[key]!r}.") from None
    for key, read in (
        ("CREDIT_PACKS", parse_packs),
        ("VOICE_ALIASES", Names.voice_aliases),
        ("MODEL_ALIASES", Names.model_aliases),
    ):
        try:
            read(config[key])
        except ValueError as error:
            raise settings.SettingError(f"{key}: {error}.") from None


def derive_settings(app: Flask) -> None:
    """The settings that follow from others: cookies, the database pool, SQLite's directory."""
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=app.config["SESSION_COOKIE_SECURE"],
        REMEMBER_COOKIE_DURATION=timedelta(days=app.config["REMEMBER_DAYS"]),
    )
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite:///"):
        settings.DEFAULT_SQLITE_PATH.parent.mkdir(exist_ok=True)
    else:
        app.config.setdefault(
            "SQLALCHEMY_ENGINE_OPTIONS",
            {"pool_size": app.config["SQLALCHEMY_POOL_SIZE"], "max_overflow": 10, "pool_pre_ping": True},
        )


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
    with app.app_context():
        # This app's engine only: other engines in the same process keep their own settings.
        event.listen(db.engine, "connect", _sqlite_pragmas)
    migrate.init_app(app, db, directory=str(settings.ROOT / "migrations"), render_as_batch=True)
    login_manager.init_app(app)
    login_manager.login_view = "dashboard.login"
    login_manager.login_message = "Sign in to continue."
    csrf.init_app(app)
    app.extensions["upstream"] = Upstream.from_config(app.config)
    app.extensions["names"] = Names.from_settings(app.config["VOICE_ALIASES"], app.config["MODEL_ALIASES"])
    app.extensions["credit_packs"] = parse_packs(app.config["CREDIT_PACKS"])
    app.extensions["stripe"] = stripe_client(app.config)
    app.extensions["throttle"] = Throttle(app.config)
    app.extensions["postman"] = mail.Postman(app)
    app.extensions["lease"] = liveness.Lease(app, app.config["PROCESS_LEASE_SECONDS"])
    app.extensions["hangups"] = hangups.Watch()
    number_format.register(app)
    if app.config["MAIL_WORKER"]:
        # Each process sends its mail from a thread of its own, started with its first request.
        app.before_request(app.extensions["postman"].start)
    if app.config["CORS_ALLOWED_ORIGINS"]:
        # Pages on these origins may call /v1 from the browser with a key; nothing else is opened.
        CORS(
            app,
            resources={r"/v1/*": {"origins": app.config["CORS_ALLOWED_ORIGINS"]}},
            methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Request-Id", "X-Credits-Charged", "X-Credits-Remaining", "Retry-After"],
            max_age=600,
        )


def stripe_client(config) -> stripe.StripeClient | None:
    """Stripe, through its requests-based HTTP client; None until a secret key is configured."""
    if not config["STRIPE_SECRET_KEY"]:
        return None
    base = {"api": config["STRIPE_API_BASE"]} if config["STRIPE_API_BASE"] else None
    return stripe.StripeClient(config["STRIPE_SECRET_KEY"], http_client=stripe.RequestsClient(), base_addresses=base)


def register_blueprints(app: Flask) -> None:
    # notifications queues the mail that money events cause (a step billing does not import).
    from app import admin, api, dashboard, health, metrics, notifications, playground, webhooks  # noqa: F401
    from app.urls import DatabaseId

    # Before any route is added: an id in a path the database cannot hold is 404, not a 500.
    app.url_map.converters["int"] = DatabaseId
    csrf.exempt(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.after_request(metrics.count_request)
    app.register_blueprint(api.bp)
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
