"""Abuse limits: request rates per key and per account, failed sign-ins per account and per IP,
failed API key look-ups per IP, mails asked for and free trials granted per client address.

Windows are kept by the `limits` library (the core of Flask-Limiter) in memory by
default, or in Redis (`RATELIMIT_STORAGE_URI=redis://…`) so several processes and
hosts share them; gunicorn.conf.py refuses to start several workers on the in-memory
store. The cap on concurrent streams per account is kept by the database (app/metering.py).

When the store cannot be reached (Redis down), the limits fail open: every check lets the
request through, an error is logged (at most once every LOG_EVERY_SECONDS) and
kokoro_rate_limit_store_failures_total counts each one. The limits are there against abuse;
refusing every request, paying customers' included, would turn a Redis outage into an outage
of the service. What money depends on (balances, the stream cap, one free trial per mailbox)
is kept by the database and holds without Redis.
"""

import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import limits
from limits.errors import StorageError
from limits.storage import MovingWindowSupport, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from app import metrics

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

# How often the in-process windows drop their expired entries.
SWEEP_SECONDS = 1.0
# While the store is down, how often that is logged (every failure is counted in the metric).
LOG_EVERY_SECONDS = 10.0
# The clock the windows are kept by (seconds since the epoch, as limits' reset times are); tests move it by hand.
clock = time.time


class InProcessWindows(Storage, MovingWindowSupport):
    """Moving windows kept in this process, on limits' public storage interface, without a thread.

    limits' own MemoryStorage drops expired entries in a timer thread it starts 10 ms after a
    hit whenever the previous one has ended, so at a few requests a second every API request
    paid for a thread start (~0.3 ms of its time to first byte). Here each window drops its
    expired hits when it is asked, and the hit that finds the last sweep over SWEEP_SECONDS
    old drops every window's. A hit counts in its window for `expiry` seconds, as in limits'
    storages; only the moving window strategy is kept (the only one used here).
    """

    def __init__(self):
        super().__init__()
        # Each window's hits, oldest first, as the times they leave it.
        self.events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._next_sweep = clock() + SWEEP_SECONDS

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        now = clock()
        with self._lock:
            self._sweep(now)
            hits = self.events.setdefault(key, deque())
            _drop_expired(hits, now)
            if len(hits) + amount > limit:
                return False
            hits.extend([now + expiry] * amount)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """When the window's oldest hit came (now if none) and how many it holds."""
        now = clock()
        with self._lock:
            hits = self.events.get(key, deque())
            _drop_expired(hits, now)
            return (hits[0] - expiry if hits else now), len(hits)

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_SECONDS
        for key, hits in list(self.events.items()):
            _drop_expired(hits, now)
            if not hits:
                del self.events[key]

    def clear(self, key: str) -> None:
        with self._lock:
            self.events.pop(key, None)

    def reset(self) -> int:
        with self._lock:
            count = len(self.events)
            self.events.clear()
        return count

    def check(self) -> bool:
        return True

    # The fixed window strategies' counters, which Storage requires and nothing here uses.
    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        raise NotImplementedError("in-process windows are moving windows only")

    def get(self, key: str) -> int:
        raise NotImplementedError("in-process windows are moving windows only")

    def get_expiry(self, key: str) -> float:
        raise NotImplementedError("in-process windows are moving windows only")


def _drop_expired(hits: deque[float], now: float) -> None:
    while hits and hits[0] < now:
        hits.popleft()


