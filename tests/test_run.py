"""`make run`'s launcher, bin/run: one setting moves it to another port, and it says where to open it."""

import os
import signal
import subprocess
import threading
import time

import pytest
import requests

from tests.fake_upstream import FakeUpstream
from tests.servers import ROOT, free_port, serve


@pytest.fixture
def checkout(tmp_path):
    """This checkout without its .env and instance/: a newcomer's fresh clone (everything else linked)."""
    farm = tmp_path / "clone"
    (farm / "bin").mkdir(parents=True)
    (farm / "bin" / "run").symlink_to(ROOT / "bin" / "run")
    for entry in ROOT.iterdir():
        if entry.name not in (".env", "instance", "bin", ".git"):
            (farm / entry.name).symlink_to(entry)
    return farm


@pytest.fixture
def upstream():
    with serve(FakeUpstream()) as url:
        yield f"{url}/v1"


def environment(port, upstream, tmp_path):
    """This machine's environment without what bin/run decides, on a port, upstream and database of the test's."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in ("PUBLIC_BASE_URL", "FLASK_APP", "BIND", "PROMETHEUS_MULTIPROC_DIR")
    } | {
        "BIND": f"127.0.0.1:{port}",
        "UPSTREAM_URL": upstream,
        "SECRET_KEY": "a-test-secret",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'run.sqlite3'}",
        "SAMPLES_DIR": str(tmp_path / "samples"),
        "MAIL_WORKER": "false",
    }


def run(checkout, env):
    """bin/run in its own process group; yields (process, lines of its stderr so far)."""
    process = subprocess.Popen(
        [str(checkout / "bin" / "run")],
        cwd=checkout,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, lines


def wait_for(lines, text, process, seconds=60):
    deadline = time.monotonic() + seconds
    while not any(text in line for line in lines):
        assert process.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(lines)
        time.sleep(0.1)


def test_make_run_on_another_port_says_where_to_open_it_and_links_follow(checkout, upstream, tmp_path):
    port = free_port()
    env = environment(port, upstream, tmp_path)
    process, lines = run(checkout, env)
    try:
        wait_for(lines, "dashboard", process)
        site = f"http://127.0.0.1:{port}"
        printed = "".join(lines)
        assert f"dashboard  {site}/\n" in printed and f"API        {site}/v1 " in printed
        docs = requests.get(f"{site}/docs", timeout=10).text
        assert f"curl {site}/v1/audio/speech" in docs
        # The landing page's samples are made once the gateway is up, before anyone asks.
        wait_for(lines, "bf_emma: made", process)
        assert len(list((tmp_path / "samples").iterdir())) == 3
    finally:
        stop(process, lines)


def stop(process, lines):
    """Ctrl+C, as in a terminal: bin/run returns once what it started has stopped (or says why not)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    try:
        # gunicorn gives streams under way up to its graceful timeout (30 s) before it kills a worker.
        process.wait(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("bin/run did not stop on Ctrl+C within 45 s:\n" + "".join(lines))


def test_ctrl_c_while_the_samples_are_made_stops_the_gateway_and_returns(checkout, tmp_path):
    held = threading.Event()
    with serve(FakeUpstream(gate=held)) as url:
        port = free_port()
        env = environment(port, f"{url}/v1", tmp_path)
        process, lines = run(checkout, env)
        try:
            wait_for(lines, "dashboard", process)
            site = f"http://127.0.0.1:{port}"
            assert requests.get(f"{site}/healthz", timeout=10).status_code == 200
        finally:
            stop(process, lines)
            held.set()
        assert process.returncode != 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{site}/healthz", timeout=5)
