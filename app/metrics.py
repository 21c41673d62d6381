"""Prometheus metrics (prometheus_client), summed over gunicorn's worker processes.

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at an empty directory before the
workers start, so each worker writes its samples there and any worker's `/metrics`
answers for all of them. Without it (development server, tests) the samples are this
process's own. `/metrics` is off the public path: it answers only with
`Authorization: Bearer <METRICS_TOKEN>`, and is 404 without a token configured or
with a wrong one.
"""

import hmac

from flask import Blueprint, abort, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app import config

# Seconds; speech's first byte is dominated by synthesis, the gateway's share by Python and the database.
FIRST_BYTE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
GATEWAY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1)

REQUESTS = Counter("kokoro_http_requests_total", "HTTP requests answered, by route and status.", ["route", "status"])
FIRST_BYTE = Histogram(
    "kokoro_speech_first_byte_seconds",
    "From a speech request's arrival to the upstream's first audio byte.",
    buckets=FIRST_BYTE_BUCKETS,
)
GATEWAY = Histogram(
    "kokoro_speech_gateway_seconds",
    "The gateway's own time before the upstream call (a wait for a free server apart).",
    buckets=GATEWAY_BUCKETS,
)
UPSTREAM_FAILURES = Counter(
    "kokoro_upstream_failures_total",
    "Speech server failures: unreachable, timeout, status, no_audio, refused (the request), broke_off, stalled.",
    ["kind"],
)
CREDITS_CHARGED = Counter("kokoro_credits_charged_total", "Credits debited for speech requests.")
CREDITS_REFUNDED = Counter("kokoro_credits_refunded_total", "Credits given back for speech not delivered.")
STREAMS = Gauge("kokoro_streams_in_flight", "Speech streams being relayed now.", multiprocess_mode="livesum")
RATE_LIMIT_STORE_FAILURES = Counter(
    "kokoro_rate_limit_store_failures_total",
    "Abuse-limit checks that could not reach their store (Redis) and let the request through.",
)
WEBHOOK_EVENTS = Counter(
    "kokoro_webhook_events_total", "Stripe webhook events, by type and outcome.", ["type", "outcome"]
)

bp = Blueprint("metrics", __name__)


def count_request(response):
    """Count every answer by its route's pattern (never the raw path: that would be unbounded)."""
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    REQUESTS.labels(rule, str(response.status_code)).inc()
    return response


def webhook_outcome(outcome: str) -> str:
    """A webhook outcome as a small set of labels: its first word ("credited", "ignored", "took", …)."""
    word = outcome.split(" ", 1)[0].strip(":;,.").lower()
    return word if word.isalpha() and len(word) <= 20 else "other"


@bp.get("/metrics")
def scrape():
    token = config.current().metrics_token
    offered = request.authorization.token if request.authorization and request.authorization.token else ""
    if not token or not hmac.compare_digest(offered.encode(), token.encode()):
        abort(404)
    if config.current().prometheus_multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    response = current_app.response_class(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
    response.headers["Cache-Control"] = "no-store"
    return response
