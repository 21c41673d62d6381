"""Real HTTP servers on loopback, in threads, for tests that need real sockets."""

import contextlib
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
# Where several gunicorn workers keep their shared rate limits (the machine's Redis).
SHARED_LIMITS = "redis://127.0.0.1:6379/13"


@contextlib.contextmanager
def serve(wsgi_app):
    """Serve `wsgi_app` on 127.0.0.1 with a threaded HTTP/1.1 server; yield its base URL."""
    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        # A stream that broke off is kept in a reference cycle by its logged traceback; collect it
        # now, while no request context is pushed, not during a later test's request, where
        # closing it would pop that request's context.
        gc.collect()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gunicorn(
    spec: str, env: dict, workers: int = 1, threads: int = 8, ready_path: str = "/v1/balance", timeout: float = 60
):
    """Run `spec` under gunicorn (gthread) in its own process group, as production does; yield (url, process)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--bind",
            f"127.0.0.1:{port}",
            spec,
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"gunicorn exited: {process.stderr.read().decode()[-2000:]}")
            try:
                requests.get(url + ready_path, timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{spec} did not start") from None
                time.sleep(0.1)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
