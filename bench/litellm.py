"""LiteLLM's proxy as a peer in the benchmark: the same stand-in behind it, the same rounds.

LiteLLM (`litellm[proxy]` from PyPI) is a gateway many teams put in front of model servers; it
lives in a virtualenv of its own (`make bench-litellm`, `.venv-litellm/`), since it pins its own
versions of libraries the app also uses. It runs with no database, a master key, and the
stand-in as an OpenAI-compatible speech model.
"""

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

from bench.launch import free_port, started

ROOT = Path(__file__).resolve().parent.parent
EXECUTABLE = ROOT / ".venv-litellm" / "bin" / "litellm"
MASTER_KEY = "sk-bench-master-key"
DESCRIPTION = "LiteLLM's proxy: no database, a master key, the stand-in as an OpenAI-compatible model."
CONFIG = """\
model_list:
  - model_name: kokoro
    litellm_params:
      model: openai/kokoro
      api_base: {upstream}/v1
      api_key: standin
general_settings:
  master_key: {master_key}
"""


def available() -> bool:
    return EXECUTABLE.exists()


def version() -> str:
    python = EXECUTABLE.parent / "python"
    return subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@contextlib.contextmanager
def proxy(upstream: str, workers: int, timeout: float = 120):
    """LiteLLM's proxy in front of `upstream`, with `workers` workers; yields (URL, process, request headers)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "config.yaml"
        config.write_text(CONFIG.format(upstream=upstream, master_key=MASTER_KEY))
        command = [EXECUTABLE, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--num_workers", str(workers)]
        # The cost map shipped with it: LiteLLM would otherwise fetch one from the internet at start.
        env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        ready = f"{url}/health/liveliness"
        with started(command, ready, "LiteLLM", timeout, cwd=directory, env=env) as process:
            yield url, process, {"Authorization": f"Bearer {MASTER_KEY}"}
