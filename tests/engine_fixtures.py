"""The real embedded engine for tests: assets prepared once, model loaded once per session."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def synthesizer():
    from engine import assets
    from engine.server import Synthesizer

    model, voices = assets.ensure()
    return Synthesizer(str(model), str(voices))


@pytest.fixture(scope="session")
def engine_process():
    """The engine as its own process (gunicorn), as `make run` starts it; yields its /v1 URL."""
    from engine import assets

    assets.ensure()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "gthread", "--threads", "4",
         "--bind", f"127.0.0.1:{port}", "engine.server:create_app()"],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise AssertionError(f"engine exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass  # not listening yet, or still loading the model
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("engine did not start")
        time.sleep(0.2)
    yield f"{url}/v1"
    process.terminate()
    process.wait(10)
