"""Two floors for a Python gateway, served by gunicorn with the gateway's own settings.

`app`, the bare floor: a WSGI app that forwards a speech request to the upstream and streams the
answer back with the same HTTP client and chunk size as kokoro-pay, doing nothing else (no key,
no body check, no charge, no metering): what any Python gateway on this machine costs at the least.

`books`, the floor with books: the bare floor plus the least durable work any correct metered
gateway must do before and after the upstream call, written straight on psycopg: one prepared
look-up of the key, one committed transaction that debits the characters, records the request and
counts the team's open streams (within MAX_STREAMS_PER_ACCOUNT), and, after the stream, one
settling update. It keeps its requests in a table of its own (`floor_requests`) and debits the
same teams as the gateway. Nothing here is checked beyond that: no rate limits, no body
validation, no metering of the audio, no refunds.

    UPSTREAM_URL=http://127.0.0.1:8880/v1 gunicorn --config gunicorn.conf.py bench.floor:app
    UPSTREAM_URL=… DATABASE_URL=postgresql://… gunicorn --config gunicorn.conf.py bench.floor:books
"""

import hashlib
import json
import os
import uuid

import requests
from requests.adapters import HTTPAdapter

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8880/v1").rstrip("/")
CHUNK_BYTES = int(os.environ.get("STREAM_CHUNK_BYTES") or 16384)
TIMEOUT = (3.05, 60.0)
MAX_STREAMS = int(os.environ.get("MAX_STREAMS_PER_ACCOUNT") or 4)

session = requests.Session()
session.trust_env = False
session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=int(os.environ.get("UPSTREAM_POOL_SIZE") or 64)))


def app(environ, start_response):
    if environ["PATH_INFO"] != "/v1/audio/speech":
        return _answer(start_response, "200 OK", b"ok")
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    upstream = _forward(body)
    start_response(f"{upstream.status_code} {upstream.reason}", [("Content-Type", upstream.headers["Content-Type"])])
    return _relay(upstream)


def _forward(body: bytes) -> requests.Response:
    return session.post(
        f"{UPSTREAM}/audio/speech",
        data=body,
        headers={"Content-Type": "application/json"},
        stream=True,
        timeout=TIMEOUT,
    )


def _relay(upstream, after=None):
    try:
        yield from upstream.iter_content(CHUNK_BYTES)
    finally:
        upstream.close()
        if after is not None:
            after()


def _answer(start_response, status: str, body: bytes):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# The floor with books.

_SETUP = (
    "CREATE TABLE IF NOT EXISTS floor_requests (id uuid PRIMARY KEY, team_id integer NOT NULL, "
    "credits integer NOT NULL, open boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX IF NOT EXISTS floor_requests_open ON floor_requests (team_id) WHERE open",
)
_KEY = "SELECT team_id FROM api_keys WHERE digest = %s AND revoked_at IS NULL"
_DEBIT = "UPDATE teams SET balance = balance - %(credits)s WHERE id = %(team)s AND balance >= %(credits)s"
# Counted after the debit has locked the team's row, so concurrent requests of one team count one by one.
_RECORD = (
    "INSERT INTO floor_requests (id, team_id, credits) SELECT %(id)s, %(team)s, %(credits)s "
    "WHERE (SELECT count(*) FROM floor_requests WHERE team_id = %(team)s AND open) < %(streams)s"
)
_SETTLE = "UPDATE floor_requests SET open = false WHERE id = %s"
_pool = None


def _connections():
    """This worker's connections (made after the fork: gunicorn imports the app in each worker)."""
    global _pool
    if _pool is None:
        from psycopg_pool import ConnectionPool

        url = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
        # Every statement prepared on first use; each request asks in autocommit, or in one transaction.
        _pool = ConnectionPool(url, min_size=4, max_size=16, kwargs={"autocommit": True, "prepare_threshold": 0})
        with _pool.connection() as connection:
            for statement in _SETUP:
                connection.execute(statement)
    return _pool


class Refused(Exception):
    def __init__(self, status: str, detail: bytes):
        self.status, self.detail = status, detail


def books(environ, start_response):
    if environ["PATH_INFO"] != "/v1/audio/speech":
        return _answer(start_response, "200 OK", b"ok")
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    secret = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ")
    try:
        request_id = _charge(hashlib.sha256(secret.encode()).hexdigest(), len(json.loads(body)["input"]))
    except Refused as refused:
        return _answer(start_response, refused.status, refused.detail)
    upstream = _forward(body)
    start_response(f"{upstream.status_code} {upstream.reason}", [("Content-Type", upstream.headers["Content-Type"])])
    return _relay(upstream, after=lambda: _settle(request_id))


def _charge(digest: str, credits: int) -> uuid.UUID:
    with _connections().connection() as connection:
        row = connection.execute(_KEY, (digest,)).fetchone()
        if row is None:
            raise Refused("401 Unauthorized", b"unknown key")
        request_id = uuid.uuid4()
        values = {"id": request_id, "team": row[0], "credits": credits, "streams": MAX_STREAMS}
        with connection.transaction():
            if not connection.execute(_DEBIT, values).rowcount:
                raise Refused("402 Payment Required", b"insufficient credits")
            if not connection.execute(_RECORD, values).rowcount:
                # Leaving the block by an exception rolls the debit back.
                raise Refused("429 Too Many Requests", b"too many streams")
    return request_id


def _settle(request_id: uuid.UUID) -> None:
    with _connections().connection() as connection:
        connection.execute(_SETTLE, (request_id,))
