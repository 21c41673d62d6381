"""Log lines carry the id of the request they were written for; LOG_FORMAT=json writes one JSON object per line."""

import logging
import sys

from flask import Flask, g, has_request_context
from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"


class RequestId(logging.Filter):
    """Adds `request_id`: the /v1 request's id (the client's own when it sent one), else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = (g.get("request_id") if has_request_context() else None) or "-"
        return True


class Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a line is written, not as it was when the app was made
    (unless given a stream of its own with setStream)."""

    def __init__(self):
        super().__init__()
        self._stream = None

    @property
    def stream(self):
        return self._stream or sys.stderr

    @stream.setter
    def stream(self, value):
        self._stream = value


def configure(app: Flask, log_format: str) -> None:
    """The app's log handler (stderr, where gunicorn's logs go too), in the format LOG_FORMAT names."""
    handler = Stderr()
    handler.addFilter(RequestId())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    app.logger.handlers = [handler]
    app.logger.setLevel(logging.INFO)
