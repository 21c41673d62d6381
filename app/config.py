"""Settings, read from the environment in one place, parsed and checked once at start.

Every key is documented in `.env.example` (tests/test_config.py keeps the two in step).
In development a `.env` file in the project root is loaded first (python-dotenv); real
environment variables win. app/environment.py reads each setting, typed; `load` turns
that (and, under test, a mapping of overrides by the same names) into one frozen
`Settings`, parsed and checked; the app reads its attributes, never the environment.
gunicorn.conf.py reads the same names through app/environment.py alone.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import limits
from flask import current_app

from app.catalog import Names
from app.environment import DEFAULT_PACKS, DEFAULT_SQLITE_PATH, ROOT, SettingError, base_urls, database_url, read
from app.liveness import too_short
from app.mail.smtp import Smtp
from app.packs import Pack, parse_packs

__all__ = ["DEFAULT_PACKS", "DEFAULT_SQLITE_PATH", "ROOT", "SettingError", "database_url", "read"]


@dataclass(frozen=True)
class Settings:
    """Every setting, typed: one attribute per environment variable, by its name in lower case."""

    secret_key: str | None
    database_url: str
    database_pool_size: int
    upstream_url: str
    upstream_api_key: str | None
    upstream_connect_timeout: float
    upstream_read_timeout: float
    upstream_pool_size: int
    upstream_catalog_ttl: float
    upstream_max_streams: int
    upstream_queue: int
    upstream_queue_seconds: float
    upstream_queue_per_account: int
    upstream_retry_seconds: float
    # OpenAI's names with VOICE_ALIASES and MODEL_ALIASES over them.
    voice_aliases: dict[str, str]
    model_aliases: dict[str, str]
    public_catalog: bool
    stream_chunk_bytes: int
    max_input_chars: int
    max_request_bytes: int
    key_last_used_resolution: int
    ratelimit_storage_uri: str
    rate_limit_per_key: limits.RateLimitItem
    rate_limit_per_account: limits.RateLimitItem
    max_streams_per_account: int
    login_limit_per_account: limits.RateLimitItem
    login_limit_per_ip: limits.RateLimitItem
    stale_charge_seconds: int
    stream_heartbeat_seconds: float
    process_lease_seconds: float
    client_idle_seconds: float
    max_stream_seconds: float
    speech_chars_per_second: float
    trusted_proxies: int
    session_cookie_secure: bool
    sign_in_hours: float
    remember_days: float
    public_base_url: str | None
    trusted_hosts: list[str] | None
    cors_allowed_origins: list[str]
    key_failures_per_ip: limits.RateLimitItem
    stripe_secret_key: str | None
    stripe_webhook_secret: str | None
    stripe_api_base: str | None
    stripe_checkout_origin: str
    stripe_currency: str
    stripe_automatic_tax: bool
    stripe_portal_origin: str
    topup_worker: bool
    topup_poll_seconds: float
    credit_packs: list[Pack]
    log_format: str
    metrics_token: str | None
    mail_url: str | None
    mail_from: str
    mail_timeout: float
    mail_worker: bool
    mail_poll_seconds: float
    dev_outbox: bool
    signup_credits: int
    trials_per_ip_per_day: int
    mails_per_ip: limits.RateLimitItem
    sample_voices: list[str]
    sample_limit_per_ip: limits.RateLimitItem
    samples_dir: str | None
    low_balance_credits: int
    verify_hours: float
    reset_minutes: float
    invite_days: float
    bind: str
    web_concurrency: int | None
    gunicorn_threads: int | None
    gunicorn_timeout: int
    prometheus_multiproc_dir: str | None

    @property
    def names(self) -> Names:
        return Names(self.voice_aliases, self.model_aliases)


# Flask's names for two settings, which tests may override by either name.
FLASK_NAMES = {"SQLALCHEMY_DATABASE_URI": "DATABASE_URL", "MAX_CONTENT_LENGTH": "MAX_REQUEST_BYTES"}
# Settings given as text and parsed here, by the function that parses each (ValueError when it cannot).
PARSED = {"CREDIT_PACKS": parse_packs, "VOICE_ALIASES": Names.voice_aliases, "MODEL_ALIASES": Names.model_aliases}
RATE_LIMITS = (
    "RATE_LIMIT_PER_KEY",
    "RATE_LIMIT_PER_ACCOUNT",
    "LOGIN_LIMIT_PER_ACCOUNT",
    "LOGIN_LIMIT_PER_IP",
    "KEY_FAILURES_PER_IP",
    "MAILS_PER_IP",
    "SAMPLE_LIMIT_PER_IP",
)
# Settings that must be above zero.
POSITIVE = (
    "DATABASE_POOL_SIZE",
    "UPSTREAM_POOL_SIZE",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT",
    "STREAM_CHUNK_BYTES",
    "MAX_INPUT_CHARS",
    "MAX_REQUEST_BYTES",
    "STALE_CHARGE_SECONDS",
    "PROCESS_LEASE_SECONDS",
    "CLIENT_IDLE_SECONDS",
    "MAX_STREAM_SECONDS",
    "SPEECH_CHARS_PER_SECOND",
    "UPSTREAM_RETRY_SECONDS",
    "SIGN_IN_HOURS",
    "REMEMBER_DAYS",
    "MAIL_TIMEOUT",
    "MAIL_POLL_SECONDS",
    "TOPUP_POLL_SECONDS",
    "VERIFY_HOURS",
    "RESET_MINUTES",
    "INVITE_DAYS",
)
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


def current() -> Settings:
    """The running app's settings, built once by create_app: in a request, a CLI command or any app context."""
    return current_app.extensions["settings"]


