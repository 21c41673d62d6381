"""The systemd units in deploy/systemd, checked by systemd itself (systemd-analyze verify)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_AT = "/srv/kokoro-pay"


def test_the_systemd_units_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # As installed, with this checkout standing in for /srv/kokoro-pay (its .venv holds the commands).
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_AT, str(ROOT)))
    names = sorted(path.name for path in tmp_path.iterdir())
    assert {"kokoro-pay.service", "kokoro-pay-settle.timer", "kokoro-pay-audit.timer"} <= set(names)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *names], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_each_timer_has_its_service():
    for timer in UNITS.glob("*.timer"):
        assert (UNITS / timer.name.replace(".timer", ".service")).exists(), timer.name


def test_gunicorn_reads_the_settings_without_importing_the_app_or_handing_env_to_the_engine(tmp_path):
    """gunicorn.conf.py runs in the master of both the gateway and the embedded engine (bin/run). It reads
    the app's settings, `.env` included, but imports none of the app (a reload's workers are forked from the
    master and would keep its modules, not the code on disk) and puts nothing of `.env` into the
    environment (the engine would be handed the gateway's secrets and its ENGINE_CACHE)."""
    shutil.copy(ROOT / "gunicorn.conf.py", tmp_path)
    (tmp_path / "app").mkdir()
    shutil.copy(ROOT / "app" / "environment.py", tmp_path / "app")
    (tmp_path / ".env").write_text("BIND=127.0.0.1:9876\nSECRET_KEY=from-dotenv\nENGINE_CACHE=/elsewhere\n")
    probe = (
        "import json, os, runpy, sys; before = set(os.environ); conf = runpy.run_path('gunicorn.conf.py');"
        "print(json.dumps({'bind': conf['bind'], 'app': sorted(m for m in sys.modules if m.split('.')[0] == 'app'),"
        " 'added': sorted(set(os.environ) - before)}))"
    )
    environ = {name: value for name, value in os.environ.items() if name not in ("BIND", "PROMETHEUS_MULTIPROC_DIR")}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=environ, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"bind": "127.0.0.1:9876", "app": [], "added": ["PROMETHEUS_MULTIPROC_DIR"]}
