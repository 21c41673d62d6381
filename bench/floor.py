"""The floor for a Python gateway: a bare WSGI app that forwards a speech request to the upstream
and streams the answer back with the same HTTP client and chunk size as kokoro-pay, doing nothing
else (no key, no body check, no charge, no metering). Served by gunicorn with the gateway's own
settings, it is what any Python gateway on this machine costs at the least.

    UPSTREAM_URL=http://127.0.0.1:8880/v1 gunicorn --config gunicorn.conf.py bench.floor:app
"""

import os

import requests
from requests.adapters import HTTPAdapter

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8880/v1").rstrip("/")
CHUNK_BYTES = int(os.environ.get("STREAM_CHUNK_BYTES") or 16384)
TIMEOUT = (3.05, 60.0)

session = requests.Session()
session.trust_env = False
session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=int(os.environ.get("UPSTREAM_POOL_SIZE") or 64)))


def app(environ, start_response):
    if environ["PATH_INFO"] != "/v1/audio/speech":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    upstream = session.post(
        f"{UPSTREAM}/audio/speech",
        data=body,
        headers={"Content-Type": "application/json"},
        stream=True,
        timeout=TIMEOUT,
    )
    start_response(f"{upstream.status_code} {upstream.reason}", [("Content-Type", upstream.headers["Content-Type"])])
    return _relay(upstream)


def _relay(upstream):
    try:
        yield from upstream.iter_content(CHUNK_BYTES)
    finally:
        upstream.close()
