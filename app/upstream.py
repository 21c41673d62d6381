"""The Kokoro server we sit in front of: one pooled HTTP session per app."""

import threading
import time
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError


class UpstreamError(Exception):
    """The upstream could not give a usable answer; `detail` is safe to show a client."""

    def __init__(self, detail: str, status: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.status = status


def _error_detail(response: requests.Response) -> str:
    """The upstream's own `{"detail": …}` message where it gave one."""
    try:
        body = response.json()
    except (ValueError, requests.RequestException):
        return f"upstream answered {response.status_code}"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("error")
    if isinstance(detail, list):
        detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
    return str(detail)[:300] if detail else f"upstream answered {response.status_code}"


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
    def __init__(self, base_url: str, api_key: str | None, connect_timeout: float, read_timeout: float,
                 pool_size: int, catalog_ttl: float):
        self.base_url = base_url
        self.timeout = (connect_timeout, read_timeout)
        self.catalog_ttl = catalog_ttl
        self.session = requests.Session()
        # Kept-alive connections, up to one per concurrent stream.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._catalog: dict[tuple, tuple[float, object]] = {}
        self._catalog_lock = threading.Lock()

    @classmethod
    def from_config(cls, config) -> "Upstream":
        return cls(
            config["UPSTREAM_URL"],
            config["UPSTREAM_API_KEY"],
            config["UPSTREAM_CONNECT_TIMEOUT"],
            config["UPSTREAM_READ_TIMEOUT"],
            config["UPSTREAM_POOL_SIZE"],
            config["UPSTREAM_CATALOG_TTL"],
        )

    def open_speech(self, payload: dict, chunk_size: int) -> SpeechStream:
        """Start a streamed synthesis and wait for its first audio bytes.

        Raises UpstreamError, with the response closed, for everything that goes
        wrong before audio flows: unreachable, timed out, non-2xx, not audio, empty.
        """
        try:
            response = self.session.post(f"{self.base_url}/audio/speech", json=payload, stream=True,
                                         timeout=self.timeout)
        except requests.Timeout:
            raise UpstreamError("The speech server did not answer in time.") from None
        except requests.RequestException:
            raise UpstreamError("The speech server could not be reached.") from None
        try:
            if not 200 <= response.status_code < 300:
                raise UpstreamError(f"Upstream synthesis error: {_error_detail(response)}", response.status_code)
            if not is_audio(response.headers.get("Content-Type", "")):
                raise UpstreamError("Upstream synthesis error: the speech server answered without audio.",
                                    response.status_code)
            chunks = response.iter_content(chunk_size)
            first_chunk = next((chunk for chunk in chunks if chunk), b"")
            if not first_chunk:
                raise UpstreamError("Upstream synthesis error: the speech server sent no audio.",
                                    response.status_code)
        except requests.RequestException as exc:
            response.close()
            detail = ("The speech server did not send audio in time." if timed_out(exc)
                      else "The speech server broke off before sending audio.")
            raise UpstreamError(detail, response.status_code) from None
        except UpstreamError:
            response.close()
            raise
        return SpeechStream(response, first_chunk, chunks)

    def catalog(self, path: str, params: dict | None = None):
        """GET a small JSON document (`models`, `audio/voices`), cached for `catalog_ttl` seconds."""
        key = (path, tuple(sorted((params or {}).items())))
        cached = self._catalog.get(key)
        if cached and time.monotonic() - cached[0] < self.catalog_ttl:
            return cached[1]
        with self._catalog_lock:
            cached = self._catalog.get(key)
            if cached and time.monotonic() - cached[0] < self.catalog_ttl:
                return cached[1]
            try:
                with self.session.get(f"{self.base_url}/{path}", params=params, timeout=self.timeout) as response:
                    if response.status_code != 200:
                        raise UpstreamError(f"Upstream error: {_error_detail(response)}", response.status_code)
                    document = response.json()
            except ValueError:  # requests' JSONDecodeError is also a RequestException: keep this first.
                raise UpstreamError("Upstream error: the speech server answered with invalid JSON.") from None
            except requests.RequestException:
                raise UpstreamError("The speech server could not be reached.") from None
            self._catalog[key] = (time.monotonic(), document)
            return document