class Throttle:
    def __init__(self, settings: "Settings"):
        uri = settings.ratelimit_storage_uri
        storage = InProcessWindows() if uri == "memory://" else storage_from_string(uri, wrap_exceptions=True)
        self._windows = _FailingOpen(MovingWindowRateLimiter(storage))
        self.per_key = settings.rate_limit_per_key
        self.per_account = settings.rate_limit_per_account
        self.logins_per_account = settings.login_limit_per_account
        self.logins_per_ip = settings.login_limit_per_ip
        self.key_failures_per_ip = settings.key_failures_per_ip
        self.samples_per_ip = settings.sample_limit_per_ip
        self.mails_per_ip = settings.mails_per_ip
        trials = settings.trials_per_ip_per_day
        self.trials_per_ip = limits.RateLimitItemPerDay(trials) if trials else None

    def _retry_after(self, item, *identifiers) -> int:
        reset_at = self._windows.get_window_stats(item, *identifiers).reset_time
        return max(1, math.ceil(reset_at - clock()))

    def api_request(self, key_id: int | str, team_id: int) -> int | None:
        """Count one API request of a key and of its team (the account); the seconds to wait when a limit
        is reached, else None."""
        if not self._windows.hit(self.per_key, "key", str(key_id)):
            return self._retry_after(self.per_key, "key", str(key_id))
        if not self._windows.hit(self.per_account, "account", str(team_id)):
            return self._retry_after(self.per_account, "account", str(team_id))
        return None

    def key_guessing_blocked(self, ip: str) -> int | None:
        """Seconds until `ip` may present keys again, when its failed key look-ups have used up a window."""
        if not self._windows.test(self.key_failures_per_ip, "key-failure-ip", ip):
            return self._retry_after(self.key_failures_per_ip, "key-failure-ip", ip)
        return None

    def key_failed(self, ip: str) -> None:
        self._windows.hit(self.key_failures_per_ip, "key-failure-ip", ip)

    def sample_request(self, ip: str) -> int | None:
        """Count one landing-page sample fetched from `ip`; the seconds to wait past SAMPLE_LIMIT_PER_IP, else None."""
        if not self._windows.hit(self.samples_per_ip, "sample-ip", ip):
            return self._retry_after(self.samples_per_ip, "sample-ip", ip)
        return None

    def anonymous_request(self, ip: str) -> int | None:
        """Count one keyless request (the public catalog) from `ip`, at the per-key rate."""
        if not self._windows.hit(self.per_key, "anonymous-ip", ip):
            return self._retry_after(self.per_key, "anonymous-ip", ip)
        return None

    def mail_allowed(self, ip: str) -> bool:
        """Count one mail that a request from `ip` asks for (sign-up, reset, …); False past MAILS_PER_IP."""
        return self._windows.hit(self.mails_per_ip, "mail-ip", ip)

    def trial_allowed(self, client: str) -> bool:
        """Count one free trial granted to `client`; False past TRIALS_PER_IP_PER_DAY in the last 24 hours."""
        return self.trials_per_ip is not None and self._windows.hit(self.trials_per_ip, "trial-ip", client)

    def login_blocked(self, email: str, ip: str) -> int | None:
        """Seconds until another sign-in may be tried, when failures have used up a window."""
        for item, kind, name in (
            (self.logins_per_account, "login-account", email),
            (self.logins_per_ip, "login-ip", ip),
        ):
            if not self._windows.test(item, kind, name):
                return self._retry_after(item, kind, name)
        return None

    def login_failed(self, email: str, ip: str) -> None:
        self._windows.hit(self.logins_per_account, "login-account", email)
        self._windows.hit(self.logins_per_ip, "login-ip", ip)


class _FailingOpen:
    """The windows' hit, test and stats, answering "allowed" when their store cannot be reached."""

    def __init__(self, windows: MovingWindowRateLimiter):
        self._windows = windows
        self._logged_at = -math.inf

    def hit(self, item, *identifiers) -> bool:
        return self._ask(self._windows.hit, item, *identifiers, allowed=True)

    def test(self, item, *identifiers) -> bool:
        return self._ask(self._windows.test, item, *identifiers, allowed=True)

    def get_window_stats(self, item, *identifiers):
        # Asked only after a limit was reached: then a second from now.
        return self._ask(self._windows.get_window_stats, item, *identifiers, allowed=_Reset(clock() + 1))

    def _ask(self, check, item, *identifiers, allowed):
        try:
            return check(item, *identifiers)
        except StorageError as failure:
            metrics.RATE_LIMIT_STORE_FAILURES.inc()
            if time.monotonic() - self._logged_at >= LOG_EVERY_SECONDS:
                self._logged_at = time.monotonic()
                log.error("rate limits unavailable, letting requests through: %s", failure.storage_error)
            return allowed


class _Reset:
    def __init__(self, reset_time: float):
        self.reset_time = reset_time
