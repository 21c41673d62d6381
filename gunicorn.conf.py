"""gunicorn settings. Threaded workers: a sync worker would hold one audio stream at a time."""

import glob
import os
import tempfile

from dotenv import dotenv_values


def _setting(name: str, default: str) -> str:
    """The environment first, then `.env` (as the app reads them)."""
    return os.environ.get(name) or dotenv_values(".env").get(name) or default


bind = _setting("BIND", "127.0.0.1:8000")
worker_class = "gthread"
# Rate limits kept in process memory are per worker: with more than one worker they must live
# in a shared store (Redis), or every limit would let each worker's share through.
_in_memory_limits = _setting("RATELIMIT_STORAGE_URI", "memory://") == "memory://"
workers = int(_setting("WEB_CONCURRENCY", "1" if _in_memory_limits else "2"))
threads = int(_setting("GUNICORN_THREADS", "32" if workers == 1 else "16"))
# A long synthesis streams for as long as it takes; the upstream read timeout bounds silence.
timeout = int(_setting("GUNICORN_TIMEOUT", "120"))
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


# Prometheus metrics summed over the workers (app/metrics.py): each worker writes its samples
# to files in one directory, emptied at start. An operator may name it (PROMETHEUS_MULTIPROC_DIR);
# otherwise a fresh temporary one. It must be set before a worker imports prometheus_client.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="kokoro-pay-metrics-")
os.makedirs(_metrics_dir, exist_ok=True)
for _samples in glob.glob(os.path.join(_metrics_dir, "*.db")):
    os.remove(_samples)  # the last run's: its counts are not this run's
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def child_exit(server, worker):
    """A worker that ends leaves its counters in the sums; its gauges of live streams go with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
