"""Streaming through real sockets: the app and a stand-in upstream, each on loopback."""

import threading
import tracemalloc

import pytest
import requests

from app.speech import StreamAborted
from tests import factories
from tests.fake_upstream import FakeUpstream, Paced, Silent
from tests.servers import serve, wait_for

HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}


def test_first_bytes_reach_the_client_before_the_upstream_has_finished(gateway):
    gate = threading.Event()
    upstream = FakeUpstream([b"ID3first-sentence", b"second-sentence"], gate=gate)
    app, url = gateway(upstream)
    customer = factories.customer(app, balance=1000)
    with requests.post(
        f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, stream=True, timeout=10
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "audio/mpeg"
        chunks = response.iter_content(chunk_size=None)
        assert next(chunks) == b"ID3first-sentence"
        # The upstream is still holding back its second sentence.
        assert not upstream.finished.is_set()
        gate.set()
        assert b"".join(chunks) == b"second-sentence"
    assert upstream.finished.wait(5)
    _wait_for_state(app, customer, "delivered")


def test_a_large_body_streams_through_in_constant_memory(gateway):
    chunk = b"\x55" * 65536
    total = len(chunk) * 1024  # 64 MiB
    app, url = gateway(FakeUpstream([chunk] * 1024))
    customer = factories.customer(app, balance=1000)
    received = 0
    most = 0
    tracemalloc.start()
    try:
        with requests.post(
            f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, stream=True, timeout=30
        ) as response:
            for piece in response.iter_content(chunk_size=65536):
                received += len(piece)
                # What is held at each step of the stream, not the peak: werkzeug's test server
                # (not the gateway) reads a closing connection into a 10 MB buffer it frees at once.
                most = max(most, tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert received == total
    # Client, gateway and upstream together never held more than a sliver of the 64 MiB that went through.
    assert most < 4 * 1024 * 1024, f"Python allocations reached {most / 2**20:.1f} MiB"
    [speech] = _wait_for_state(app, customer, "delivered")
    assert speech.bytes_sent == received


def test_an_upstream_that_breaks_mid_stream_is_refunded_and_the_client_sees_a_broken_body(gateway, caplog):
    upstream = FakeUpstream([b"ID3part-one", b"part-two", b"never"], break_after=2)
    app, url = gateway(upstream)
    customer = factories.customer(app, balance=1000)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        with requests.post(
            f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, stream=True, timeout=10
        ) as response:
            assert response.status_code == 200
            b"".join(response.iter_content(chunk_size=None))
    [speech] = _wait_for_state(app, customer, "refunded")
    assert speech.error == "Upstream broke off mid-stream."
    assert factories.balance(app, customer.team_id) == 1000
    # The server's log of the aborted response names the request and what happened, for the operator.
    said = f"speech request {speech.id}: Upstream broke off mid-stream. The undelivered part was refunded."
    wait_for(lambda: said in caplog.text)
    factories.assert_books_balance(app, customer.team_id)


def test_a_client_that_hangs_up_mid_stream_closes_the_upstream_connection(gateway):
    gate = threading.Event()
    upstream = FakeUpstream([b"ID3first", b"\x00" * 65536], gate=gate, endless=True)
    app, url = gateway(upstream)
    customer = factories.customer(app, balance=1000)
    response = requests.post(f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, stream=True, timeout=10)
    assert next(response.iter_content(chunk_size=None)) == b"ID3first"
    response.close()
    gate.set()
    # The upstream would stream forever; it stops only because the gateway closed its connection.
    assert upstream.stream_closed.wait(10), "the upstream connection was left open"
    [speech] = _wait_for_state(app, customer, "delivered")
    assert speech.error == "client disconnected"
    assert factories.balance(app, customer.team_id) == 1000 - len(HELLO["input"])


def test_a_read_timeout_before_the_first_byte_is_502_and_refunded(gateway):
    silent = Silent()  # the 200 and its headers go out, then nothing
    app, url = gateway(silent, UPSTREAM_READ_TIMEOUT=0.3)
    customer = factories.customer(app, balance=1000)
    try:
        response = requests.post(f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, timeout=10)
    finally:
        silent.release.set()
    assert response.status_code == 502
    assert response.json()["detail"].startswith("The speech server did not send audio in time.")
    _wait_for_state(app, customer, "refunded")
    assert factories.balance(app, customer.team_id) == 1000


def _wait_for_state(app, customer, state, timeout=5.0):
    """The settlement is written as the response ends, just after the client has its last byte."""

    def settled():
        rows = factories.speech_requests(app, customer.team_id)
        return rows if rows and all(row.state == state for row in rows) else None

    return wait_for(settled, timeout, f"every request {state}")


def test_an_upstream_that_stalls_mid_stream_is_refunded(gateway):
    gate = threading.Event()
    upstream = FakeUpstream([b"ID3first", b"after the stall"], gate=gate)
    app, url = gateway(upstream, UPSTREAM_READ_TIMEOUT=0.3)
    customer = factories.customer(app, balance=1000)
    try:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            with requests.post(
                f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, stream=True, timeout=10
            ) as response:
                b"".join(response.iter_content(chunk_size=None))
    finally:
        gate.set()
    [speech] = _wait_for_state(app, customer, "refunded")
    assert speech.error == "Upstream stalled mid-stream." and speech.bytes_sent == len(b"ID3first")
    assert factories.balance(app, customer.team_id) == 1000


def test_a_debit_that_loses_a_race_never_starts_a_synthesis(gateway, monkeypatch):
    from app import billing, metering

    upstream = FakeUpstream([b"ID3first", b"rest"])
    app, url = gateway(upstream)
    customer = factories.customer(app, balance=1000)

    def raced(*args, **kwargs):
        # Another request spent the balance between the key lookup and this debit.
        raise billing.InsufficientCredits(5, len(HELLO["input"]))

    monkeypatch.setattr(metering, "charge_speech", raced)
    response = requests.post(f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, timeout=10)
    assert response.status_code == 402
    assert upstream.received == [], "the upstream was asked before the charge was committed"
    assert factories.speech_requests(app, customer.team_id) == []
    assert factories.balance(app, customer.team_id) == 1000


def test_a_key_revoked_since_its_last_use_gets_401_and_no_synthesis(gateway):
    from app import keys
    from app.extensions import db
    from app.models import ApiKey

    upstream = FakeUpstream([b"ID3first", b"rest"])
    app, url = gateway(upstream)
    customer = factories.customer(app, balance=1000)
    # This process has just seen the key work.
    assert requests.post(f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, timeout=10).ok
    with app.app_context():
        keys.revoke(db.session.get(ApiKey, customer.key_id))
        db.session.commit()
    for _ in range(5):
        response = requests.post(f"{url}/v1/audio/speech", json=HELLO, headers=customer.headers, timeout=10)
        assert response.status_code == 401 and response.json()["detail"] == "This API key has been revoked."
    assert len(upstream.received) == 1
    assert factories.balance(app, customer.team_id) == 1000 - len(HELLO["input"])


@pytest.mark.parametrize(
    "upstream,overrides,reason",
    [
        (FakeUpstream([b"ID3part-one", b"part-two", b"never"], break_after=2), {}, "Upstream broke off mid-stream."),
        (
            Paced([b"ID3" + bytes(4800)] * 20, 0.1),
            {"MAX_STREAM_SECONDS": 0.3},
            "The stream ran past the longest allowed (0.3 s).",
        ),
    ],
    ids=["upstream broke off", "past the longest allowed"],
)
def test_the_error_a_cut_stream_ends_with_names_the_request_and_the_reason(make_app, upstream, overrides, reason):
    # What the server logs when it aborts the response: the operator finds the request by its id.
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", **overrides)
        customer = factories.customer(app, balance=1000)
        response = app.test_client().post("/v1/audio/speech", json=HELLO, headers=customer.headers, buffered=False)
        with pytest.raises(StreamAborted) as aborted:
            b"".join(response.response)
        response.close()
    [speech] = factories.speech_requests(app, customer.team_id)
    assert str(aborted.value) == f"speech request {speech.id}: {reason} The undelivered part was refunded."
    assert aborted.value.reason == f"{reason} The undelivered part was refunded."


def test_audio_goes_out_in_pieces_of_at_most_stream_chunk_bytes(make_app):
    audio = b"ID3" + bytes(range(256)) * 160  # one 40,963-byte chunk from the upstream
    with serve(FakeUpstream([audio])) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", STREAM_CHUNK_BYTES=4096)
        customer = factories.customer(app, balance=1000)
        response = app.test_client().post("/v1/audio/speech", json=HELLO, headers=customer.headers, buffered=False)
        pieces = list(response.response)
    assert b"".join(pieces) == audio
    assert max(map(len, pieces)) <= 4096 and len(pieces) >= len(audio) // 4096


def test_a_delivered_request_records_its_first_byte_and_its_duration_in_milliseconds(make_app):
    # Three chunks a quarter of a second apart: the first at once, the stream over after ~0.75 s.
    with serve(Paced([b"ID3one", b"two", b"three"], 0.25)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        customer = factories.customer(app, balance=1000)
        response = app.test_client().post("/v1/audio/speech", json=HELLO, headers=customer.headers)
        assert response.data == b"ID3onetwothree"
    [row] = factories.speech_requests(app, customer.team_id)
    # Half a second of pacing at least came after the first byte, however slow the machine.
    assert row.state == "delivered" and 500 <= row.duration_ms < 60_000
    assert 0 <= row.first_byte_ms <= row.duration_ms - 500
