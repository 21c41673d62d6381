"""The Kokoro servers we sit in front of: one pooled HTTP session per app, and a place on
the least busy server for each speech request.

`UPSTREAM_URL` may list several servers. Each speech request reserves a place on one before
it is charged (`Upstreams.reserve`): the server with the fewest streams in flight, among
those not taken out for failing. With UPSTREAM_MAX_STREAMS set, a full server takes no
more; when all are full a request waits, at most UPSTREAM_QUEUE of them for at most
UPSTREAM_QUEUE_SECONDS, and is then refused (`Busy`) with nothing charged. A server that
fails before sending audio (no connection, a timeout, a 5xx) is taken out for
UPSTREAM_RETRY_SECONDS, doubling while it keeps failing, and the request moves on to the
next; once that time is up the next request tries it again, which brings it back. One
account holds at most UPSTREAM_QUEUE_PER_ACCOUNT places in the wait (a quarter of it by
default); its next request is refused at once (`AccountQueueFull`), so one client cannot
crowd out the others. The counts are per gateway process.
"""

import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError

from app import metrics
from app.config import Settings, base_urls

# Statuses with which an upstream blames the request itself (FastAPI's validation errors are 422).
REQUEST_REFUSED = (400, 422)
MAX_REASON = 160
# How long a failed catalog fetch is remembered before the upstream is asked again.
FAILURE_TTL = 5.0
# The longest a failing server is taken out for, however often it failed.
MAX_RETRY_SECONDS = 60.0
# The clock a failed server's time out is kept by; tests move it by hand.
clock = time.monotonic


class UpstreamError(Exception):
    """The upstream could not give a usable answer; `detail` is safe to show a client.

    `reason` is the upstream's own one-line message, where it gave one. `retry` says
    whether another server may be asked instead (nothing was started, or nothing came
    of it); a timeout is not retried: the client has waited long enough.
    """

    def __init__(self, detail: str, status: int | None = None, reason: str | None = None, retry: bool = True):
        super().__init__(detail, status, reason, retry)
        self.detail = detail
        self.status = status
        self.reason = reason or detail
        self.retry = retry

    @property
    def blames_request(self) -> bool:
        return self.status in REQUEST_REFUSED

    @property
    def kind(self) -> str:
        """For the metrics: refused (the request), timeout, unreachable, status (not 2xx), no_audio."""
        if self.blames_request:
            return "refused"
        if not self.retry:
            return "timeout"
        if self.status is None:
            return "unreachable"
        return "no_audio" if 200 <= self.status < 300 else "status"


# A server's message is shown to clients and written to the database: no control characters
# (the database refuses NUL) and no lone surrogates (half a UTF-16 pair, which no encoder writes).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """`text` on one printable line, cut to its first sentence when longer than `limit` (a voice list, say)."""
    line = " ".join(_UNPRINTABLE.sub(" ", str(text)).split())
    if len(line) > limit:
        first = re.match(r".+?[.!?](?=\s)", line)
        if first and len(first.group()) <= limit:
            line = first.group()
        else:
            # At the last space before the limit; at the limit itself when there is none.
            space = line.rfind(" ", 0, limit)
            line = line[: space if space > 0 else limit] + " …"
    return line if line.endswith((".", "!", "?", "…")) else line + "."


def _error_reason(response: requests.Response) -> str:
    """The upstream's own `{"detail": …}` message where it gave one, on one short line."""
    try:
        body = response.json()
    except (ValueError, requests.RequestException):
        return f"upstream answered {response.status_code}."
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("error")
    if isinstance(detail, list):
        detail = "; ".join(_validation_message(item) for item in detail)
    return one_line(detail) if detail else f"upstream answered {response.status_code}."


def _validation_message(item) -> str:
    """One of FastAPI's 422 entries, as "'speed': Input should be …"."""
    if not isinstance(item, dict):
        return str(item)
    loc = item.get("loc")
    location = [str(part) for part in loc if part != "body"] if isinstance(loc, list) else []
    return f"'{location[-1]}': {item.get('msg', '')}" if location else str(item.get("msg", item))


# What a server without a route answers for it.
NO_SUCH_ROUTE = (404, 405)


