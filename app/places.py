"""The places on the speech servers, shared by every gateway process and host through the database.

Each speech request holds a place on one server from before it is charged until its stream is
closed (`Upstreams.reserve`): the server with the fewest places held, among those not taken out
for failing. With UPSTREAM_MAX_STREAMS set, a full server takes no more; when all are full a
request waits, at most UPSTREAM_QUEUE of them for at most UPSTREAM_QUEUE_SECONDS, and is then
refused (`Busy`) with nothing charged. One account holds at most UPSTREAM_QUEUE_PER_ACCOUNT places
in the wait (a quarter of it by default); its next request is refused at once
(`AccountQueueFull`), so one client cannot crowd out the others. A server that fails before
sending audio is taken out for UPSTREAM_RETRY_SECONDS, doubling while it keeps failing; once that
time is up the next request tries it again, which brings it back.

All of it is counted in the database every gateway already shares, so the limits hold however
many processes and hosts serve (every gateway must list the same servers with the same limit):

- `upstream_places` holds one row per place: on a server, or in the wait (no server). A place
  belongs to its gateway process (app/liveness.py) and counts only while that process's lease is
  alive, so a gateway that is killed gives its places back within PROCESS_LEASE_SECONDS.
- `upstream_servers` holds each server's failures and the time it is taken out until, on the
  wall clock (hosts are expected to keep their clocks within a second or so of each other).
- A place is taken in one short transaction that locks the first server's row, the lock every
  gateway takes first, so two gateways never both take the last place (with no limit set there
  is no last place, and no lock); on PostgreSQL it is
  committed without waiting for the write-ahead log (places hold no money: after a database
  crash, each process's next lease renewal deletes any place it does not hold, `sweep`). It is
  given back with one delete, committed on its own once the stream is over.
- A request waiting for a place is woken at once by a place given back in its own process, and
  looks again every POLL_SECONDS for places given back elsewhere.
"""

import contextlib
import logging
import math
import threading
import time
import uuid
from datetime import datetime
from typing import Callable, NamedTuple

from sqlalchemy import and_, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from app.extensions import db
from app.models import GatewayProcess, UpstreamPlace, UpstreamServer, utcnow

log = logging.getLogger(__name__)

# The longest a failing server is taken out for, however often it failed.
MAX_RETRY_SECONDS = 60.0
# How often a waiting request looks for a place given back by another process.
POLL_SECONDS = 0.1
# The wall clock a failed server's time out is kept by; tests move it by hand.
clock = time.time

_servers = UpstreamServer.__table__
_places = UpstreamPlace.__table__
_processes = GatewayProcess.__table__


class Busy(Exception):
    """Every speech server is full, and no place freed up in time."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class AccountQueueFull(Busy):
    """The account already has its share of the requests waiting for a server."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(retry_after)
        self.limit = limit


class Server:
    """One Kokoro server: its address and how many streams it takes at once (0: no limit)."""

    def __init__(self, base_url: str, limit: int):
        self.base_url = base_url
        self.limit = limit

    def has_room(self, streams: int) -> bool:
        return not self.limit or streams < self.limit


class Slot:
    """A place on one server, held from before the charge until the stream is closed."""

    def __init__(self, upstreams: "Upstreams", server: Server, place_id: str, failing: bool):
        self.upstreams = upstreams
        self.server = server
        self.place_id = place_id
        # The server had failed before this place was taken: serving it brings the server back.
        self.failing = failing
        self.waited = 0.0
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.upstreams.release(self)


@contextlib.contextmanager
def _transaction(engine):
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
        yield connection


# The places whose process's lease has not run out at `now`.
_ALIVE = _places.c.process_id.in_(select(_processes.c.id).where(_processes.c.lease_until >= bindparam("now")))
# Each listed server's failures, time out and places held now: one statement.
_SERVERS_NOW = (
    select(_servers.c.url, _servers.c.failures, _servers.c.out_until, func.count(_places.c.id))
    .select_from(_servers.outerjoin(_places, and_(_places.c.server_url == _servers.c.url, _ALIVE)))
    .where(_servers.c.url.in_(bindparam("urls", expanding=True)))
    .group_by(_servers.c.url, _servers.c.failures, _servers.c.out_until)
)
_WAITING = select(func.count()).where(_places.c.server_url.is_(None), _ALIVE)
_WAITING_FOR = _WAITING.where(_places.c.team_id == bindparam("team_id"))
_LOCK = select(_servers.c.url).where(_servers.c.url == bindparam("lock_url")).with_for_update()
_TAKE = insert(_places)
_GIVE_BACK = delete(_places).where(_places.c.id == bindparam("place_id"))


class ServerNow(NamedTuple):
    """A server as the database has it now."""

    failures: int
    out_until: float
    streams: int


