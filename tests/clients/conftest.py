"""The client replay suite: each client's own requests, against the gateway in front of two upstreams.

`upstream` is a stand-in that answers as Kokoro-FastAPI does (its catalog shapes, its
content types, real audio in the format asked for) and the embedded engine, a real
Kokoro model in its own process (marked `engine`). The suite runs on SQLite only: what
it checks is the wire, not the database, which the rest of the suite covers on both.
"""

import json
import subprocess
from pathlib import Path

import pytest

from tests import factories
from tests.fake_upstream import CONTENT_TYPES, KokoroStandIn
from tests.servers import serve

NODE = Path(__file__).parent / "node"


@pytest.fixture
def database_uri(tmp_path, sqlite_template):
    import shutil

    path = tmp_path / "kokoro-pay.sqlite3"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["stand-in", pytest.param("engine", marks=pytest.mark.engine)])
def upstream_url(request):
    """The /v1 URL of Kokoro-FastAPI's stand-in, or of the embedded engine process."""
    if request.param == "engine":
        yield request.getfixturevalue("engine_process")
        return
    with serve(KokoroStandIn()) as url:
        yield f"{url}/v1"


@pytest.fixture
def gateway(make_app, upstream_url):
    """The gateway on a real socket: (app, its /v1 base URL); PUBLIC_CATALOG on, as Open WebUI needs."""
    app = make_app(UPSTREAM_URL=upstream_url, UPSTREAM_READ_TIMEOUT=60, PUBLIC_CATALOG=True)
    with serve(app) as url:
        yield app, f"{url}/v1"


@pytest.fixture
def customer(gateway):
    return factories.customer(gateway[0], balance=10_000)


def charged_once(app, customer, text: str) -> None:
    """Exactly one request, delivered, charged one credit per character."""
    [speech] = factories.speech_requests(app, customer.team_id)
    assert speech.state == "delivered" and speech.credits == len(text)
    assert factories.balance(app, customer.team_id) == 10_000 - len(text)
    factories.assert_books_balance(app, customer.team_id)


def node(script: str, *args) -> dict:
    """Run one of tests/clients/node's scripts with Node.js; its JSON answer."""
    if not (NODE / "node_modules" / "openai").is_dir():
        pytest.fail("run `npm ci --prefix tests/clients/node` (make test does)")
    done = subprocess.run(["node", str(NODE / script), *args], capture_output=True, text=True, timeout=120, cwd=NODE)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


__all__ = ["CONTENT_TYPES", "charged_once", "node"]
