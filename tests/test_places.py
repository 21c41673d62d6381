"""Places on the speech servers (app/places.py) hold across gateway processes and hosts: two gunicorn
masters of two workers each stand for two hosts on one database, in front of stand-ins that count
the streams they are sent at once."""

import contextlib
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import requests
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from app.extensions import db
from app.models import GatewayProcess, UpstreamPlace, utcnow
from tests import factories
from tests.fake_upstream import Counting, Failing
from tests.servers import gunicorn, private_redis, serve

SPEECH = "/v1/audio/speech"
HELLO = {"model": "kokoro", "input": "Hello from kokoro-pay.", "voice": "af_sky"}
COST = len(HELLO["input"])
AUDIO = b"ID3\x04audio-bytes"
# Short enough that a killed host's places come back while the test waits.
LEASE_SECONDS = 2


@contextlib.contextmanager
def two_hosts(database_uri: str, upstream_urls: list[str], **settings):
    """Two gateway hosts (gunicorn masters of two workers each) on one database; yields their URLs and masters."""
    with private_redis() as (limits, _):
        env = {
            "DATABASE_URL": database_uri,
            "UPSTREAM_URL": ",".join(f"{url}/v1" for url in upstream_urls),
            "SECRET_KEY": "places-test",
            "PROCESS_LEASE_SECONDS": str(LEASE_SECONDS),
            "RATELIMIT_STORAGE_URI": limits,
            **{name: str(value) for name, value in settings.items()},
        }
        hosts = [gunicorn("wsgi:app", env, workers=2) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            # Both start at once and stop at once: each takes a second or two.
            started = list(pool.map(lambda host: host.__enter__(), hosts))
            try:
                yield [url for url, _ in started], [master for _, master in started]
            finally:
                list(pool.map(lambda host: host.__exit__(None, None, None), hosts))


def kill_host(master: subprocess.Popen) -> None:
    """kill -9 a host: its workers and its master, with no time to clean up."""
    subprocess.run(["pkill", "-KILL", "-P", str(master.pid)], check=False)
    os.kill(master.pid, signal.SIGKILL)
    master.wait(10)


def speak(url: str, customer, **options) -> requests.Response:
    return requests.post(f"{url}{SPEECH}", json=HELLO, headers=customer.headers, timeout=30, **options)


def test_a_servers_limit_holds_for_every_gateway_process_and_host_and_the_rest_are_not_charged(make_app, database_uri):
    app = make_app()
    customer = factories.customer(app, balance=1000)
    # Each request takes about a second on its server.
    first, second = Counting(hold=1.0), Counting(hold=1.0)
    with serve(first) as a, serve(second) as b:
        with two_hosts(
            database_uri,
            [a, b],
            UPSTREAM_MAX_STREAMS=2,
            UPSTREAM_QUEUE=4,
            UPSTREAM_QUEUE_PER_ACCOUNT=4,
            UPSTREAM_QUEUE_SECONDS=10,
        ) as (hosts, _):
            barrier = threading.Barrier(12, timeout=30)

            def one(index):
                barrier.wait()
                return speak(hosts[index % 2], customer)

            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(one, range(12)))
    statuses = [answer.status_code for answer in answers]
    # Never more than two at once on either server, from four processes on two hosts; both were used to the full.
    assert (first.most, second.most) == (2, 2)
    # Four served at once, four waited and were served next; the wait was full for the rest.
    assert set(statuses) == {200, 503} and statuses.count(200) >= 8
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "server_busy"
        else:
            assert answer.content == AUDIO
    served = statuses.count(200)
    assert len(factories.speech_requests(app, customer.team_id)) == served
    assert factories.balance(app, customer.team_id) == 1000 - served * COST
    factories.assert_books_balance(app, customer.team_id)


