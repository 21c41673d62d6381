"""Servers on loopback for the tests and the benchmarks: gunicorn in its own process, as
production runs the app, and a threaded WSGI server inside this process."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve(wsgi_app):
    """Serve `wsgi_app` on 127.0.0.1 with a threaded HTTP/1.1 server in this process; yield its base URL."""
    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started(command: list, ready_url: str, name: str, timeout: float = 60, **popen):
    """Run `command` (Popen's `popen` arguments besides) until `ready_url` answers 2xx; yield the
    process. Stopped with SIGTERM (then SIGKILL); its errors are shown if it exits early."""
    # Errors go to a file, not a pipe: a pipe nobody reads would block a chatty server.
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, **popen)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    errors.seek(0)
                    raise RuntimeError(f"{name} exited: {errors.read().decode()[-2000:]}")
                try:
                    if requests.get(ready_url, timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start in {timeout:g} s")
                time.sleep(0.1)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def gunicorn(
    spec: str, env: dict, args: tuple = (), ready_path: str = "/healthz", timeout: float = 60, cwd: Path = ROOT
):
    """Run `spec` under gunicorn with `args`, bound to a free port; yield (its URL, the master process).

    gunicorn.conf.py (read from `cwd`, the project's root by default: another checkout runs its
    own code) applies unless `args` names another `--config`. Ready when `ready_path` answers
    2xx; stopped with SIGTERM (then SIGKILL).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gunicorn", *args, "--bind", f"127.0.0.1:{port}", spec]
    with started(command, url + ready_path, f"gunicorn {spec}", timeout, cwd=cwd, env={**os.environ, **env}) as process:
        yield url, process


def empty_database(url: str) -> None:
    """The PostgreSQL database at `url`, made if missing (the user needs CREATEDB), with an empty schema."""
    from sqlalchemy import create_engine, make_url, text

    server = make_url(url)
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": server.database}):
            conn.execute(text(f'CREATE DATABASE "{server.database}"'))
    admin.dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
