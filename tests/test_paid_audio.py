"""Audio is always paid for: no client can get speech that the books record as refunded.

Each section reproduces a way an adversarial run got audio for free, and holds the line.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import responses
from sqlalchemy import func, select, update

from app import billing, metering, speech
from app.extensions import db
from app.models import GatewayProcess, PaymentReversal, SpeechRequest, User, utcnow
from engine.audio import Encoder
from tests import factories
from tests.conftest import STUB_UPSTREAM
from tests.fake_upstream import FakeUpstream, Paced, stub_catalog
from tests.servers import ROOT, free_port, gunicorn, private_redis, serve, wait_for
from tests.stripe_helpers import charge as stripe_charge
from tests.stripe_helpers import checkout_session, deliver, dispute, event
from tests.test_payments import payment

SPEECH = "/v1/audio/speech"
# Ordinary prose, which Kokoro speaks at about 17 characters a second.
PROSE = ("The quick brown fox jumps over the lazy dog, and then it runs back into the forest to find its friends. ") * 4
PROSE_SECONDS = len(PROSE) / 17


def speech_body(**fields) -> dict:
    return {"model": "kokoro", "input": PROSE, "voice": "af_sky", "response_format": "pcm", **fields}


def raw_post(client, customer, raw: str):
    return client.post(SPEECH, data=raw.encode(), headers={**customer.headers, "Content-Type": "application/json"})


@pytest.fixture
def counted_upstream():
    """A stubbed upstream that records every synthesis it is asked for."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(f"{STUB_UPSTREAM}/audio/speech", body=b"ID3audio", content_type="audio/mpeg")
        stub_catalog(mock, STUB_UPSTREAM)
        yield mock


def syntheses(mock) -> int:
    return sum(call.request.url.endswith("/audio/speech") for call in mock.calls)


# 1. Nothing the client sends can make the upstream break off: every forwarded string is checked.


@pytest.mark.parametrize(
    "raw,field,kind",
    [
        ('"Hello there. And a last sentence \\ud800."', "input", "a lone surrogate (U+D800)"),
        ('"Hello \\udfff there."', "input", "a lone surrogate (U+DFFF)"),
        ('"Hello \\u0000 there."', "input", "a control character (U+0000)"),
        ('"Bell \\u0007 rings."', "input", "a control character (U+0007)"),
        ('"Next line \\u0085 here."', "input", "a control character (U+0085)"),
    ],
)
def test_text_the_engine_cannot_speak_is_400_naming_the_field(
    app, client, customer, counted_upstream, raw, field, kind
):
    response = raw_post(client, customer, f'{{"input": {raw}, "voice": "af_sky"}}')
    assert response.status_code == 400
    detail = response.get_json()["detail"]
    assert detail.startswith(f"'{field}' contains {kind}") and "remove it" in detail
    assert response.get_json()["error"]["param"] == field
    assert syntheses(counted_upstream) == 0
    assert factories.balance(app, customer.team_id) == 1000 and factories.speech_requests(app, customer.team_id) == []


@pytest.mark.parametrize(
    "field,raw",
    [
        ("voice", '"af_sky\\u0000"'),
        ("voice", '"af_\\ud800sky"'),
        ("voice", '"=HYPERLINK(1)"'),
        ("model", '"kokoro\\u0000"'),
        ("model", '"tts-1\\n"'),
        ("lang_code", '"a\\u0000"'),
    ],
)
def test_a_nul_or_surrogate_in_any_forwarded_field_is_400_before_anything_happens(
    app, client, customer, counted_upstream, field, raw
):
    response = raw_post(client, customer, f'{{"input": "Hello.", "{field}": {raw}}}')
    assert response.status_code == 400 and response.get_json()["detail"].startswith(f"'{field}' must be")
    assert syntheses(counted_upstream) == 0
    assert factories.speech_requests(app, customer.team_id) == []


def test_line_breaks_and_tabs_are_ordinary_text(client, customer, counted_upstream):
    response = client.post(SPEECH, json={"input": "One line.\nAnother,\tindented.\r\n"}, headers=customer.headers)
    assert response.status_code == 200 and syntheses(counted_upstream) == 1


