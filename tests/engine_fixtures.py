"""The real embedded engine for tests: assets prepared once, model loaded once per session."""

import pytest

from tests.servers import gunicorn


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
    with gunicorn("engine.server:create_app()", {}, workers=1, threads=4, ready_path="/health") as (url, _):
        yield f"{url}/v1"
