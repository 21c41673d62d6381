"""Numbers for people: prices and counts in the visitor's own number format, from Babel's CLDR data."""

from decimal import Decimal

from babel import Locale, UnknownLocaleError
from babel.numbers import format_currency, format_decimal
from flask import Flask, has_request_context, request

DEFAULT_LOCALE = Locale("en", "US")


def visitor_locale() -> Locale:
    """The first language of the browser's Accept-Language that Babel knows; else US English."""
    if has_request_context():
        for language in request.accept_languages.values():
            try:
                return Locale.parse(language, sep="-")
            except (ValueError, UnknownLocaleError):
                continue
    return DEFAULT_LOCALE


def price(cents: int, currency: str) -> str:
    """5.00 USD as "$5.00" in the US, "5,00 $" in Germany."""
    return format_currency(Decimal(cents) / 100, currency.upper(), locale=visitor_locale())


def price_per_thousand(price_cents: int, credits: int, currency: str) -> str:
    """What 1,000 characters cost in a pack: its currency's decimals, more where they matter (up to 4)."""
    value = (Decimal(price_cents) * 1000 / credits / 100).quantize(Decimal("0.0001")).normalize()
    return format_currency(value, currency.upper(), locale=visitor_locale(), decimal_quantization=False)


def count(number: int) -> str:
    return format_decimal(number, locale=visitor_locale())


def register(app: Flask) -> None:
    app.jinja_env.filters["count"] = count
    app.jinja_env.globals.update(price=price, price_per_thousand=price_per_thousand)
