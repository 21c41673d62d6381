"""Absolute addresses of this server, for mail, Stripe's return pages and the docs."""

from flask import current_app, has_request_context, url_for


def host_is_checked() -> bool:
    """True when this server's address comes from a setting, or Flask has checked the Host header."""
    return bool(current_app.config["PUBLIC_BASE_URL"] or current_app.config["TRUSTED_HOSTS"])


def external_url(endpoint: str, **values) -> str:
    """An absolute URL on this server: from PUBLIC_BASE_URL when set, never from an unchecked Host then.

    Without it (development: check_settings requires it once mail is really sent), the
    request's own address; outside a request, the path alone.
    """
    base = current_app.config["PUBLIC_BASE_URL"]
    if base:
        return base + url_for(endpoint, **values)
    if has_request_context():
        return url_for(endpoint, _external=True, **values)
    return current_app.url_map.bind("localhost").build(endpoint, values)
