"""Error responses: `{"detail": …}` JSON under /v1, HTML pages elsewhere."""

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

from app.extensions import db

API_PREFIX = "/v1"


def api_error(status: int, detail: str, headers: dict | None = None):
    """The one way an API error body is built."""
    response = jsonify(detail=detail)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


class ApiError(Exception):
    """Raised anywhere under /v1 to answer `status` with `{"detail": …}`; rendered by one handler."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def is_api_request() -> bool:
    return request.path == API_PREFIX or request.path.startswith(API_PREFIX + "/")


def _from_http_exception(error: HTTPException):
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return api_error(error.code or 500, error.description or error.name, headers)


def register_errorhandlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_failure(error: ApiError):
        return api_error(error.status, error.detail, error.headers)

    # App-level, not on the blueprint: blueprint handlers never see routing errors (404, 405).
    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if is_api_request():
            return _from_http_exception(error)
        return render_template("errors/error.html", error=error), error.code

    @app.errorhandler(InternalServerError)
    def internal_error(error: InternalServerError):
        db.session.rollback()
        if is_api_request():
            return api_error(500, "Internal server error.")
        return render_template("errors/error.html", error=error), 500