def load(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings the app starts with: `environ` read, `overrides` over it, checked.

    Overrides (tests) use the environment's names, or Flask's for the two Flask names;
    any other name is refused, so a misspelt override fails instead of doing nothing.
    """
    settings = parse(environ, overrides)
    check(settings)
    return settings


def parse(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings as typed values, packs, aliases and limits parsed; not yet checked against each other.

    gunicorn.conf.py reads these alone: it also serves the embedded engine, which has no
    SECRET_KEY, so the app's own checks are the app's to make.
    """
    values = read(environ)
    for name, value in (overrides or {}).items():
        name = FLASK_NAMES.get(name, name)
        if name not in values:
            raise SettingError(f"{name} is not a setting; see .env.example.")
        values[name] = value
    for name, parse_text in PARSED.items():
        try:
            values[name] = parse_text(values[name])
        except ValueError as error:
            raise SettingError(f"{name}: {error}.") from None
    for name in RATE_LIMITS:
        try:
            values[name] = limits.parse(values[name])
        except ValueError:
            raise SettingError(f"{name} must read like 600/minute, not {values[name]!r}.") from None
    return Settings(**{name.lower(): value for name, value in values.items()})


def check(settings: Settings) -> None:
    """Refuse to start, with a message naming the setting, when one is missing or cannot work."""
    if not settings.secret_key:
        raise SettingError("SECRET_KEY is not set; see .env.example.")
    for name in POSITIVE:
        value = getattr(settings, name.lower())
        if not value > 0:
            raise SettingError(f"{name} must be above zero, not {value!r}.")
    for name in NOT_NEGATIVE:
        value = getattr(settings, name.lower())
        if value < 0:
            raise SettingError(f"{name} must not be negative, not {value!r}.")
    addresses = [("UPSTREAM_URL", url) for url in base_urls(settings.upstream_url) or [""]]
    if settings.public_base_url:
        addresses.append(("PUBLIC_BASE_URL", settings.public_base_url))
    for name, address in addresses:
        url = urlsplit(address)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SettingError(f"{name} must be an http:// or https:// address, not {address!r}.")
    if settings.mail_url:
        try:
            Smtp.from_url(settings.mail_url)
        except ValueError as error:
            raise SettingError(f"MAIL_URL: {error}") from None
        if not settings.public_base_url:
            # Links in mail must not take their host from a request's Host header (reset-link poisoning).
            raise SettingError("MAIL_URL needs PUBLIC_BASE_URL: the address the links in mail point to.")
    if settings.stale_charge_seconds < settings.process_lease_seconds:
        raise SettingError(
            "STALE_CHARGE_SECONDS: " + too_short(settings.stale_charge_seconds, settings.process_lease_seconds)
        )
    if settings.log_format not in ("text", "json"):
        raise SettingError(f"LOG_FORMAT must be text or json, not {settings.log_format!r}.")