class Upstreams:
    """The servers, least busy first; see the module's docstring."""

    def __init__(
        self,
        app,
        lease,
        base_urls: list[str],
        limit: int,
        queue: int,
        queue_seconds: float,
        retry_seconds: float,
        queue_per_account: int = 0,
    ):
        self.app = app
        self.lease = lease
        self.servers = [Server(url, limit) for url in base_urls]
        self.queue = queue
        self.queue_seconds = queue_seconds
        self.retry_seconds = retry_seconds
        # 0: a quarter of the wait, at least one place.
        self.queue_per_account = queue_per_account or max(1, queue // 4)
        self._urls = [server.base_url for server in self.servers]
        # Every gateway locks the same row first: the server that sorts first.
        self._lock_url = min(self._urls) if self._urls else None
        # Without a limit every server always has room: a place on one is taken without the lock,
        # which only keeps two gateways from both taking the last place (or the wait's last).
        self._limited = bool(limit)
        # The places this process holds (on a server or in the wait); `sweep` deletes any other row of it.
        self._held: set[str] = set()
        self._registered = False
        self._changed = threading.Condition()
        lease.on_renewal(self.sweep)

    # Taking and giving back places

    def reserve(
        self,
        exclude: tuple[Server, ...] = (),
        wait: bool = True,
        account: int | None = None,
        before_waiting: Callable[[], None] | None = None,
    ) -> Slot:
        """A place on the least busy server not in `exclude`; Busy when none frees up in time.

        AccountQueueFull, at once, when `account` already has its share of the wait.
        `before_waiting` runs once, when every server is full and before a place in the wait is
        taken: the caller's checks that only matter to a request about to wait (an exception it
        raises leaves nothing taken).
        """
        started = time.monotonic()
        retry_after = max(1, math.ceil(self.queue_seconds))
        waiting = None
        try:
            # A first try that does not wait, so `before_waiting` runs only for a request that would.
            slot, _ = self._take(exclude, account, None, False, retry_after)
            if slot is None:
                if not wait:
                    raise Busy(retry_after)
                if before_waiting is not None:
                    before_waiting()
            while slot is None:
                slot, waiting = self._take(exclude, account, waiting, wait, retry_after)
                if slot is not None:
                    break
                left = started + self.queue_seconds - time.monotonic()
                if waiting is None or left <= 0:
                    raise Busy(retry_after)
                with self._changed:
                    self._changed.wait(min(POLL_SECONDS, left))
            slot.waited = time.monotonic() - started
            return slot
        except BaseException:
            if waiting is not None:
                self._give_back(waiting)
            raise

    def _take(self, exclude, account, waiting: str | None, may_wait: bool, retry_after: int):
        """One try, in one transaction: a place on a server (giving back `waiting`, the place in the
        wait, if any), else a place in the wait when `may_wait` and there is none yet.
        Returns (the slot or None, the place in the wait or None)."""
        self._register()
        place_id = uuid.uuid4().hex
        process_id = self.lease.process_id()
        # Held before the row is written, so that a sweep running meanwhile leaves it alone.
        self._held.add(place_id)
        try:
            with self._begin() as connection:
                now = utcnow()
                if self._limited or may_wait:
                    self._lock(connection)
                servers = self._servers_now(connection, now)
                server = self._choose(exclude, servers)
                row = {"id": place_id, "process_id": process_id, "team_id": account, "taken_at": now}
                if server is not None:
                    connection.execute(_TAKE, {"server_url": server.base_url, **row})
                    if waiting is not None:
                        connection.execute(_GIVE_BACK, {"place_id": waiting})
                    slot = Slot(self, server, place_id, servers[server.base_url].failures > 0)
                else:
                    slot = None
                    if waiting is None and may_wait:
                        if connection.scalar(_WAITING, {"now": now}) >= self.queue:
                            raise Busy(retry_after)
                        if account is not None:
                            mine = connection.scalar(_WAITING_FOR, {"now": now, "team_id": account})
                            if mine >= self.queue_per_account:
                                raise AccountQueueFull(self.queue_per_account, retry_after)
                        connection.execute(_TAKE, {"server_url": None, **row})
                        waiting = place_id
                    else:
                        self._held.discard(place_id)
        except BaseException:
            self._held.discard(place_id)
            raise
        if slot is not None and waiting is not None:
            self._held.discard(waiting)
            waiting = None
        return slot, waiting

    def _choose(self, exclude, servers: dict[str, ServerNow]) -> Server | None:
        """The least busy server with room: one in service if any is, else one taken out."""
        now = clock()
        candidates = [server for server in self.servers if server not in exclude]
        in_service = [server for server in candidates if now >= servers[server.base_url].out_until]
        # While a server in service is only full, wait for it rather than try one that failed.
        pool = in_service or candidates
        with_room = [server for server in pool if server.has_room(servers[server.base_url].streams)]
        return min(with_room, key=lambda server: servers[server.base_url].streams, default=None)

    def release(self, slot: Slot) -> None:
        self._give_back(slot.place_id)

    def _give_back(self, place_id: str) -> None:
        # Not held any more whatever happens below: if the delete fails, the next sweep deletes the row.
        self._held.discard(place_id)
        try:
            # One statement, committed on its own (this waits for the write-ahead log on PostgreSQL, but
            # after the stream, when no one waits for it).
            with self._engine().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(_GIVE_BACK, {"place_id": place_id})
        except SQLAlchemyError:
            log.exception("could not give back a place on a speech server; the next lease renewal will")
        with self._changed:
            self._changed.notify_all()

    # Health

    def failed(self, server: Server) -> None:
        """Take `server` out for a while, longer each time it fails again."""
        try:
            with self._begin() as connection:
                failures = connection.scalar(
                    update(_servers)
                    .where(_servers.c.url == server.base_url)
                    .values(failures=_servers.c.failures + 1)
                    .returning(_servers.c.failures)
                )
                if failures is not None:
                    pause = min(self.retry_seconds * 2 ** (failures - 1), MAX_RETRY_SECONDS)
                    connection.execute(
                        update(_servers).where(_servers.c.url == server.base_url).values(out_until=clock() + pause)
                    )
        except SQLAlchemyError:
            log.exception("could not record a speech server's failure")
        # Requests waiting for a server may now take one that was not their first choice.
        with self._changed:
            self._changed.notify_all()

    def worked(self, slot: Slot) -> None:
        """`slot`'s server gave audio: if it had failed, it is back in service."""
        if not slot.failing:
            return
        try:
            with self._begin() as connection:
                connection.execute(
                    update(_servers).where(_servers.c.url == slot.server.base_url).values(failures=0, out_until=0.0)
                )
        except SQLAlchemyError:
            log.exception("could not bring a speech server back into service")

    # What is known of the servers

    def states(self) -> list[dict]:
        """Each server's streams in flight (from every gateway) and whether it is taken out now,
        in the order configured; None for both while the database cannot say."""
        try:
            with self._begin() as connection:
                servers = self._servers_now(connection, utcnow())
        except SQLAlchemyError:
            log.exception("could not read the speech servers' places")
            return [{"streams": None, "taken_out": None} for _ in self.servers]
        now = clock()
        return [
            {"streams": servers[server.base_url].streams, "taken_out": now < servers[server.base_url].out_until}
            for server in self.servers
        ]

    def in_order(self) -> list[Server]:
        """Every server, those in service first: the order to ask for a document."""
        try:
            with self._begin() as connection:
                servers = self._servers_now(connection, utcnow())
        except SQLAlchemyError:
            return list(self.servers)
        now = clock()
        return sorted(self.servers, key=lambda server: now < servers[server.base_url].out_until)

    @property
    def waiting(self) -> int:
        """Requests waiting for a place now, from every gateway."""
        with self._begin() as connection:
            return connection.scalar(_WAITING, {"now": utcnow()})

    # Upkeep

    def sweep(self) -> None:
        """Delete this process's places it does not hold (a give-back that failed, a commit a
        database crash lost) and every place of a process whose lease has run out."""
        process_id = self.lease.process_id()
        with self._begin() as connection:
            # Under the lock places are taken under with a limit: a place taken before it is in `_held`
            # by now, and none is taken until this commits. Without a limit places are taken without
            # the lock, so only places taken before `before` go: one that is not in `held` was
            # added to `_held` after it was read, and dated later (`_take` reads the clock after).
            self._lock(connection)
            before = utcnow()
            held = list(self._held)
            connection.execute(
                delete(_places).where(
                    _places.c.process_id == process_id, _places.c.id.not_in(held), _places.c.taken_at < before
                )
            )
            connection.execute(
                delete(_places).where(
                    _places.c.process_id.in_(select(_processes.c.id).where(_processes.c.lease_until < utcnow()))
                )
            )

    def _register(self) -> None:
        """Write a row for each server not yet known to the database (once per process)."""
        if self._registered:
            return
        for url in self._urls:
            try:
                with self._begin() as connection:
                    known = connection.scalar(select(func.count()).where(_servers.c.url == url))
                    if not known:
                        connection.execute(insert(_servers).values(url=url, failures=0, out_until=0.0))
            except IntegrityError:
                pass  # another gateway wrote it first
        self._registered = True

    def _engine(self):
        with self.app.app_context():
            return db.engine

    def _begin(self):
        """A transaction on a connection of its own, outside any request's; not waiting for the
        write-ahead log on PostgreSQL (see the module's docstring)."""
        return _transaction(self._engine())

    def _lock(self, connection: Connection) -> None:
        """The lock every place is taken under: the first server's row (on SQLite the database's write
        lock, which the app's engine takes for a locking read: app/__init__.py)."""
        connection.execute(_LOCK, {"lock_url": self._lock_url})

    def _servers_now(self, connection: Connection, now: datetime) -> dict[str, ServerNow]:
        """Each server's state; a server whose row is missing (deleted by hand) is in service and
        idle, and its row is written again before the next place is taken."""
        rows = connection.execute(_SERVERS_NOW, {"now": now, "urls": self._urls})
        servers = {url: ServerNow(failures, out_until, streams) for url, failures, out_until, streams in rows}
        if len(servers) < len(self._urls):
            self._registered = False
        return {url: servers.get(url, ServerNow(0, 0.0, 0)) for url in self._urls}
