"""The environment, read: each setting by its name, typed, with its default.

This module imports nothing of the app's, so gunicorn.conf.py can load it by its path and read
the same settings the app reads without importing the app into gunicorn's master (whose modules
every worker forked on a reload would inherit). app/config.py builds the app's Settings from it.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = ROOT / "instance" / "kokoro-pay.sqlite3"
# id:credits:price_in_cents
DEFAULT_PACKS = "starter:10000:500,standard:50000:2000,pro:250000:8000"


class SettingError(RuntimeError):
    """A setting that is missing or cannot be read; the message names it and says why."""


class _Reader:
    """Typed reads of one mapping of settings (the environment, or nothing under test)."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def str(self, name: str, default: str | None = None) -> str | None:
        raw = self.environ.get(name)
        return default if raw in (None, "") else raw

    def int(self, name: str, default: int) -> int:
        return self._number(name, default, int, "a whole number")

    def float(self, name: str, default: float) -> float:
        return self._number(name, default, float, "a number")

    def _number(self, name, default, parse, what: str):
        raw = self.str(name)
        try:
            return default if raw is None else parse(raw)
        except ValueError:
            raise SettingError(f"{name} must be {what}, not {raw!r}; see .env.example.") from None

    def bool(self, name: str, default: bool) -> bool:
        raw = self.str(name)
        if raw is None:
            return default
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise SettingError(f"{name} must be true or false, not {raw!r}; see .env.example.")

    def list(self, name: str) -> list[str]:
        return [item.strip() for item in (self.str(name) or "").split(",") if item.strip()]


