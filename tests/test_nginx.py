"""The production recipe, tested with the real parts: Debian's nginx in front of gunicorn.

nginx runs the repository's deploy/nginx/kokoro-pay-locations.conf as it is, inside a plain-HTTP
server block on loopback (the TLS server block around it is the operator's).
"""

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.servers import free_port, gunicorn, serve, wait_for

pytestmark = pytest.mark.proxy


ROOT = Path(__file__).resolve().parent.parent
LOCATIONS = ROOT / "deploy" / "nginx" / "kokoro-pay-locations.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

MAIN_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    upstream kokoro_pay {{ server {gateway}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        include {locations};
    }}
}}
"""


@pytest.fixture
def nginx_binary():
    if not os.path.exists(NGINX):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's nginx (see .ci/run)")
        pytest.skip("Debian's nginx is not installed (apt-get install nginx-light)")
    return NGINX


@contextmanager
def nginx(binary: str, gateway: str):
    """nginx on a free loopback port in front of `gateway` (host:port); yields its base URL."""
    work = Path(tempfile.mkdtemp(prefix="kokoro-pay-nginx-"))
    # Its workers may run as nobody: they must reach the temporary directories.
    work.chmod(0o755)
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / name).mkdir()
        (work / name).chmod(0o777)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(MAIN_CONF.format(work=work, gateway=gateway, port=port, locations=LOCATIONS))
    subprocess.run([binary, "-t", "-c", str(conf), "-p", str(work)], check=True, capture_output=True)
    process = subprocess.Popen(
        [binary, "-c", str(conf), "-p", str(work), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), timeout=15, what="nginx to start")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.fixture
def stack(app, database_uri, nginx_binary):
    """The stand-in speech server (gated), gunicorn (1 worker, 4 threads) and nginx; yields (nginx URL, upstream)."""
    gate = threading.Event()
    upstream = FakeUpstream([b"ID3\x04first", b"-rest"], gate=gate)
    with serve(upstream) as upstream_url:
        env = {
            "DATABASE_URL": database_uri,
            "UPSTREAM_URL": f"{upstream_url}/v1",
            "SECRET_KEY": "nginx-test",
            "TRUSTED_PROXIES": "1",
            "KEY_FAILURES_PER_IP": "3/minute",
        }
        with gunicorn("wsgi:app", env, workers=1, threads=4) as (gateway_url, _):
            with nginx(nginx_binary, gateway_url.removeprefix("http://")) as url:
                yield url, upstream, gate
        gate.set()


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/dev/captioned_speech"])
def test_the_first_audio_byte_passes_through_before_the_upstream_finishes(app, stack, path):
    url, upstream, gate = stack
    customer = factories.customer(app, balance=100)
    with requests.post(
        f"{url}{path}",
        json={"input": "Hello.", "voice": "af_sky"},
        headers=customer.headers,
        stream=True,
        timeout=10,
    ) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_content(chunk_size=None)
        first = next(chunks)
        # The upstream is still holding the rest back: only an unbuffered proxy lets this through.
        if path == "/dev/captioned_speech":
            # The first line of captions, whole: its audio is the upstream's first chunk.
            assert json.loads(first)["audio"] == base64.b64encode(b"ID3\x04first").decode()
        else:
            assert first.startswith(b"ID3")
        assert not gate.is_set() and not upstream.finished.is_set()
        gate.set()
        rest = b"".join(chunks)
    if path == "/v1/audio/speech":
        assert first + rest == b"ID3\x04first-rest"


def test_stalled_request_bodies_do_not_hold_the_gateways_threads(app, stack):
    url, _, _ = stack
    customer = factories.customer(app, balance=100)
    host, port = url.removeprefix("http://").split(":")
    stalled = []
    try:
        # Forty clients announce a body and stop sending it: ten times gunicorn's threads.
        for _ in range(40):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(
                b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\nAuthorization: Bearer " + customer.secret.encode() + b'\r\n\r\n{"input": '
            )
            stalled.append(sock)
        # A sleep on purpose: the bodies have really stalled a while, the server waiting on them, when the
        # requests below come; nothing seen from outside tells when it has taken all forty in.
        time.sleep(0.5)
        for _ in range(4):
            answer = requests.get(f"{url}/v1/balance", headers=customer.headers, timeout=5)
            assert answer.status_code == 200 and answer.json()["balance"] == 100
    finally:
        for sock in stalled:
            sock.close()


def test_a_body_over_the_limit_is_refused_with_the_apis_error(app, stack):
    url, upstream, _ = stack
    customer = factories.customer(app, balance=100)
    answer = requests.post(
        f"{url}/v1/audio/speech",
        data=b'{"input": "' + b"x" * 300_000 + b'"}',
        headers={**customer.headers, "Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert upstream.received == [] and factories.speech_requests(app, customer.team_id) == []


def _get(url: str, path: str, source: str, headers: dict) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_each_clients_own_address_reaches_the_rate_limiter(app, stack):
    url, _, _ = stack
    customer = factories.customer(app, balance=100)
    bad = {"Authorization": "Bearer kp_live_guessing", "X-Forwarded-For": "203.0.113.7"}
    # One client guesses keys until its address is refused (3 failures a minute here); a forged
    # X-Forwarded-For does not help it, and another client is not refused with it.
    assert [_get(url, "/v1/balance", "127.0.0.2", bad) for _ in range(4)] == [401, 401, 401, 429]
    assert _get(url, "/v1/balance", "127.0.0.3", bad) == 401
    assert _get(url, "/v1/balance", "127.0.0.3", customer.headers) == 200
    assert _get(url, "/v1/balance", "127.0.0.2", customer.headers) == 429


def test_metrics_are_not_served_through_the_proxy(app, stack):
    url, _, _ = stack
    assert requests.get(f"{url}/metrics", headers={"Authorization": "Bearer anything"}, timeout=5).status_code == 404
