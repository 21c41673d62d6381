"""Real HTTP servers on loopback, in threads, for tests that need real sockets."""

import contextlib
import gc
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench import launch
from bench.launch import free_port  # noqa: F401 (tests take it from here)

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def private_redis(directory: Path | None = None):
    """A Redis server of the caller's own on a free loopback port, for the rate limits several gunicorn
    workers share: no other test process (a pytest-xdist worker, a mutation run's second child, another
    run on the machine) reads or empties its windows. Yields (its URL, stop); stopped afterwards."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory or tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
    )

    def answers():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop():
        server.terminate()
        server.wait(10)

    try:
        wait_for(answers, what="Redis to start")
        yield f"redis://127.0.0.1:{port}/0", stop
    finally:
        if server.poll() is None:
            stop()


@contextlib.contextmanager
def serve(wsgi_app):
    """Serve `wsgi_app` on 127.0.0.1 with a threaded HTTP/1.1 server; yield its base URL."""
    try:
        with launch.serve(wsgi_app) as url:
            yield url
    finally:
        # A stream that broke off is kept in a reference cycle by its logged traceback; collect it
        # now, while no request context is pushed, not during a later test's request, where
        # closing it would pop that request's context.
        gc.collect()


def gunicorn(spec: str, env: dict, workers: int = 1, threads: int = 8, ready_path: str = "/healthz"):
    """`spec` under gunicorn (gthread), in its own process, as production runs it; yields (url, process)."""
    args = ("--workers", str(workers), "--worker-class", "gthread", "--threads", str(threads))
    return launch.gunicorn(spec, env, args, ready_path)


def race_speech(
    database_uri: str,
    upstream,
    secrets: list[str],
    *,
    count: int,
    text: str,
    threads: int,
    timeout: float,
    env: dict | None = None,
) -> list[tuple[int, bytes]]:
    """`count` speech requests at once (each `text`, through each of `secrets` in turn) to two gunicorn
    workers of `threads` threads on `database_uri`, in front of `upstream`; each answer's status and body."""
    with serve(upstream) as upstream_url, private_redis() as (limits, _):
        settings = {
            "DATABASE_URL": database_uri,
            "UPSTREAM_URL": f"{upstream_url}/v1",
            "SECRET_KEY": "race-test",
            "RATELIMIT_STORAGE_URI": limits,
            **(env or {}),
        }
        with gunicorn("wsgi:app", settings, workers=2, threads=threads) as (url, _):
            barrier = threading.Barrier(count, timeout=timeout)

            def speak(index):
                barrier.wait()
                response = requests.post(
                    f"{url}/v1/audio/speech",
                    json={"input": text, "voice": "af_sky"},
                    headers={"Authorization": f"Bearer {secrets[index % len(secrets)]}"},
                    timeout=timeout,
                )
                return response.status_code, response.content

            with ThreadPoolExecutor(count) as pool:
                return list(pool.map(speak, range(count)))


def wait_for(condition, timeout: float = 10.0, what: str = "the condition"):
    """Until `condition()` is true (returned), polling: for what another thread or process does."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)
    return result
