"""Property-based: whatever arrives at /v1 or the webhook, never a 500, always `{"detail"}` on
errors, and the balance moves only by the documented amount."""

import json
import re
from urllib.parse import quote_from_bytes, urlencode

import pytest
import responses
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.extensions import db
from app.models import PaymentReversal, StripeEvent, Team
from tests import factories
from tests.conftest import STRIPE_API, STUB_UPSTREAM
from tests.fake_upstream import stub_catalog
from tests.stripe_helpers import charge, checkout_session, deliver, dispute, event, sign

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# Text no encoder can write or speak: lone surrogates, NUL and other control characters.
nasty_text = st.text(max_size=30) | st.sampled_from(["\x00", "a\ud800b", "\udfff", "x\x07y", "\u0085", "\x1b[2J"])
huge_numbers = st.integers(min_value=10**300, max_value=10**4000) | st.integers(max_value=-(10**300))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | huge_numbers | st.floats(allow_nan=False) | nasty_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
speech_bodies = st.fixed_dictionaries(
    {},
    optional={
        "input": st.text(max_size=60) | nasty_text | json_values,
        "voice": st.sampled_from(["af_sky", "", "x" * 300, "af_bella(2)+af_sky(1)", "af_sky\x00"]) | json_values,
        "model": st.sampled_from(["kokoro", "tts-1", "kokoro\x00"]) | json_values,
        "response_format": st.sampled_from(["mp3", "wav", "ogg"]) | json_values,
        "speed": st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "stream": json_values,
        "volume_multiplier": st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "lang_code": st.sampled_from(["a", "en-us", "\ud800"]) | json_values,
        "normalization_options": st.fixed_dictionaries({}, optional={"normalize": json_values}) | json_values,
        "instructions": json_values,
    },
)
raw_bodies = (
    st.binary(max_size=200)
    | speech_bodies.map(lambda body: json.dumps(body).encode())
    | st.sampled_from(
        [
            b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            b'{"input": "' + b"a" * 300_000 + b'"}',
            b'{"input": "Hi", "speed": 1' + b"0" * 5000 + b"}",
        ]
    )
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@pytest.fixture
def stubbed_upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(f"{STUB_UPSTREAM}/audio/speech", body=b"ID3audio", content_type="audio/mpeg")
        stub_catalog(mock, STUB_UPSTREAM)
        yield mock


def syntheses_asked(upstream) -> int:
    return sum(call.request.url.endswith("/audio/speech") for call in upstream.calls)


def assert_json_error(response):
    assert response.status_code != 500
    if response.status_code >= 400:
        assert response.is_json and isinstance(response.get_json()["detail"], str)


@PROPERTY_SETTINGS
@given(
    raw=raw_bodies,
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]),
)
def test_any_speech_body_is_answered_and_charged_exactly_as_documented(
    app, customer, stubbed_upstream, raw, content_type
):
    before = factories.balance(app, customer.team_id)
    asked = syntheses_asked(stubbed_upstream)
    response = app.test_client().post(
        "/v1/audio/speech", data=raw, headers={**customer.headers, "Content-Type": content_type}
    )
    response.close()
    assert_json_error(response)
    after = factories.balance(app, customer.team_id)
    syntheses = syntheses_asked(stubbed_upstream) - asked
    if response.status_code == 200:
        assert response.data == b"ID3audio" and syntheses == 1
        assert before - after == len(json.loads(raw)["input"])
    else:
        # The upstream is asked only for a body that passed every check.
        assert response.status_code in (400, 402, 413) and after == before and syntheses == 0
    factories.assert_books_balance(app, customer.team_id)


@PROPERTY_SETTINGS
@given(text=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=80).filter(str.strip))
def test_the_charge_is_the_number_of_code_points(app, customer, stubbed_upstream, text):
    before = factories.balance(app, customer.team_id)
    response = app.test_client().post(
        "/v1/audio/speech", json={"input": text, "voice": "af_sky"}, headers=customer.headers
    )
    response.close()
    if before >= len(text):
        assert response.status_code == 200 and before - factories.balance(app, customer.team_id) == len(text)
    else:
        assert response.status_code == 402


