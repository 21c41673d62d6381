"""Error responses: JSON under /v1, HTML pages elsewhere.

A /v1 error body carries the message twice, once for our contract and once in the
shape OpenAI's SDKs read:

    {"detail": "<message>", "error": {"message": "<message>", "type": …, "param": …, "code": …}}

`code` is stable (docs/api.md lists every one), so clients can branch on it.
"""

from flask import Flask, jsonify, render_template, request
from flask.globals import request_ctx
from werkzeug.exceptions import HTTPException, InternalServerError

from app.extensions import db

API_PREFIX = "/v1"
# Kokoro-FastAPI's captioned speech, served at its own path (app/api.py): an API route too.
CAPTIONED_PATH = "/dev/captioned_speech"

# Each status's OpenAI error `type` and its `code` unless the raiser names a more precise one.
KINDS = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "invalid_api_key"),
    402: ("insufficient_quota", "insufficient_quota"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "upstream_error"),
}


def api_error(status: int, detail: str, headers: dict | None = None, code: str | None = None, param=None):
    """The one way an API error body is built."""
    kind, default_code = KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    response = jsonify(
        detail=detail, error={"message": detail, "type": kind, "param": param, "code": code or default_code}
    )
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


class ApiError(Exception):
    """Raised anywhere under /v1 to answer `status` with an error body; rendered by one handler.

    `param` names the request field at fault; `code` overrides the status's usual code.
    """

    def __init__(self, status: int, detail: str, headers: dict | None = None, *, code: str | None = None, param=None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.code = code
        self.param = param


def is_api_request() -> bool:
    return request.path in (API_PREFIX, CAPTIONED_PATH) or request.path.startswith(API_PREFIX + "/")


def _from_http_exception(error: HTTPException):
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return api_error(error.code or 500, error.description or error.name, headers)


def register_errorhandlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_failure(error: ApiError):
        return api_error(error.status, error.detail, error.headers, error.code, error.param)

    # App-level, not on the blueprint: blueprint handlers never see routing errors (404, 405).
    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if is_api_request():
            return _from_http_exception(error)
        if request_ctx.url_adapter is None:
            # The Host header was refused (TRUSTED_HOSTS): no page of ours can be linked from here.
            return error.description, error.code, {"Content-Type": "text/plain; charset=utf-8"}
        return render_template("errors/error.html", error=error), error.code

    @app.errorhandler(InternalServerError)
    def internal_error(error: InternalServerError):
        db.session.rollback()
        if is_api_request():
            return api_error(500, "Internal server error.")
        return render_template("errors/error.html", error=error), 500
