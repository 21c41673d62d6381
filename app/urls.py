"""Absolute addresses of this server, for mail, Stripe's return pages and the docs; the ids a path may hold."""

from flask import current_app, has_request_context, url_for
from werkzeug.routing import IntegerConverter

from app import config


def host_is_checked() -> bool:
    """True when this server's address comes from a setting, or Flask has checked the Host header."""
    return bool(config.current().public_base_url or config.current().trusted_hosts)


def external_url(endpoint: str, **values) -> str:
    """An absolute URL on this server: from PUBLIC_BASE_URL when set, never from an unchecked Host then.

    Without it (development: check_settings requires it once mail is really sent), the
    request's own address; outside a request, the path alone.
    """
    base = config.current().public_base_url
    if base:
        return base + url_for(endpoint, **values)
    if has_request_context():
        return url_for(endpoint, _external=True, **values)
    return current_app.url_map.bind("localhost").build(endpoint, values)


class DatabaseId(IntegerConverter):
    """`<int:…>` in a route: a number an INTEGER column holds (PostgreSQL's 32 bits), else 404.

    Werkzeug's own converter takes any run of digits, and the database then refuses the
    query with a 500 for an id no row can have.
    """

    def __init__(self, map, fixed_digits=0, min=None, max=2**31 - 1, signed=False):
        super().__init__(map, fixed_digits=fixed_digits, min=min, max=max, signed=signed)