# What a speech server may say instead of audio: FastAPI's shapes, long words, long lists, or anything.
upstream_reasons = (
    st.text(max_size=400)
    | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=150, max_size=3000)
    | st.lists(st.text(max_size=80), max_size=60).map(" ".join)
)
upstream_refusals = st.one_of(
    st.builds(lambda reason: {"detail": reason}, upstream_reasons | json_values),
    st.builds(lambda reason: {"detail": {"error": "x", "message": reason}}, upstream_reasons),
    st.builds(
        lambda reasons: {"detail": [{"loc": ["body", "input"], "msg": r} for r in reasons]},
        st.lists(upstream_reasons, max_size=30),
    ),
    # A 422 list whose entries are not quite FastAPI's.
    st.builds(
        lambda items: {"detail": items},
        st.lists(st.fixed_dictionaries({}, optional={"loc": json_values, "msg": json_values}), max_size=5),
    ),
    json_values,
).map(json.dumps)


@PROPERTY_SETTINGS
@given(status=st.sampled_from([400, 404, 422, 500, 503]), body=upstream_refusals | st.text(max_size=300))
# Each seen to fail once: one long word; a lone surrogate and a NUL (no database takes either);
# a 422 entry whose location is not a list.
@example(status=400, body=json.dumps({"detail": "0" * 200}))
@example(status=400, body=json.dumps({"detail": "half a pair \udfff."}))
@example(status=500, body=json.dumps({"detail": "a NUL \x00 here."}))
@example(status=422, body=json.dumps({"detail": [{"loc": None, "msg": "Field required"}]}))
def test_whatever_the_speech_server_says_instead_of_audio_the_client_gets_one_short_line_and_its_credits_back(
    app, customer, stubbed_upstream, status, body
):
    stubbed_upstream.replace(responses.POST, f"{STUB_UPSTREAM}/audio/speech", status=status, body=body)
    response = app.test_client().post(
        "/v1/audio/speech", json={"input": "Hello.", "voice": "af_sky"}, headers=customer.headers
    )
    assert response.status_code == (400 if status in (400, 422) else 502)
    detail = response.get_json()["detail"]
    # One short line with no control character and no lone surrogate, which no database or encoder takes.
    assert not re.search("[\x00-\x1f\x7f-\x9f\ud800-\udfff]", detail) and len(detail) <= 250, detail
    assert factories.balance(app, customer.team_id) == 1000
    factories.assert_books_balance(app, customer.team_id)


@pytest.fixture
def unguarded(make_app):
    """The app on the same database, with no limit on an address's wrong keys: every example of a property
    comes from one address, and replayed ones add to them, past KEY_FAILURES_PER_IP's 30 a minute (whose
    429 has tests of its own in tests/test_key_controls.py)."""
    return make_app(KEY_FAILURES_PER_IP="1000000/minute")


@PROPERTY_SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    path=st.sampled_from(["/v1/audio/speech", "/v1/balance", "/v1/models", "/v1/audio/voices", "/v1/x", "/v1"]),
    authorization=header_values | st.sampled_from(["Bearer ", "Bearer kp_live_"]),
    raw=st.binary(max_size=100),
)
def test_any_request_to_v1_gets_json(app, unguarded, customer, stubbed_upstream, method, path, authorization, raw):
    headers = {"Authorization": authorization} if authorization else {}
    response = unguarded.test_client().open(path, method=method, data=raw, headers=headers)
    assert_json_error(response)
    assert response.status_code in (400, 401, 404, 405)
    assert factories.balance(app, customer.team_id) == 1000


@PROPERTY_SETTINGS
@given(
    raw=st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode()),
    signature=header_values,
    signed=st.booleans(),
)
def test_the_webhook_never_fails_and_credits_nothing_unverified(app, customer, raw, signature, signed):
    response = deliver(app.test_client(), raw, sign(raw) if signed else signature)
    assert response.status_code in (200, 400)
    if response.status_code == 400:
        assert response.get_json()["detail"] in ("Invalid payload or signature.", "Malformed event.")
    assert factories.balance(app, customer.team_id) == 1000


