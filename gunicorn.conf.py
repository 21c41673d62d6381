"""gunicorn settings. Threaded workers: a sync worker would hold one audio stream at a time."""

import glob
import importlib.util
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from dotenv import dotenv_values

# The settings the app reads (app/environment.py: the environment, then `.env`), loaded by its path:
# importing the app here would put its modules into this master, and every worker it forks on a
# reload (HUP) would keep them instead of the code on disk. `.env` is read, not loaded into the
# environment: this file also serves the embedded engine (bin/run), which must not be handed the
# gateway's secrets or settings.
_spec = importlib.util.spec_from_file_location(
    "kokoro_pay_environment", Path(__file__).parent / "app" / "environment.py"
)
_environment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_environment)
_settings = SimpleNamespace(
    **{
        name.lower(): value
        for name, value in _environment.read({**dotenv_values(_environment.ROOT / ".env"), **os.environ}).items()
    }
)

# Prometheus metrics summed over the workers (app/metrics.py): each worker writes its samples
# to files in one directory, emptied at start. An operator may name it (PROMETHEUS_MULTIPROC_DIR);
# otherwise a fresh temporary one. It must be in the environment before a worker imports
# prometheus_client; the app reads it from its settings (app/metrics.py).
_metrics_dir = _settings.prometheus_multiproc_dir or tempfile.mkdtemp(prefix="kokoro-pay-metrics-")
os.makedirs(_metrics_dir, exist_ok=True)
for _samples in glob.glob(os.path.join(_metrics_dir, "*.db")):
    os.remove(_samples)  # the last run's: its counts are not this run's
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

bind = _settings.bind
worker_class = "gthread"
# Rate limits kept in process memory are per worker: with more than one worker they must live
# in a shared store (Redis), or every limit would let each worker's share through.
_in_memory_limits = _settings.ratelimit_storage_uri == "memory://"
workers = _settings.web_concurrency or (1 if _in_memory_limits else 2)
threads = _settings.gunicorn_threads or (32 if workers == 1 else 16)
# A long synthesis streams for as long as it takes; the upstream read timeout bounds silence.
timeout = _settings.gunicorn_timeout
keepalive = 5
accesslog = "-"
# The request line and status only: never headers, so keys stay out of the logs.
# The last field is the answer's X-Request-Id: the id the app's own log lines carry.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(D)sus %({x-request-id}o)s'


def on_starting(server):
    """Refuse to start several workers on in-memory rate limits, however the worker count was given."""
    if server.cfg.workers > 1 and _in_memory_limits:
        raise RuntimeError(
            f"{server.cfg.workers} workers with RATELIMIT_STORAGE_URI=memory://: each worker would keep its own "
            "rate limits. Set RATELIMIT_STORAGE_URI=redis://… (see .env.example) or run one worker."
        )


def child_exit(server, worker):
    """A worker that ends leaves its counters in the sums; its gauges of live streams go with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