def database_url(raw: str | None) -> str:
    """Normalise a DATABASE_URL so that PostgreSQL always goes through psycopg 3."""
    if not raw:
        return f"sqlite:///{DEFAULT_SQLITE_PATH}"
    for prefix in ("postgres://", "postgresql://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix) :]
    return raw


def base_urls(setting: str) -> list[str]:
    """UPSTREAM_URL's servers: one address, or several separated by commas."""
    return [url.strip().rstrip("/") for url in setting.split(",") if url.strip()]


def read(environ: Mapping[str, str]) -> dict[str, Any]:
    """Each setting in `environ` (the process environment; nothing under test) by its name, typed."""
    env = _Reader(environ)
    return {
        "SECRET_KEY": env.str("SECRET_KEY"),
        "DATABASE_URL": database_url(env.str("DATABASE_URL")),
        "DATABASE_POOL_SIZE": env.int("DATABASE_POOL_SIZE", 10),
        "UPSTREAM_URL": env.str("UPSTREAM_URL", "http://127.0.0.1:8880/v1").rstrip("/"),
        "UPSTREAM_API_KEY": env.str("UPSTREAM_API_KEY"),
        "UPSTREAM_CONNECT_TIMEOUT": env.float("UPSTREAM_CONNECT_TIMEOUT", 3.05),
        "UPSTREAM_READ_TIMEOUT": env.float("UPSTREAM_READ_TIMEOUT", 60.0),
        "UPSTREAM_POOL_SIZE": env.int("UPSTREAM_POOL_SIZE", 64),
        "UPSTREAM_CATALOG_TTL": env.float("UPSTREAM_CATALOG_TTL", 60.0),
        "UPSTREAM_MAX_STREAMS": env.int("UPSTREAM_MAX_STREAMS", 0),
        "UPSTREAM_QUEUE": env.int("UPSTREAM_QUEUE", 32),
        "UPSTREAM_QUEUE_SECONDS": env.float("UPSTREAM_QUEUE_SECONDS", 10.0),
        "UPSTREAM_QUEUE_PER_ACCOUNT": env.int("UPSTREAM_QUEUE_PER_ACCOUNT", 0),
        "UPSTREAM_RETRY_SECONDS": env.float("UPSTREAM_RETRY_SECONDS", 5.0),
        "VOICE_ALIASES": env.str("VOICE_ALIASES", ""),
        "MODEL_ALIASES": env.str("MODEL_ALIASES", ""),
        "PUBLIC_CATALOG": env.bool("PUBLIC_CATALOG", False),
        "STREAM_CHUNK_BYTES": env.int("STREAM_CHUNK_BYTES", 16384),
        "MAX_INPUT_CHARS": env.int("MAX_INPUT_CHARS", 4096),
        "MAX_REQUEST_BYTES": env.int("MAX_REQUEST_BYTES", 256 * 1024),
        "KEY_LAST_USED_RESOLUTION": env.int("KEY_LAST_USED_RESOLUTION", 60),
        "RATELIMIT_STORAGE_URI": env.str("RATELIMIT_STORAGE_URI", "memory://"),
        "RATE_LIMIT_PER_KEY": env.str("RATE_LIMIT_PER_KEY", "600/minute"),
        "RATE_LIMIT_PER_ACCOUNT": env.str("RATE_LIMIT_PER_ACCOUNT", "1200/minute"),
        "MAX_STREAMS_PER_ACCOUNT": env.int("MAX_STREAMS_PER_ACCOUNT", 16),
        "LOGIN_LIMIT_PER_ACCOUNT": env.str("LOGIN_LIMIT_PER_ACCOUNT", "10/15minutes"),
        "LOGIN_LIMIT_PER_IP": env.str("LOGIN_LIMIT_PER_IP", "50/15minutes"),
        "STALE_CHARGE_SECONDS": env.int("STALE_CHARGE_SECONDS", 600),
        "STREAM_HEARTBEAT_SECONDS": env.float("STREAM_HEARTBEAT_SECONDS", 5.0),
        "PROCESS_LEASE_SECONDS": env.float("PROCESS_LEASE_SECONDS", 60.0),
        "CLIENT_IDLE_SECONDS": env.float("CLIENT_IDLE_SECONDS", 60.0),
        "MAX_STREAM_SECONDS": env.float("MAX_STREAM_SECONDS", 1200.0),
        "SPEECH_CHARS_PER_SECOND": env.float("SPEECH_CHARS_PER_SECOND", 20.0),
        "TRUSTED_PROXIES": env.int("TRUSTED_PROXIES", 0),
        "SESSION_COOKIE_SECURE": env.bool("SESSION_COOKIE_SECURE", False),
        "SIGN_IN_HOURS": env.float("SIGN_IN_HOURS", 12.0),
        "REMEMBER_DAYS": env.float("REMEMBER_DAYS", 30.0),
        "PUBLIC_BASE_URL": env.str("PUBLIC_BASE_URL", "").rstrip("/") or None,
        "TRUSTED_HOSTS": env.list("TRUSTED_HOSTS") or None,
        "CORS_ALLOWED_ORIGINS": env.list("CORS_ALLOWED_ORIGINS"),
        "KEY_FAILURES_PER_IP": env.str("KEY_FAILURES_PER_IP", "30/minute"),
        "STRIPE_SECRET_KEY": env.str("STRIPE_SECRET_KEY"),
        "STRIPE_WEBHOOK_SECRET": env.str("STRIPE_WEBHOOK_SECRET"),
        "STRIPE_API_BASE": env.str("STRIPE_API_BASE"),
        "STRIPE_CHECKOUT_ORIGIN": env.str("STRIPE_CHECKOUT_ORIGIN", "https://checkout.stripe.com"),
        "STRIPE_CURRENCY": env.str("STRIPE_CURRENCY", "usd").lower(),
        "STRIPE_AUTOMATIC_TAX": env.bool("STRIPE_AUTOMATIC_TAX", False),
        "STRIPE_PORTAL_ORIGIN": env.str("STRIPE_PORTAL_ORIGIN", "https://billing.stripe.com"),
        "TOPUP_WORKER": env.bool("TOPUP_WORKER", True),
        "TOPUP_POLL_SECONDS": env.float("TOPUP_POLL_SECONDS", 10.0),
        "CREDIT_PACKS": env.str("CREDIT_PACKS", DEFAULT_PACKS),
        "LOG_FORMAT": env.str("LOG_FORMAT", "text").lower(),
        "METRICS_TOKEN": env.str("METRICS_TOKEN"),
        "MAIL_URL": env.str("MAIL_URL"),
        "MAIL_FROM": env.str("MAIL_FROM", "kokoro-pay <noreply@localhost>"),
        "MAIL_TIMEOUT": env.float("MAIL_TIMEOUT", 10.0),
        "MAIL_WORKER": env.bool("MAIL_WORKER", True),
        "MAIL_POLL_SECONDS": env.float("MAIL_POLL_SECONDS", 5.0),
        "DEV_OUTBOX": env.bool("DEV_OUTBOX", False),
        "SIGNUP_CREDITS": env.int("SIGNUP_CREDITS", 0),
        "TRIALS_PER_IP_PER_DAY": env.int("TRIALS_PER_IP_PER_DAY", 3),
        "MAILS_PER_IP": env.str("MAILS_PER_IP", "10/hour"),
        "SAMPLE_VOICES": env.list("SAMPLE_VOICES") or ["af_heart", "am_michael", "bf_emma"],
        "SAMPLE_LIMIT_PER_IP": env.str("SAMPLE_LIMIT_PER_IP", "30/minute"),
        "SAMPLES_DIR": env.str("SAMPLES_DIR", str(ROOT / "instance" / "samples")),
        "LOW_BALANCE_CREDITS": env.int("LOW_BALANCE_CREDITS", 1000),
        "VERIFY_HOURS": env.float("VERIFY_HOURS", 72.0),
        "RESET_MINUTES": env.float("RESET_MINUTES", 60.0),
        "INVITE_DAYS": env.float("INVITE_DAYS", 7.0),
        # The server process (gunicorn.conf.py): where it listens, its workers and threads
        # (None: what gunicorn.conf.py derives), and where the workers keep their metric samples.
        "BIND": env.str("BIND", "127.0.0.1:8000"),
        "WEB_CONCURRENCY": env.int("WEB_CONCURRENCY", None),
        "GUNICORN_THREADS": env.int("GUNICORN_THREADS", None),
        "GUNICORN_TIMEOUT": env.int("GUNICORN_TIMEOUT", 120),
        "PROMETHEUS_MULTIPROC_DIR": env.str("PROMETHEUS_MULTIPROC_DIR"),
    }
