"""gunicorn settings. Threaded workers: a sync worker would hold one audio stream at a time."""

import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
# A long synthesis streams for as long as it takes; the upstream read timeout bounds silence.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
keepalive = 5
accesslog = "-"
# The request line and status only: never headers, so keys stay out of the logs.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(D)sus'