def test_a_killed_host_gives_its_places_back_within_the_lease(make_app, database_uri):
    app = make_app()
    customer = factories.customer(app, balance=1000)
    gate = threading.Event()
    only = Counting(gate=gate)
    with serve(only) as upstream_url:
        with two_hosts(database_uri, [upstream_url], UPSTREAM_MAX_STREAMS=1, UPSTREAM_QUEUE=0) as (hosts, masters):
            held = speak(hosts[0], customer, stream=True)
            assert held.status_code == 200 and only.open == 1
            # The other host sees the place taken: nothing is charged for its refusal.
            assert speak(hosts[1], customer).status_code == 503
            kill_host(masters[0])
            killed = time.monotonic()
            refused = speak(hosts[1], customer)
            assert refused.status_code == 503
            # Asked again every 0.1 s until served.
            while (served := speak(hosts[1], customer, stream=True)).status_code == 503:
                assert time.monotonic() - killed < LEASE_SECONDS * 5, "the killed host's place did not come back"
                time.sleep(0.1)
            came_back = time.monotonic() - killed
            gate.set()
            assert served.content == AUDIO
    # Within the lease (renewed every third of it), plus one look.
    assert came_back < LEASE_SECONDS + 1.5
    # Two charged: the stream on the killed host (left for settle) and the one served after it.
    assert len(factories.speech_requests(app, customer.team_id)) == 2
    assert factories.balance(app, customer.team_id) == 1000 - 2 * COST
    factories.assert_books_balance(app, customer.team_id)


def test_a_server_that_fails_is_taken_out_for_every_gateway(make_app, database_uri):
    app = make_app()
    customer = factories.customer(app, balance=1000)
    sickly, healthy = Failing(), Counting()
    with serve(sickly) as s, serve(healthy) as h:
        with two_hosts(database_uri, [s, h], UPSTREAM_RETRY_SECONDS=60) as (hosts, _):
            # The first request meets the failure and is served by the other server.
            assert speak(hosts[0], customer).content == AUDIO
            assert sickly.attempts == 1
            # Every process of both hosts knows: each says so, and sends nothing to it.
            for _ in range(4):
                for host in hosts:
                    ready = requests.get(f"{host}/readyz", timeout=10).json()
                    assert [server["taken_out"] for server in ready["upstream"]["servers"]] == [True, False]
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda index: speak(hosts[index % 2], customer), range(8)))
            assert [answer.content for answer in answers] == [AUDIO] * 8
            assert sickly.attempts == 1
    assert len(healthy.received) == 9
    assert factories.balance(app, customer.team_id) == 1000 - 9 * COST
    factories.assert_books_balance(app, customer.team_id)


def test_with_redis_down_the_stream_cap_the_servers_limit_and_the_money_rules_hold_on_two_hosts(
    make_app, database_uri, own_redis
):
    """The rule of "Redis down" (README): the abuse limits fail open; what the database keeps holds."""
    redis_url, stop_redis = own_redis
    app = make_app()
    customer, other = factories.customer(app, balance=1000), factories.customer(app, balance=1000)
    gate = threading.Event()
    only = Counting(gate=gate)
    with serve(only) as upstream_url:
        with two_hosts(
            database_uri,
            [upstream_url],
            RATELIMIT_STORAGE_URI=redis_url,
            MAX_STREAMS_PER_ACCOUNT=1,
            UPSTREAM_MAX_STREAMS=1,
            UPSTREAM_QUEUE=0,
        ) as (hosts, _):
            stop_redis()
            held = speak(hosts[0], customer, stream=True)
            assert held.status_code == 200
            # The account's stream cap, across hosts.
            capped = speak(hosts[1], customer)
            assert capped.status_code == 429 and capped.json()["error"]["code"] == "too_many_streams"
            # The server's limit, across hosts: refused before any charge.
            busy = speak(hosts[1], other)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
            gate.set()
            assert held.content == AUDIO
            # Free again, on the other host.
            assert speak(hosts[1], other).content == AUDIO
    assert only.most == 1
    assert factories.balance(app, customer.team_id) == 1000 - COST
    assert factories.balance(app, other.team_id) == 1000 - COST
    factories.assert_books_balance(app, customer.team_id)
    factories.assert_books_balance(app, other.team_id)


