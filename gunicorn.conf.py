"""gunicorn settings. Threaded workers: a sync worker would hold one audio stream at a time."""

import glob
import os
import tempfile

# Prometheus metrics summed over the workers (app/metrics.py): each worker writes its samples
# to files in one directory, emptied at start. An operator may name it (PROMETHEUS_MULTIPROC_DIR,
# from the real environment, not .env); otherwise a fresh temporary one. prometheus_client picks
# its mode when it is imported, and writes there as soon as the app's metrics are made: the
# directory is in the environment, and made, before the app is imported. This variable is
# prometheus_client's own; the app reads it from its settings (app/metrics.py).
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="kokoro-pay-metrics-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from dotenv import load_dotenv  # noqa: E402

from app import config as _config  # noqa: E402

# The app's settings, read as the app reads them (the environment, then `.env`). Not checked
# here: this file also serves the embedded engine (bin/run), which has no SECRET_KEY; the app
# checks its own when each worker builds it.
load_dotenv(_config.ROOT / ".env")
_settings = _config.parse(os.environ)
# Emptied once the app is imported: of the last run's samples, and of this master's (it serves nothing).
for _samples in glob.glob(os.path.join(_settings.prometheus_multiproc_dir, "*.db")):
    os.remove(_samples)

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
