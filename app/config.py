"""Settings, read from the environment in one place.

Every key is documented in `.env.example`. In development a `.env` file in the
project root is loaded first (python-dotenv); real environment variables win.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = ROOT / "instance" / "kokoro-pay.sqlite3"
# id:credits:price_in_cents
DEFAULT_PACKS = "starter:10000:500,standard:50000:2000,pro:250000:8000"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _list(name: str) -> list[str]:
    return [item.strip() for item in (os.environ.get(name) or "").split(",") if item.strip()]


def database_url(raw: str | None) -> str:
    """Normalise a DATABASE_URL so that PostgreSQL always goes through psycopg 3."""
    if not raw:
        return f"sqlite:///{DEFAULT_SQLITE_PATH}"
    for prefix in ("postgres://", "postgresql://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix) :]
    return raw


def from_environment() -> dict:
    """Build the settings mapping from the process environment."""
    return {
        "SECRET_KEY": os.environ.get("SECRET_KEY") or None,
        "SQLALCHEMY_DATABASE_URI": database_url(os.environ.get("DATABASE_URL")),
        "SQLALCHEMY_POOL_SIZE": _int("DATABASE_POOL_SIZE", 10),
        "UPSTREAM_URL": (os.environ.get("UPSTREAM_URL") or "http://127.0.0.1:8880/v1").rstrip("/"),
        "UPSTREAM_API_KEY": os.environ.get("UPSTREAM_API_KEY") or None,
        "UPSTREAM_CONNECT_TIMEOUT": _float("UPSTREAM_CONNECT_TIMEOUT", 3.05),
        "UPSTREAM_READ_TIMEOUT": _float("UPSTREAM_READ_TIMEOUT", 60.0),
        "UPSTREAM_POOL_SIZE": _int("UPSTREAM_POOL_SIZE", 64),
        "UPSTREAM_CATALOG_TTL": _float("UPSTREAM_CATALOG_TTL", 60.0),
        "VOICE_ALIASES": os.environ.get("VOICE_ALIASES") or "",
        "MODEL_ALIASES": os.environ.get("MODEL_ALIASES") or "",
        "PUBLIC_CATALOG": _bool("PUBLIC_CATALOG", False),
        "STREAM_CHUNK_BYTES": _int("STREAM_CHUNK_BYTES", 16384),
        "MAX_INPUT_CHARS": _int("MAX_INPUT_CHARS", 4096),
        "MAX_CONTENT_LENGTH": _int("MAX_REQUEST_BYTES", 256 * 1024),
        "KEY_LAST_USED_RESOLUTION": _int("KEY_LAST_USED_RESOLUTION", 60),
        "RATELIMIT_STORAGE_URI": os.environ.get("RATELIMIT_STORAGE_URI") or "memory://",
        "RATE_LIMIT_PER_KEY": os.environ.get("RATE_LIMIT_PER_KEY") or "600/minute",
        "RATE_LIMIT_PER_ACCOUNT": os.environ.get("RATE_LIMIT_PER_ACCOUNT") or "1200/minute",
        "MAX_STREAMS_PER_ACCOUNT": _int("MAX_STREAMS_PER_ACCOUNT", 16),
        "LOGIN_LIMIT_PER_ACCOUNT": os.environ.get("LOGIN_LIMIT_PER_ACCOUNT") or "10/15minutes",
        "LOGIN_LIMIT_PER_IP": os.environ.get("LOGIN_LIMIT_PER_IP") or "50/15minutes",
        "STALE_CHARGE_SECONDS": _int("STALE_CHARGE_SECONDS", 600),
        "STREAM_HEARTBEAT_SECONDS": _float("STREAM_HEARTBEAT_SECONDS", 5.0),
        "MAX_STREAM_SECONDS": _float("MAX_STREAM_SECONDS", 1200.0),
        "SPEECH_CHARS_PER_SECOND": _float("SPEECH_CHARS_PER_SECOND", 20.0),
        "TRUSTED_PROXIES": _int("TRUSTED_PROXIES", 0),
        "SESSION_COOKIE_SECURE": _bool("SESSION_COOKIE_SECURE", False),
        "SIGN_IN_HOURS": _float("SIGN_IN_HOURS", 12.0),
        "REMEMBER_DAYS": _float("REMEMBER_DAYS", 30.0),
        "PUBLIC_BASE_URL": (os.environ.get("PUBLIC_BASE_URL") or "").rstrip("/") or None,
        "TRUSTED_HOSTS": _list("TRUSTED_HOSTS") or None,
        "CORS_ALLOWED_ORIGINS": _list("CORS_ALLOWED_ORIGINS"),
        "KEY_FAILURES_PER_IP": os.environ.get("KEY_FAILURES_PER_IP") or "30/minute",
        "STRIPE_SECRET_KEY": os.environ.get("STRIPE_SECRET_KEY") or None,
        "STRIPE_WEBHOOK_SECRET": os.environ.get("STRIPE_WEBHOOK_SECRET") or None,
        "STRIPE_API_BASE": os.environ.get("STRIPE_API_BASE") or None,
        "STRIPE_CHECKOUT_ORIGIN": os.environ.get("STRIPE_CHECKOUT_ORIGIN") or "https://checkout.stripe.com",
        "STRIPE_CURRENCY": (os.environ.get("STRIPE_CURRENCY") or "usd").lower(),
        "CREDIT_PACKS": os.environ.get("CREDIT_PACKS") or DEFAULT_PACKS,
    }
