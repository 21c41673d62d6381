"""The Kokoro server we sit in front of: one pooled HTTP session per app."""

import re
import threading
import time
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError

# Statuses with which an upstream blames the request itself (FastAPI's validation errors are 422).
REQUEST_REFUSED = (400, 422)
MAX_REASON = 160
# How long a failed catalog fetch is remembered before the upstream is asked again.
FAILURE_TTL = 5.0


class UpstreamError(Exception):
    """The upstream could not give a usable answer; `detail` is safe to show a client.

    `reason` is the upstream's own one-line message, where it gave one.
    """

    def __init__(self, detail: str, status: int | None = None, reason: str | None = None):
        super().__init__(detail, status, reason)
        self.detail = detail
        self.status = status
        self.reason = reason or detail

    @property
    def blames_request(self) -> bool:
        return self.status in REQUEST_REFUSED


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """`text` on one line, cut to its first sentence when it is longer than `limit` (a voice list, say)."""
    line = " ".join(str(text).split())
    if len(line) > limit:
        first = re.match(r".+?[.!?](?=\s)", line)
        line = first.group() if first and len(first.group()) <= limit else line[: line.rfind(" ", 0, limit)] + " …"
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
    location = [str(part) for part in item.get("loc", []) if part != "body"]
    return f"'{location[-1]}': {item.get('msg', '')}" if location else str(item.get("msg", item))


def timed_out(exc: requests.RequestException) -> bool:
    """True for a timeout, also the read timeouts that requests reports as ConnectionError mid-body."""
    return isinstance(exc, requests.Timeout) or any(isinstance(arg, ReadTimeoutError) for arg in exc.args)


def is_audio(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type.startswith("audio/") or media_type == "application/octet-stream"


class SpeechStream:
    """An upstream audio response whose first bytes have already arrived."""

    def __init__(self, response: requests.Response, first_chunk: bytes, rest: Iterator[bytes]):
        self.response = response
        self.status = response.status_code
        self.content_type = response.headers["Content-Type"]
        self.first_chunk = first_chunk
        self.rest = rest

    def close(self) -> None:
        self.response.close()


class Upstream:
    def __init__(
        self,
        base_urls: list[str],
        api_key: str | None,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        catalog_ttl: float,
    ):
        # Tried in order: the next one only when a connection to the previous one fails.
        self.base_urls = base_urls
        self.timeout = (connect_timeout, read_timeout)
        self.catalog_ttl = catalog_ttl
        self.session = requests.Session()
        # The upstream is addressed directly: no proxy settings or .netrc from the environment,
        # which requests would otherwise re-read on every call.
        self.session.trust_env = False
        # Kept-alive connections, up to one per concurrent stream.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._catalog: dict[str, tuple] = {}
        self._catalog_lock = threading.Lock()

    @classmethod
    def from_config(cls, config) -> "Upstream":
        return cls(
            [url.strip().rstrip("/") for url in config["UPSTREAM_URL"].split(",") if url.strip()],
            config["UPSTREAM_API_KEY"],
            config["UPSTREAM_CONNECT_TIMEOUT"],
            config["UPSTREAM_READ_TIMEOUT"],
            config["UPSTREAM_POOL_SIZE"],
            config["UPSTREAM_CATALOG_TTL"],
        )

    def _send(self, method: str, path: str, **kwargs) -> requests.Response:
        """The first answer from the upstreams in order; a failed connection moves on to the next."""
        for base_url in self.base_urls:
            try:
                return self.session.request(method, f"{base_url}/{path}", timeout=self.timeout, **kwargs)
            except requests.ConnectionError as exc:
                if timed_out(exc) and not isinstance(exc, requests.ConnectTimeout):
                    raise UpstreamError("The speech server did not answer in time.") from None
                continue
            except requests.Timeout:
                raise UpstreamError("The speech server did not answer in time.") from None
            except requests.RequestException:
                raise UpstreamError("The speech server could not be reached.") from None
        raise UpstreamError("The speech server could not be reached.")

    def open_speech(self, payload: dict, chunk_size: int) -> SpeechStream:
        """Start a streamed synthesis and wait for its first audio bytes.

        Raises UpstreamError, with the response closed, for everything that goes
        wrong before audio flows: unreachable, timed out, non-2xx, not audio, empty.
        """
        response = self._send("post", "audio/speech", json=payload, stream=True)
        try:
            if not 200 <= response.status_code < 300:
                reason = _error_reason(response)
                raise UpstreamError(f"Upstream synthesis error: {reason}", response.status_code, reason)
            if not is_audio(response.headers.get("Content-Type", "")):
                raise UpstreamError(
                    "Upstream synthesis error: the speech server answered without audio.", response.status_code
                )
            chunks = response.iter_content(chunk_size)
            first_chunk = next((chunk for chunk in chunks if chunk), b"")
            if not first_chunk:
                raise UpstreamError("Upstream synthesis error: the speech server sent no audio.", response.status_code)
        except requests.RequestException as exc:
            response.close()
            detail = (
                "The speech server did not send audio in time."
                if timed_out(exc)
                else "The speech server broke off before sending audio."
            )
            raise UpstreamError(detail, response.status_code) from None
        except UpstreamError:
            response.close()
            raise
        return SpeechStream(response, first_chunk, chunks)

    def catalog(self, path: str):
        """GET a small JSON document (`models`, `audio/voices`), cached for `catalog_ttl` seconds.

        A failure is remembered for a few seconds too, so a sick upstream is not asked
        again by every speech request that checks its names.
        """
        # (expires at, document, the failure's arguments when the fetch failed)
        cached = self._catalog.get(path)
        if cached is None or time.monotonic() >= cached[0]:
            with self._catalog_lock:
                cached = self._catalog.get(path)
                if cached is None or time.monotonic() >= cached[0]:
                    try:
                        cached = (time.monotonic() + self.catalog_ttl, self._fetch_document(path), None)
                    except UpstreamError as failure:
                        # Only its words are kept: the exception's traceback would keep the
                        # frames of the request that met it (and their streams) alive.
                        cached = (time.monotonic() + min(self.catalog_ttl, FAILURE_TTL), None, failure.args)
                    self._catalog[path] = cached
        _, document, failure = cached
        if failure:
            raise UpstreamError(*failure)
        return document

    def _fetch_document(self, path: str):
        with self._send("get", path) as response:
            try:
                if response.status_code != 200:
                    raise UpstreamError(f"Upstream error: {_error_reason(response)}", response.status_code)
                return response.json()
            except ValueError:  # requests' JSONDecodeError is also a RequestException: keep this first.
                raise UpstreamError("Upstream error: the speech server answered with invalid JSON.") from None
            except requests.RequestException:
                raise UpstreamError("The speech server could not be reached.") from None