def root_of(base_url: str) -> str:
    """A speech server's root from its API's base URL (UPSTREAM_URL names …/v1)."""
    return base_url.removesuffix("/v1")


def timed_out(exc: requests.RequestException) -> bool:
    """True for a timeout, also the read timeouts that requests reports as ConnectionError mid-body."""
    return isinstance(exc, requests.Timeout) or any(isinstance(arg, ReadTimeoutError) for arg in exc.args)


def is_audio(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type.startswith("audio/") or media_type == "application/octet-stream"


class Busy(Exception):
    """Every speech server is full, and no place freed up in time."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class AccountQueueFull(Busy):
    """The account already has its share of the requests waiting for a server."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(retry_after)
        self.limit = limit


class Server:
    """One Kokoro server: its address, its streams in flight, and whether it is taken out."""

    def __init__(self, base_url: str, limit: int):
        self.base_url = base_url
        self.limit = limit
        self.in_flight = 0
        self.failures = 0
        self.out_until = 0.0

    def has_room(self) -> bool:
        return not self.limit or self.in_flight < self.limit

    def is_out(self, now: float) -> bool:
        return now < self.out_until


class Slot:
    """A place on one server, held from before the charge until the stream is closed."""

    def __init__(self, upstreams: "Upstreams", server: Server):
        self.upstreams = upstreams
        self.server = server
        self.waited = 0.0
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.upstreams.release(self.server)


class Upstreams:
    """The servers, least busy first; see the module's docstring."""

    def __init__(
        self,
        base_urls: list[str],
        limit: int,
        queue: int,
        queue_seconds: float,
        retry_seconds: float,
        queue_per_account: int = 0,
    ):
        self.servers = [Server(url, limit) for url in base_urls]
        self.queue = queue
        self.queue_seconds = queue_seconds
        self.retry_seconds = retry_seconds
        # 0: a quarter of the wait, at least one place.
        self.queue_per_account = queue_per_account or max(1, queue // 4)
        self.waiting = 0
        self._waiting_by_account: Counter = Counter()
        self._changed = threading.Condition()

    def reserve(self, exclude: tuple[Server, ...] = (), wait: bool = True, account: int | None = None) -> Slot:
        """A place on the least busy server not in `exclude`; Busy when none frees up in time.

        AccountQueueFull, at once, when `account` already has its share of the wait.
        """
        started = time.monotonic()
        retry_after = max(1, math.ceil(self.queue_seconds))
        with self._changed:
            server = self._pick(exclude)
            if server is None and wait and self.waiting < self.queue:
                if account is not None and self._waiting_by_account[account] >= self.queue_per_account:
                    raise AccountQueueFull(self.queue_per_account, retry_after)
                self.waiting += 1
                self._waiting_by_account[account] += 1
                try:
                    deadline = started + self.queue_seconds
                    while server is None and (left := deadline - time.monotonic()) > 0:
                        self._changed.wait(left)
                        server = self._pick(exclude)
                finally:
                    self.waiting -= 1
                    self._waiting_by_account[account] -= 1
                    if not self._waiting_by_account[account]:
                        del self._waiting_by_account[account]
            if server is None:
                raise Busy(retry_after)
            server.in_flight += 1
        slot = Slot(self, server)
        slot.waited = time.monotonic() - started
        return slot

    def _pick(self, exclude) -> Server | None:
        """The least busy server with room: one in service if any is, else one taken out."""
        now = clock()
        candidates = [server for server in self.servers if server not in exclude]
        in_service = [server for server in candidates if not server.is_out(now)]
        # While a server in service is only full, wait for it rather than try one that failed.
        pool = in_service or candidates
        with_room = [server for server in pool if server.has_room()]
        return min(with_room, key=lambda server: server.in_flight, default=None)

    def release(self, server: Server) -> None:
        with self._changed:
            server.in_flight -= 1
            self._changed.notify_all()

    def failed(self, server: Server) -> None:
        with self._changed:
            server.failures += 1
            pause = min(self.retry_seconds * 2 ** (server.failures - 1), MAX_RETRY_SECONDS)
            server.out_until = clock() + pause
            # Requests waiting for a server may now take one that was not their first choice.
            self._changed.notify_all()

    def worked(self, server: Server) -> None:
        if server.failures:
            with self._changed:
                server.failures = 0
                server.out_until = 0.0

    def states(self) -> list[dict]:
        """Each server's streams in flight and whether it is taken out now, in the order configured."""
        now = clock()
        with self._changed:
            return [{"streams": server.in_flight, "taken_out": server.is_out(now)} for server in self.servers]

    def in_order(self) -> list[Server]:
        """Every server, those in service first: the order to ask for a document."""
        now = clock()
        return sorted(self.servers, key=lambda server: server.is_out(now))


class SpeechStream:
    """An upstream audio response whose first bytes have already arrived.

    It holds its server's place until it is closed.
    """

    def __init__(self, response: requests.Response, first_chunk: bytes, rest: Iterator[bytes], slot: Slot, ms: float):
        self.response = response
        self.status = response.status_code
        self.content_type = response.headers["Content-Type"]
        self.first_chunk = first_chunk
        self.rest = rest
        self.slot = slot
        # From sending the request to its first audio bytes, in milliseconds.
        self.first_byte_ms = ms

    def close(self) -> None:
        self.response.close()
        self.slot.release()


class Upstream:
    def __init__(
        self,
        upstreams: Upstreams,
        api_key: str | None,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        catalog_ttl: float,
    ):
        self.upstreams = upstreams
        self.timeout = (connect_timeout, read_timeout)
        self.catalog_ttl = catalog_ttl
        self.session = requests.Session()
        # The upstream is addressed directly: no proxy settings or .netrc from the environment,
        # which requests would otherwise re-read on every call.
        self.session.trust_env = False
        # Kept-alive connections, up to one per concurrent stream, for each server.
        adapter = HTTPAdapter(pool_connections=len(upstreams.servers), pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._catalog: dict[str, tuple] = {}
        self._catalog_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Upstream":
        upstreams = Upstreams(
            base_urls(settings.upstream_url),
            settings.upstream_max_streams,
            settings.upstream_queue,
            settings.upstream_queue_seconds,
            settings.upstream_retry_seconds,
            settings.upstream_queue_per_account,
        )
        return cls(
            upstreams,
            settings.upstream_api_key,
            settings.upstream_connect_timeout,
            settings.upstream_read_timeout,
            settings.upstream_pool_size,
            settings.upstream_catalog_ttl,
        )

    def states(self) -> list[dict]:
        """What health may say of the servers: their load and whether each is taken out (no addresses)."""
        return self.upstreams.states()

    def reserve(self, account: int | None = None) -> Slot:
        """A place on the least busy server for one speech request of `account`; Busy when there is none in time."""
        return self.upstreams.reserve(account=account)

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.ConnectTimeout:
            raise UpstreamError("The speech server could not be reached.") from None
        except requests.RequestException as exc:
            if timed_out(exc):
                raise UpstreamError("The speech server did not answer in time.", retry=False) from None
            raise UpstreamError("The speech server could not be reached.") from None

    def _send(self, method: str, path: str, at_root: bool = False) -> requests.Response:
        """The first answer from the servers, those in service first; a failed connection moves on.
        `at_root`: `path` is under the server's root, not its API's base (…/v1)."""
        failure = UpstreamError("The speech server could not be reached.")
        for server in self.upstreams.in_order():
            base = root_of(server.base_url) if at_root else server.base_url
            try:
                return self._request(method, f"{base}/{path}")
            except UpstreamError as error:
                self.upstreams.failed(server)
                if not error.retry:
                    raise
                failure = error
        raise failure

    def open_speech(self, payload: dict, chunk_size: int, slot: Slot, captioned: bool = False) -> SpeechStream:
        """Start a streamed synthesis on `slot`'s server and wait for its first audio bytes.

        The stream holds the slot until it is closed. A server that fails before sending
        audio is taken out and, unless it timed out, the next one with room is tried.
        Raises UpstreamError, with the response closed and the slot released, when no
        server gives audio: unreachable, timed out, non-2xx, not audio, empty.
        `captioned`: the server's captioned route, whose answer is JSON lines (app/captions.py).
        """
        tried = []
        try:
            while True:
                tried.append(slot.server)
                try:
                    stream = self._open(payload, chunk_size, slot, captioned)
                except UpstreamError as failure:
                    metrics.UPSTREAM_FAILURES.labels(failure.kind).inc()
                    # A server without the captioned route is not broken: it stays in service.
                    if failure.blames_request or (captioned and failure.status in NO_SUCH_ROUTE):
                        raise
                    self.upstreams.failed(slot.server)
                    if not failure.retry:
                        raise
                    try:
                        following = self.upstreams.reserve(tuple(tried), wait=False)
                    except Busy:
                        raise failure from None
                    slot.release()
                    slot = following
                    continue
                self.upstreams.worked(slot.server)
                return stream
        except BaseException:
            slot.release()
            raise

    def _open(self, payload: dict, chunk_size: int, slot: Slot, captioned: bool) -> SpeechStream:
        started = time.monotonic()
        url = (
            f"{root_of(slot.server.base_url)}/dev/captioned_speech"
            if captioned
            else f"{slot.server.base_url}/audio/speech"
        )
        response = self._request("post", url, json=payload, stream=True)
        try:
            if not 200 <= response.status_code < 300:
                reason = _error_reason(response)
                raise UpstreamError(f"Upstream synthesis error: {reason}", response.status_code, reason)
            content_type = response.headers.get("Content-Type", "")
            if not (content_type.startswith("application/json") if captioned else is_audio(content_type)):
                raise UpstreamError(
                    "Upstream synthesis error: the speech server answered without audio.", response.status_code
                )
            chunks = response.iter_content(chunk_size)
            first_chunk = next((chunk for chunk in chunks if chunk), b"")
            if not first_chunk:
                raise UpstreamError("Upstream synthesis error: the speech server sent no audio.", response.status_code)
        except requests.RequestException as exc:
            response.close()
            if timed_out(exc):
                raise UpstreamError(
                    "The speech server did not send audio in time.", response.status_code, retry=False
                ) from None
            raise UpstreamError("The speech server broke off before sending audio.", response.status_code) from None
        except UpstreamError:
            response.close()
            raise
        return SpeechStream(response, first_chunk, chunks, slot, (time.monotonic() - started) * 1000)

    def has_captions(self) -> bool | None:
        """Whether the speech servers have the captioned route (their /openapi.json lists it, as
        Kokoro-FastAPI's and the embedded engine's do); None when that cannot be read now."""
        try:
            document = self.catalog("openapi.json", at_root=True)
        except UpstreamError as failure:
            # A server that answers, but has no such document, has no captioned route either.
            return False if failure.status == 404 else None
        paths = document.get("paths") if isinstance(document, dict) else None
        return isinstance(paths, dict) and "/dev/captioned_speech" in paths

    def catalog(self, path: str, at_root: bool = False):
        """GET a small JSON document (`models`, `audio/voices`), cached for `catalog_ttl` seconds.

        A failure is remembered for a few seconds too, so a sick upstream is not asked
        again by every speech request that checks its names.
        """
        # (expires at, document, the failure's arguments when the fetch failed)
        key = (path, at_root)
        cached = self._catalog.get(key)
        if cached is None or time.monotonic() >= cached[0]:
            with self._catalog_lock:
                cached = self._catalog.get(key)
                if cached is None or time.monotonic() >= cached[0]:
                    try:
                        cached = (time.monotonic() + self.catalog_ttl, self._fetch_document(path, at_root), None)
                    except UpstreamError as failure:
                        # Only its words are kept: the exception's traceback would keep the
                        # frames of the request that met it (and their streams) alive.
                        cached = (time.monotonic() + min(self.catalog_ttl, FAILURE_TTL), None, failure.args)
                    self._catalog[key] = cached
        _, document, failure = cached
        if failure:
            raise UpstreamError(*failure)
        return document

    def _fetch_document(self, path: str, at_root: bool = False):
        with self._send("get", path, at_root) as response:
            try:
                if response.status_code != 200:
                    raise UpstreamError(f"Upstream error: {_error_reason(response)}", response.status_code)
                return response.json()
            except ValueError:  # requests' JSONDecodeError is also a RequestException: keep this first.
                raise UpstreamError("Upstream error: the speech server answered with invalid JSON.") from None
            except requests.RequestException:
                raise UpstreamError("The speech server could not be reached.") from None