# Query strings, as a visitor might type them or a scanner send them: any text, numbers past
# every integer type, dates at the ends of the calendar, parameters repeated or unknown.
QUERY_NAMES = ["page", "per_page", "key", "from", "to", "request", "session_id", "q", "next", "token"]
query_values = (
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
    | st.integers().map(str)
    | huge_numbers.map(str)
    | st.dates().map(str)
    | st.sampled_from(
        ["²", "٣", "0", "-1", "2147483648", "9223372036854775808", "9999-12-31", "0001-01-01", "+10000-01-01"]
    )
    | st.sampled_from(["playground", "1e9", " 7 ", "2024-02-30", "20240101", "2024-W01-1", "", "%", "//evil.example"])
)
query_pairs = st.lists(st.tuples(st.sampled_from(QUERY_NAMES) | st.text(max_size=5), query_values), max_size=6)
# Bytes that are not UTF-8 at all, percent-encoded.
undecodable = st.binary(max_size=30).map(lambda raw: "key=" + quote_from_bytes(raw))
query_strings = query_pairs.map(urlencode) | undecodable
CUSTOMER_PAGES = [
    "/",
    "/usage",
    "/ledger",
    "/usage.csv",
    "/ledger.csv",
    "/billing",
    "/billing/success",
    "/billing/cancelled",
    "/keys",
    "/keys/{key_id}/revoke",
    "/account",
    "/docs",
    "/pricing",
    "/login",
]
ADMIN_PAGES = [
    "/admin",
    "/admin/users",
    "/admin/users/{user_id}",
    "/admin/payments",
    "/admin/charged",
    "/admin/audit",
    "/admin/log",
]
# Every table a GET could wrongly change: money, keys, sign-ins, mail, the admin log.
WATCHED_TABLES = [
    "users",
    "ledger_entries",
    "payments",
    "payment_reversals",
    "stripe_events",
    "api_keys",
    "speech_requests",
    "login_sessions",
    "outbox",
    "admin_actions",
]


def database_state(app) -> dict:
    with app.app_context():
        return {
            name: sorted(map(tuple, db.session.execute(select(db.metadata.tables[name])).all()), key=repr)
            for name in WATCHED_TABLES
        }


@pytest.fixture
def browsing(app):
    """A signed-in customer with usage, a ledger and a checkout left open, and a signed-in admin."""
    shopper = factories.customer(app, balance=1000, password="correct horse battery")
    factories.charged(app, shopper.team_id, count=3, characters=5)
    boss = factories.customer(app, password="correct horse battery")
    with app.app_context():
        factories.starter_payment(shopper.team_id, "cs_test_open")
        db.session.get(Team, boss.team_id).is_admin = True
        db.session.commit()
    customer_web, admin_web = factories.WebClient(app.test_client()), factories.WebClient(app.test_client())
    customer_web.login(shopper.email)
    admin_web.login(boss.email)
    ids = {"key_id": shopper.key_id, "user_id": shopper.team_id}
    return {"customer": (customer_web, CUSTOMER_PAGES, ids), "admin": (admin_web, ADMIN_PAGES + CUSTOMER_PAGES, ids)}


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(role=st.sampled_from(["customer", "admin"]), query=query_strings)
@example(role="customer", query="key=%C2%B2&to=9999-12-31&page=99999999999999999999")
@example(role="admin", query="q=%C2%B2&page=99999999999999999999")
def test_no_query_string_gets_a_500_or_changes_anything_on_a_dashboard_or_admin_page(app, browsing, role, query):
    web, pages, ids = browsing[role]
    before = database_state(app)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as stripe_api:
        stripe_api.post(re.compile(f"{STRIPE_API}/.*"), json={"id": "cs_test_open", "status": "expired"})
        for page in pages:
            response = web.client.get(f"{page.format(**ids)}?{query}")
            response.get_data()  # a CSV download runs its queries while it streams
            assert response.status_code < 500, (page, query, response.status_code)
        assert [call.request.url for call in stripe_api.calls if call.request.url.startswith(STRIPE_API)] == []
    assert database_state(app) == before


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(
    kind=st.sampled_from(["charge.refunded", "charge.dispute.closed", "checkout.session.completed"]), amount=json_values
)
@example(kind="charge.refunded", amount=-500)
@example(kind="charge.refunded", amount="lots")
@example(kind="charge.dispute.closed", amount=True)
def test_a_signed_event_is_stored_only_when_its_amount_is_whole_cents(app, customer, kind, amount):
    if kind == "charge.refunded":
        obj = charge(payment_intent="pi_property", amount_refunded=amount)
    elif kind == "charge.dispute.closed":
        obj = dispute(payment_intent="pi_property", amount=amount)
    else:
        obj = checkout_session(customer.team_id, "cs_unknown", amount_total=amount)
    payload = event(kind, obj)
    response = deliver(app.test_client(), payload)
    whole_cents = type(amount) is int and 0 <= amount < 2**63 or (amount is None and kind.startswith("checkout"))
    assert response.status_code == (200 if whole_cents else 400)
    with app.app_context():
        event_id = json.loads(payload)["id"]
        recorded = db.session.get(StripeEvent, event_id) is not None
        reversals = db.session.scalars(select(PaymentReversal.amount_cents).where(PaymentReversal.event_id == event_id))
        assert recorded == whole_cents and all(cents >= 0 for cents in reversals)
    assert factories.balance(app, customer.team_id) == 1000
