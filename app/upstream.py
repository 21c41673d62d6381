"""The Kokoro servers we sit in front of: one pooled HTTP session per app, speaking to them.

`UPSTREAM_URL` may list several servers. Each speech request reserves a place on one before
it is charged; which server, the wait when all are full, and which servers are taken out for
failing are app/places.py's, shared by every gateway process and host. A server that fails
before sending audio (no connection, a timeout, a 5xx) is taken out there, and the request
moves on to the next with room.
"""

import re
import threading
import time
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError

from app import metrics
from app.config import Settings, base_urls
from app.places import Busy, Slot, Upstreams

# Statuses with which an upstream blames the request itself (FastAPI's validation errors are 422).
REQUEST_REFUSED = (400, 422)
MAX_REASON = 160
# How long a failed catalog fetch is remembered before the upstream is asked again.
FAILURE_TTL = 5.0


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
    def from_settings(cls, settings: Settings, app, lease) -> "Upstream":
        """For `app`, whose processes hold their places on the servers under `lease` (app/liveness.py)."""
        upstreams = Upstreams(
            app,
            lease,
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

    def reserve(self, account: int | None = None, before_waiting=None) -> Slot:
        """A place on the least busy server for one speech request of `account`; Busy when there is none in time."""
        return self.upstreams.reserve(account=account, before_waiting=before_waiting)

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
                self.upstreams.worked(slot)
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