# Upkeep: places that nobody holds any more are not counted for long.


def test_a_place_that_could_not_be_given_back_is_deleted_by_the_next_renewal(app, monkeypatch):
    upstreams = app.extensions["upstream"].upstreams
    kept = upstreams.reserve()
    lost = upstreams.reserve()
    assert [state["streams"] for state in upstreams.states()] == [2]

    def no_database():
        raise OperationalError("DELETE", {}, Exception("database is down"))

    with monkeypatch.context() as patched:
        patched.setattr(upstreams, "_engine", no_database)
        lost.release()
    # The database was away when it was given back: it still counts, until the lease's next renewal.
    assert [state["streams"] for state in upstreams.states()] == [2]
    app.extensions["lease"].renew()
    upstreams.sweep()
    assert [state["streams"] for state in upstreams.states()] == [1]
    kept.release()
    assert [state["streams"] for state in upstreams.states()] == [0]


def test_places_of_a_process_whose_lease_ran_out_stop_counting_and_are_deleted(app):
    upstreams = app.extensions["upstream"].upstreams
    upstreams.reserve()
    process_id = app.extensions["lease"].process_id()
    with app.app_context():
        ran_out = utcnow() - timedelta(seconds=1)
        db.session.execute(update(GatewayProcess).where(GatewayProcess.id == process_id).values(lease_until=ran_out))
        db.session.commit()
    assert upstreams.states()[0]["streams"] == 0
    upstreams.sweep()
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(UpstreamPlace)) == 0


def test_a_place_taken_while_a_renewal_sweeps_is_kept(app, monkeypatch):
    """A renewal's sweep that starts just as a place is taken must not delete that place: the
    stream would then run uncounted, and the server take one more than its limit."""
    upstreams = app.extensions["upstream"].upstreams
    upstreams.reserve().release()  # the servers' rows are written
    sweep_started, taken = threading.Event(), threading.Event()
    begin = upstreams._begin

    def paused_begin():
        # The sweep's transaction starts only once the place below is taken.
        if threading.current_thread().name == "sweep":
            sweep_started.set()
            assert taken.wait(5)
        return begin()

    monkeypatch.setattr(upstreams, "_begin", paused_begin)
    take_a_place_while_it_sweeps(upstreams, sweep_started, taken)


def test_a_place_taken_without_a_limit_while_a_sweep_reads_what_is_held_is_kept(app, monkeypatch):
    """With no server limit places are taken without the lock: one taken after a sweep has read
    which places this process holds, but before it deletes the others, stays counted."""
    upstreams = app.extensions["upstream"].upstreams
    upstreams.reserve().release()  # the servers' rows are written
    read, taken = threading.Event(), threading.Event()

    class Held(set):
        def __iter__(self):
            now_held = list(super().__iter__())
            if threading.current_thread().name == "sweep":
                read.set()
                # On SQLite the sweep holds the one write lock: the place below waits for it instead.
                taken.wait(1)
            return iter(now_held)

    monkeypatch.setattr(upstreams, "_held", Held())
    take_a_place_while_it_sweeps(upstreams, read, taken)


def take_a_place_while_it_sweeps(upstreams, paused: threading.Event, taken: threading.Event) -> None:
    """Start a sweep (in a thread named "sweep"); once it has `paused`, take a place and set `taken` so it
    goes on. The place stays counted after the sweep, and is gone once given back."""
    sweeper = threading.Thread(target=upstreams.sweep, name="sweep")
    sweeper.start()
    assert paused.wait(5)
    slot = upstreams.reserve()
    taken.set()
    sweeper.join(5)
    assert [state["streams"] for state in upstreams.states()] == [1]
    slot.release()
    assert [state["streams"] for state in upstreams.states()] == [0]
