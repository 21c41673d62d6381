"""A client that leaves while its stream waits for the speech server stops the speech server's work at
once, not one piece later: the gateway closes the upstream, the charge stands as for any hang-up."""

import threading
from types import SimpleNamespace

import pytest

from app.hangups import peer_closed
from app.speech import Relay
from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.servers import serve, wait_for
from tests.test_liveness import raw_speech_request
from tests.test_paid_audio import PROSE, in_chunks, pcm_of, speech_body


def test_a_client_who_leaves_while_the_next_piece_is_made_closes_the_upstream_at_once(make_app):
    # The first piece, then nothing until the test says so: the speech server is making the next one.
    next_piece = threading.Event()
    first = pcm_of(0.1)
    upstream = FakeUpstream([first, *in_chunks(pcm_of(4), 4)], gate=next_piece)
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        customer = factories.customer(app, balance=10_000)
        with serve(app) as url:
            client = raw_speech_request(url, customer, speech_body())
            # All of the first piece is read: no write of the gateway's is pending when the client leaves.
            received = b""
            while len(received.partition(b"\r\n\r\n")[2]) < len(first):
                received += client.recv(65536)
            client.close()
            [row] = wait_for(
                lambda: [r for r in factories.speech_requests(app, customer.team_id) if r.state != "charged"],
                what="the stream to end while the speech server was still making its next piece",
            )
            next_piece.set()
            assert upstream.stream_closed.wait(5)
    assert not upstream.finished.is_set(), "the speech server was read to its end for nobody"
    assert row.state == "delivered" and row.error == "client disconnected" and row.credits_refunded == 0
    assert factories.balance(app, customer.team_id) == 10_000 - len(PROSE)
    assert app.test_cli_runner().invoke(args=["audit"]).exit_code == 0


def test_only_an_ended_or_reset_socket_counts_as_a_client_gone():
    import socket

    left, right = socket.socketpair()
    assert peer_closed(left) is None
    right.sendall(b"GET / HTTP/1.1\r\n")
    assert peer_closed(left) is False
    right.close()
    left.recv(100)
    assert peer_closed(left) is True
    left.close()


@pytest.mark.parametrize(
    "refusal",
    [
        RuntimeError("Cannot shutdown as connection has already been released to the pool"),
        ValueError("Cannot shutdown socket as self._sock_shutdown is not set"),
        OSError(107, "Transport endpoint is not connected"),
    ],
    ids=["released to the pool", "no socket", "socket gone"],
)
def test_a_hang_up_that_comes_as_the_upstream_read_ends_is_noted_without_an_error(refusal):
    # urllib3's shutdown() refuses in these three ways when the upstream's answer has just ended: the
    # hang-up is noted all the same, and the watcher logs no failure (app/hangups.py logs what a callback raises).
    def shutdown():
        raise refusal

    relay = SimpleNamespace(
        client_left=False, audio=SimpleNamespace(response=SimpleNamespace(raw=SimpleNamespace(shutdown=shutdown)))
    )
    Relay._left(relay)
    assert relay.client_left