@pytest.mark.parametrize("field", ["speed", "volume_multiplier"])
def test_a_four_thousand_digit_number_is_400_not_500(app, client, customer, counted_upstream, field):
    response = raw_post(client, customer, f'{{"input": "Hello.", "{field}": {"9" * 4000}}}')
    assert response.status_code == 400 and response.get_json()["detail"].startswith(f"'{field}' must be a number")
    assert syntheses(counted_upstream) == 0


def test_only_known_checked_fields_are_sent_upstream(client, customer, counted_upstream):
    body = {
        "input": "Hello.",
        "voice": "af_bella(2)+af_sky(1)",
        "instructions": "Speak like a pirate.",
        "return_download_link": False,
        "unknown": {"deep": ["x" * 100]},
        "normalization_options": {"normalize": False},
    }
    assert client.post(SPEECH, json=body, headers=customer.headers).status_code == 200
    sent = json.loads(counted_upstream.calls[-1].request.body)
    assert sent == {
        "model": "kokoro",
        "input": "Hello.",
        "voice": "af_bella(2)+af_sky(1)",
        "response_format": "mp3",
        "speed": 1.0,
        "normalization_options": {"normalize": False},
    }


def test_normalization_options_must_be_kokoros_switches(client, customer, counted_upstream):
    for options in ({"normalize": "yes"}, {"rm -rf": True}, [True]):
        body = {"input": "Hello.", "normalization_options": options}
        response = client.post(SPEECH, json=body, headers=customer.headers)
        assert response.status_code == 400 and "'normalization_options'" in response.get_json()["detail"]
    assert syntheses(counted_upstream) == 0


def test_an_oversized_chunked_body_is_413_however_it_is_sent(make_app):
    app = make_app(MAX_CONTENT_LENGTH=256 * 1024)
    customer = factories.customer(app, balance=1000)
    big = json.dumps({"input": "x" * (300 * 1024)}).encode()

    def chunked():
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    with serve(app) as url:
        response = requests.post(
            f"{url}{SPEECH}", data=chunked(), headers={**customer.headers, "Content-Type": "application/json"}
        )
    assert response.status_code == 413 and "larger than the limit" in response.json()["detail"]
    response = app.test_client().post(SPEECH, data=big, headers=customer.headers)
    assert response.status_code == 413
    assert factories.speech_requests(app, customer.team_id) == [] and factories.balance(app, customer.team_id) == 1000


# 2. A mid-stream break refunds only what was not delivered.


def pcm_of(seconds: float) -> bytes:
    return Encoder("pcm").feed(np.zeros(int(24000 * seconds), dtype="float32"))


def mp3_of(seconds: float) -> bytes:
    encoder = Encoder("mp3")
    t = np.arange(int(24000 * seconds)) / 24000
    return encoder.feed((0.2 * np.sin(2 * np.pi * 200 * t)).astype("float32")) + encoder.close()


def in_chunks(data: bytes, count: int) -> list[bytes]:
    size = -(-len(data) // count)
    return [data[start : start + size] for start in range(0, len(data), size)]


@pytest.fixture
def stream_through(make_app):
    """Relay `chunks` from a stand-in upstream through the app on real sockets; the request row after."""

    def run(chunks, break_after=None, response_format="pcm", speed=1.0, **overrides):
        with serve(FakeUpstream(chunks, break_after=break_after)) as upstream_url:
            app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", **overrides)
            customer = factories.customer(app, balance=10_000)
            with serve(app) as url:
                received = bytearray()
                with requests.post(
                    f"{url}{SPEECH}",
                    json=speech_body(response_format=response_format, speed=speed),
                    headers=customer.headers,
                    stream=True,
                    timeout=30,
                ) as response:
                    assert response.status_code == 200
                    try:
                        for chunk in response.iter_content(chunk_size=None):
                            received += chunk
                    except requests.exceptions.ChunkedEncodingError:
                        pass
            [row] = wait_settled(app, customer)
            assert 10_000 - factories.balance(app, customer.team_id) == row.credits - row.credits_refunded
            factories.assert_books_balance(app, customer.team_id)
            assert app.test_cli_runner().invoke(args=["audit"]).exit_code == 0
            return row, bytes(received)

    return run


def wait_settled(app, customer, timeout=5.0):
    def settled():
        rows = factories.speech_requests(app, customer.team_id)
        return rows if rows and all(row.state != "charged" for row in rows) else None

    return wait_for(settled, timeout, "every request settled")


@pytest.mark.parametrize("response_format,make", [("pcm", pcm_of), ("mp3", mp3_of)])
def test_a_break_after_most_of_the_audio_keeps_most_of_the_charge(stream_through, response_format, make):
    chunks = in_chunks(make(PROSE_SECONDS), 20)
    row, received = stream_through(chunks, break_after=18, response_format=response_format)
    assert row.state == "refunded" and row.error == "Upstream broke off mid-stream."
    assert len(received) == sum(map(len, chunks[:18]))
    assert row.credits == len(PROSE) and row.credits - row.credits_refunded >= 0.8 * row.credits
    assert row.audio_ms >= 0.85 * PROSE_SECONDS * 1000


@pytest.mark.parametrize("response_format,make", [("pcm", pcm_of), ("mp3", mp3_of)])
def test_a_break_after_a_tenth_of_the_audio_refunds_most_of_it(stream_through, response_format, make):
    row, _ = stream_through(in_chunks(make(PROSE_SECONDS), 20), break_after=2, response_format=response_format)
    assert row.state == "refunded"
    assert 0 < row.credits - row.credits_refunded <= 0.2 * row.credits


def test_a_fast_request_that_breaks_off_keeps_the_share_its_speed_delivered(stream_through):
    # At speed 2 the text lasts half as long, so the same audio delivered pays for twice the share.
    row, received = stream_through(in_chunks(pcm_of(PROSE_SECONDS / 2), 20), break_after=5, speed=2.0)
    audio_ms = len(received) * 1000 // 48000
    assert row.state == "refunded" and row.speed == 2.0 and row.audio_ms == audio_ms
    kept = row.credits - row.credits_refunded
    assert kept == metering.kept_credits(row.credits, row.characters, 2.0, audio_ms, 20)
    assert kept > metering.kept_credits(row.credits, row.characters, 1.0, audio_ms, 20)


def test_a_break_before_any_audio_byte_refunds_everything(stream_through):
    # A WAV header is bytes, but no audio.
    header = Encoder("wav").feed(np.zeros(0, dtype="float32"))
    row, received = stream_through([header, pcm_of(5)], break_after=1, response_format="wav")
    assert received == header
    assert row.state == "refunded" and row.audio_ms == 0 and row.credits_refunded == row.credits


def test_a_stream_that_cannot_be_measured_keeps_its_charge_when_it_breaks(stream_through):
    row, _ = stream_through([b"\x01" * 70_000, b"\x02" * 1000, b"never"], break_after=2, response_format="mp3")
    assert row.state == "refunded" and row.audio_ms is None and row.credits_refunded == 0


def test_the_refund_share_follows_the_speed(app, customer):
    # At speed 2 the same text lasts half as long: half the audio is all of it.
    assert metering.kept_credits(100, 100, 2.0, 2500, 20) == 100
    assert metering.kept_credits(100, 100, 1.0, 2500, 20) == 50
    assert metering.kept_credits(100, 100, 0.25, 2500, 20) == 13
    assert metering.kept_credits(7, 100, 1.0, 1, 20) == 1
    assert metering.kept_credits(100, 100, 1.0, 0, 20) == 0
    assert metering.kept_credits(100, 100, 1.0, None, 20) == 100


def test_a_fast_request_cut_off_is_refunded_by_the_speed_it_was_asked_at(app, customer):
    # 100 characters at speed 2 last 2.5 s: a break after 2.5 s of audio delivered all of it.
    with app.app_context():
        fast = metering.charge_speech(
            customer.team_id,
            customer.user_id,
            customer.key_id,
            unlimited=False,
            characters=100,
            model="kokoro",
            voice="af_sky",
            response_format="pcm",
            speed=2.0,
        )
        db.session.commit()
        assert db.session.get(SpeechRequest, fast.request_id).speed == 2.0
        assert metering.refund_speech(fast.request_id, "Upstream broke off mid-stream.", audio_ms=2500) == 0
        db.session.commit()
    assert factories.balance(app, customer.team_id) == 1000 - 100


# 3. Settle never refunds a live stream; no stream outlasts MAX_STREAM_SECONDS.


@pytest.mark.slow
def test_settle_leaves_a_slow_live_stream_alone_and_it_is_delivered(make_app):
    chunks = in_chunks(pcm_of(PROSE_SECONDS), 12)
    with serve(Paced(chunks, 0.1)) as upstream_url:
        app = make_app(
            UPSTREAM_URL=f"{upstream_url}/v1",
            STREAM_HEARTBEAT_SECONDS=0.2,
            PROCESS_LEASE_SECONDS=1.0,
            STALE_CHARGE_SECONDS=1,
        )
        customer = factories.customer(app, balance=10_000)
        runner = app.test_cli_runner()
        with serve(app) as url:
            with requests.post(
                f"{url}{SPEECH}", json=speech_body(), headers=customer.headers, stream=True, timeout=30
            ) as response:
                received = bytearray()
                settled = []
                for chunk in response.iter_content(chunk_size=None):
                    upstream_chunks_before = len(received) // len(chunks[0])
                    received += chunk
                    if len(received) // len(chunks[0]) == upstream_chunks_before:
                        continue  # the gateway relays an upstream chunk in several pieces: one pause a chunk
                    # Settle, run while the stream is live, finds a stream older than its age
                    # of a live process, and leaves it alone.
                    # A sleep on purpose: the reader really pauses (11 times, about 5 s in all with the
                    # upstream's pace), so the stream outlives --older-than and the lease, which only the
                    # process's own thread renews, in real time, meanwhile.
                    time.sleep(0.3)
                    settled.append(runner.invoke(args=["speech", "settle", "--older-than", "1"]).output)
        [row] = wait_settled(app, customer)
    assert bytes(received) == b"".join(chunks)
    assert row.state == "delivered" and row.credits_refunded == 0 and row.progress_at is not None
    assert len(settled) >= 11 and all("settled 0" in output for output in settled)
    assert factories.balance(app, customer.team_id) == 10_000 - len(PROSE)


def test_a_stream_settled_meanwhile_sends_not_one_more_byte(make_app, caplog):
    # Chunks no larger than the gateway's reads, so it relays them one for one.
    chunks = in_chunks(pcm_of(PROSE_SECONDS), 80)
    assert len(chunks[0]) <= 16384
    gate = threading.Event()
    with serve(FakeUpstream(chunks, gate=gate)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", STREAM_HEARTBEAT_SECONDS=0)
        customer = factories.customer(app, balance=10_000)
        with serve(app) as url:
            with requests.post(
                f"{url}{SPEECH}", json=speech_body(), headers=customer.headers, stream=True, timeout=30
            ) as response:
                parts = response.iter_content(chunk_size=None)
                first = b""
                while len(first) < len(chunks[0]):
                    first += next(parts)
                # The stream looks dead, its process's lease run out (a process that lost its
                # database for longer than the lease): settle refunds the rest.
                with app.app_context():
                    [row] = factories.speech_requests(app, customer.team_id)
                    db.session.execute(
                        update(SpeechRequest)
                        .where(SpeechRequest.id == row.id)
                        .values(progress_at=utcnow() - timedelta(hours=1))
                    )
                    db.session.execute(
                        update(GatewayProcess)
                        .where(GatewayProcess.id == row.process_id)
                        .values(lease_until=utcnow() - timedelta(minutes=1))
                    )
                    db.session.commit()
                assert "settled 1" in app.test_cli_runner().invoke(args=["speech", "settle"]).output
                gate.set()
                rest = bytearray()
                with pytest.raises(requests.exceptions.ChunkedEncodingError):
                    for chunk in parts:
                        rest += chunk
        [row] = factories.speech_requests(app, customer.team_id)
    assert first == chunks[0] and rest == b""
    # What was delivered when settle ran is paid for; the rest was refunded.
    kept = row.credits - row.credits_refunded
    assert row.state == "refunded" and row.error == metering.STALE_REASON
    assert kept == metering.kept_credits(row.credits, row.characters, 1.0, len(chunks[0]) * 1000 // 48000, 20)
    assert 0 < kept < row.credits
    assert app.test_cli_runner().invoke(args=["audit"]).exit_code == 0
    # The server's log of the cut-off response names the request and why.
    said = f"speech request {row.id}: The request was settled while it streamed."
    wait_for(lambda: said in caplog.text, what="the log line")


def test_no_stream_lasts_past_the_maximum_and_it_is_charged_for_what_it_delivered(make_app, caplog):
    chunks = in_chunks(pcm_of(PROSE_SECONDS), 20)
    with serve(Paced(chunks, 0.1)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", MAX_STREAM_SECONDS=0.5)
        customer = factories.customer(app, balance=10_000)
        with serve(app) as url:
            received = bytearray()
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                with requests.post(
                    f"{url}{SPEECH}", json=speech_body(), headers=customer.headers, stream=True, timeout=30
                ) as response:
                    for chunk in response.iter_content(chunk_size=None):
                        received += chunk
        [row] = wait_settled(app, customer)
    assert 0 < len(received) < sum(map(len, chunks)) and row.bytes_sent == len(received)
    assert row.state == "refunded" and "longest allowed" in row.error
    assert row.credits - row.credits_refunded == metering.kept_credits(
        row.credits, row.characters, 1.0, len(received) * 1000 // 48000, 20
    )
    factories.assert_books_balance(app, customer.team_id)
    # The server's log of the cut-off response names the request and the reason, for the operator.
    said = (
        f"speech request {row.id}: The stream ran past the longest allowed (0.5 s). The undelivered part was refunded."
    )
    wait_for(lambda: said in caplog.text, what="the log line")


@pytest.mark.parametrize("late", [0.0, 0.001])
def test_a_chunk_at_exactly_the_longest_a_stream_may_run_still_goes_out(make_app, monkeypatch, late):
    """MAX_STREAM_SECONDS is how long a stream may run: audio read at exactly that time is relayed, and a
    millisecond later the stream is cut and refunded (the speech module's monotonic clock injected)."""
    clock = [1000.0]
    monkeypatch.setattr(speech, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    chunks = in_chunks(pcm_of(1.0), 2)
    with serve(FakeUpstream(chunks)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", MAX_STREAM_SECONDS=5.0)
        customer = factories.customer(app, balance=10_000)
        response = app.test_client().post(SPEECH, json=speech_body(), headers=customer.headers, buffered=False)
        # The request arrived at 1000.0 s; its audio is read at the deadline, or just past it.
        clock[0] += 5.0 + late
        body = b"".join(response.iter_encoded()) if not late else None
        if late:
            with pytest.raises(speech.StreamAborted, match="ran past the longest allowed"):
                b"".join(response.iter_encoded())
        response.close()
    [row] = factories.speech_requests(app, customer.team_id)
    if late:
        assert row.state == "refunded" and row.credits_refunded > 0 and "longest allowed" in row.error
    else:
        assert body == b"".join(chunks) and row.state == "delivered" and row.credits_refunded == 0
        # The books time it on the same clock: read at the arrival, ended 5 s after it.
        assert (row.first_byte_ms, row.duration_ms) == (0, 5000)
    # And say when it was settled, whichever way.
    assert row.finished_at is not None and row.finished_at >= row.created_at


def test_a_live_stream_records_its_progress_as_it_goes(make_app):
    chunks = in_chunks(pcm_of(PROSE_SECONDS), 12)
    with serve(Paced(chunks, 0.1)) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", STREAM_HEARTBEAT_SECONDS=0.2)
        customer = factories.customer(app, balance=10_000)
        with serve(app) as url:
            with requests.post(
                f"{url}{SPEECH}", json=speech_body(), headers=customer.headers, stream=True, timeout=30
            ) as response:
                parts = response.iter_content(chunk_size=None)
                received = bytearray()
                while len(received) < sum(map(len, chunks[:8])):
                    received += next(parts)
                # Still streaming: what settle and the audit read of it is recent and covers what went out.
                [row] = factories.speech_requests(app, customer.team_id)
                assert row.state == "charged" and row.progress_at is not None
                assert 0 < row.bytes_sent <= len(received) and row.audio_ms > 0
                received += b"".join(parts)
        [row] = wait_settled(app, customer)
    assert bytes(received) == b"".join(chunks) and row.state == "delivered"


def test_settle_applies_the_progress_a_dead_worker_recorded(app, runner, customer):
    with app.app_context():
        row = factories.charge_speech(customer.team_id, 200)
        metering.record_progress(row.id, 96_000, 5_000)
        db.session.execute(
            update(SpeechRequest).where(SpeechRequest.id == row.id).values(progress_at=utcnow() - timedelta(hours=2))
        )
        db.session.commit()
    result = runner.invoke(args=["speech", "settle"])
    assert "settled 1, refunding 100 credits" in result.output
    [settled] = factories.speech_requests(app, customer.team_id)
    assert (settled.state, settled.credits_refunded, settled.audio_ms) == ("refunded", 100, 5_000)
    assert factories.balance(app, customer.team_id) == 1000 - 100
    assert runner.invoke(args=["audit"]).exit_code == 0


# 5. No upstream work for a key not confirmed in this request.


def test_a_revoked_key_never_starts_a_synthesis(app, client, customer, counted_upstream, runner):
    assert client.post(SPEECH, json={"input": "Hello."}, headers=customer.headers).status_code == 200
    assert runner.invoke(args=["keys", "revoke", str(customer.key_id)]).exit_code == 0
    for _ in range(10):
        response = client.post(SPEECH, json={"input": "Hello."}, headers=customer.headers)
        assert response.status_code == 401
    assert syntheses(counted_upstream) == 1


@pytest.mark.parametrize(
    "body,overrides",
    [
        (b'{"input": "' + b"x" * 5000 + b'"}', {"MAX_CONTENT_LENGTH": 1024}),
        (b"{not json", {}),
        (b'{"input": "Hello."}', {"RATE_LIMIT_PER_KEY": "1/minute"}),
        (b'{"input": "Hello."}', {"MAX_STREAMS_PER_ACCOUNT": 0}),
    ],
    ids=["413", "400", "429 rate", "429 streams"],
)
def test_every_answer_to_a_revoked_key_is_401(make_app, counted_upstream, body, overrides):
    app = make_app(**overrides)
    customer = factories.customer(app, balance=1000)
    client = app.test_client()
    assert client.get("/v1/balance", headers=customer.headers).status_code == 200
    assert app.test_cli_runner().invoke(args=["keys", "revoke", str(customer.key_id)]).exit_code == 0
    response = client.post(SPEECH, data=body, headers={**customer.headers, "Content-Type": "application/json"})
    assert response.status_code == 401 and response.get_json()["detail"] == "This API key has been revoked."
    assert syntheses(counted_upstream) == 0


# 4. Stripe events in any order give the same books.


def stripe_events(user_id: int, session: str, intent: str) -> dict:
    """The webhook events of one starter pack (10,000 credits for 500 cents), by name."""
    unpaid = checkout_session(user_id, session, payment_status="unpaid", payment_intent=intent)
    return {
        "completed unpaid": event("checkout.session.completed", unpaid),
        "async succeeded": event("checkout.session.async_payment_succeeded", {**unpaid, "payment_status": "paid"}),
        "partial refund": event("charge.refunded", stripe_charge(payment_intent=intent, amount_refunded=125)),
        "full refund": event("charge.refunded", stripe_charge(payment_intent=intent, amount_refunded=500)),
        "dispute lost": event("charge.dispute.closed", dispute(payment_intent=intent, amount=500)),
        "async failed": event("checkout.session.async_payment_failed", unpaid),
    }


@pytest.mark.parametrize(
    "names,taken_back",
    [
        (("completed unpaid", "async succeeded", "partial refund", "full refund", "dispute lost"), 10_000),
        (("completed unpaid", "async succeeded", "partial refund"), 2_500),
        (("completed unpaid", "async succeeded", "partial refund", "async failed"), 2_500),
    ],
    ids=["refunds and a dispute", "a partial refund", "a late failure notice"],
)
def test_stripe_events_in_every_order_and_redelivered_give_the_same_books(app, runner, names, taken_back):
    """Stripe does not promise the order of events: every order ends in the same balance."""
    client = app.test_client()
    orders = list(itertools.permutations(names))
    for number, order in enumerate(orders):
        buyer = factories.customer(app, balance=300)
        session, intent = f"cs_order_{number}", f"pi_order_{number}"
        with app.app_context():
            factories.starter_payment(buyer.team_id, session)
            db.session.commit()
        payloads = stripe_events(buyer.team_id, session, intent)
        for name in order + order[:2]:
            response = deliver(client, payloads[name])
            assert response.status_code == 200, (order, name, response.get_json())
        assert factories.balance(app, buyer.team_id) == 300 + 10_000 - taken_back, order
        factories.assert_books_balance(app, buyer.team_id)
        paid = payment(app, session)
        assert paid.paid_at is not None and paid.status != "failed", order
        assert paid.credits_reversed == taken_back
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 0, result.output
    assert f"{len(orders)} payments" in result.output


def test_a_reversal_for_a_payment_that_never_arrives_waits_and_credits_nothing(app, client):
    buyer = factories.customer(app, balance=50)
    response = deliver(client, event("charge.refunded", stripe_charge(payment_intent="pi_never", amount_refunded=500)))
    assert response.status_code == 200 and response.get_json()["outcome"].startswith("kept: a refund of 500 cents")
    assert factories.balance(app, buyer.team_id) == 50


def test_the_audit_names_a_reversal_that_was_not_applied(app, runner, client):
    buyer = factories.customer(app, balance=0)
    with app.app_context():
        factories.starter_payment(buyer.team_id, "cs_audit")
        db.session.commit()
    deliver(
        client, event("checkout.session.completed", checkout_session(buyer.team_id, "cs_audit", payment_intent="pi_a"))
    )
    with app.app_context():
        # A refund recorded behind the webhook's back, never applied.
        db.session.add(PaymentReversal(payment_intent_id="pi_a", kind="refund", amount_cents=250, event_id="evt_x"))
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 1
    assert "payment cs_audit: its refunds and disputes owe 5000 credits back but 0 were taken" in result.output


# 6. Limits hold across processes: two gunicorn workers share one stream cap and one set of windows.


def test_several_workers_refuse_to_start_on_in_memory_rate_limits():
    process = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{free_port()}", "wsgi:app"],
        cwd=ROOT,
        env={**os.environ, "SECRET_KEY": "x", "RATELIMIT_STORAGE_URI": "memory://"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode != 0
    assert "2 workers with RATELIMIT_STORAGE_URI=memory://" in process.stderr


def _fresh_connection(method, url, **kwargs):
    # A new connection each time, so the requests spread over both workers.
    return requests.request(method, url, headers={"Connection": "close", **kwargs.pop("headers", {})}, **kwargs)


def test_two_gunicorn_workers_share_the_stream_cap_the_rate_limits_and_the_sign_in_limits(app, database_uri):
    customer = factories.customer(app, balance=10_000, password="correct horse battery")
    other_keys = [factories.add_key(app, customer.user_id) for _ in range(6)]
    gate = threading.Event()
    with serve(FakeUpstream([b"ID3first", b"rest"], gate=gate)) as upstream_url, private_redis() as (limits, _):
        env = {
            "DATABASE_URL": database_uri,
            "UPSTREAM_URL": f"{upstream_url}/v1",
            "SECRET_KEY": "two-workers",
            "RATELIMIT_STORAGE_URI": limits,
            "RATE_LIMIT_PER_KEY": "20/minute",
            "MAX_STREAMS_PER_ACCOUNT": "3",
            "LOGIN_LIMIT_PER_IP": "5/15minutes",
        }
        with gunicorn("wsgi:app", env, workers=2, threads=8) as (url, _):
            # Rate limits: 20 a minute for this key, whichever worker answers.
            statuses = [
                _fresh_connection("get", f"{url}/v1/balance", headers=customer.headers).status_code for _ in range(30)
            ]
            assert statuses.count(200) == 20 and statuses.count(429) == 10

            # Streams: six opened at once from six keys, three allowed in all.
            def open_stream(secret):
                return requests.post(
                    f"{url}{SPEECH}",
                    json={"input": "Hello."},
                    headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
                    stream=True,
                    timeout=20,
                )

            with ThreadPoolExecutor(6) as pool:
                streams = list(pool.map(open_stream, other_keys))
            assert sorted(response.status_code for response in streams) == [200, 200, 200, 429, 429, 429]
            gate.set()
            for response in streams:
                if response.status_code == 200:
                    assert response.content == b"ID3firstrest"
                response.close()

            # Failed sign-ins from one address: five in the window, then 429 on every worker.
            answers = []
            for _ in range(7):
                session = requests.Session()
                page = session.get(f"{url}/login", headers={"Connection": "close"}).text
                token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
                answers.append(
                    session.post(
                        f"{url}/login",
                        data={"email": customer.email, "password": "wrong guess", "csrf_token": token},
                        headers={"Connection": "close"},
                    ).status_code
                )
            assert answers == [200] * 5 + [429] * 2
    assert factories.balance(app, customer.team_id) == 10_000 - 3 * len("Hello.")


# 7. No 500 from a form either.


def test_a_nul_in_a_sign_up_or_sign_in_form_is_400_and_creates_nothing(app, web):
    web.get("/signup")
    response = web.post(
        "/signup",
        {"email": "a\x00b@example.com", "password": "correct horse battery", "confirm": "correct horse battery"},
    )
    assert response.status_code == 400 and b"control character" in response.data
    web.get("/login")
    assert web.post("/login", {"email": "a@example.com\x00", "password": "x"}).status_code == 400
    with app.app_context():
        assert db.session.scalar(select(func.count(User.id))) == 0


# 8. The audit sees it.


def test_the_audit_names_an_over_refund_a_stale_charge_and_frequent_breaks(app, runner, customer):
    with app.app_context():
        over = factories.charge_speech(customer.team_id, 100).id
        metering.record_progress(over, 96_000, 4_000)
        metering.refund_speech(over, "Upstream broke off mid-stream.")
        # Planted: the whole charge given back though 4 s of audio (80 of the 100 credits' worth) went out.
        db.session.execute(update(SpeechRequest).where(SpeechRequest.id == over).values(credits_refunded=100))
        billing.apply(customer.team_id, 80, kind="refund", reference="planted", note="planted")
        stale = factories.charge_speech(customer.team_id, 10).id
        db.session.execute(
            update(SpeechRequest).where(SpeechRequest.id == stale).values(created_at=utcnow() - timedelta(hours=2))
        )
        for _ in range(5):
            broken = factories.charge_speech(customer.team_id, 10).id
            metering.record_progress(broken, 4800, 100)
            metering.refund_speech(broken, "Upstream broke off mid-stream.")
        db.session.commit()
    result = runner.invoke(args=["audit"])
    assert result.exit_code == 1
    assert f"request {over}: kept 0 credits, but its 4000 ms of delivered audio pay for 80" in result.output
    assert f"request {over}: 100 credits due back but 20 refunded" in result.output
    assert f"request {stale}: still charged, no progress since" in result.output
    assert (
        f"notice: team {customer.team_id} (Personal, <{customer.email}>): 6 of 7 streams in 30 days broke off"
        in result.output
    )
