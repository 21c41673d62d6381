"""Which gateway processes are alive: a lease per process, renewed from a thread of its own.

Each process that serves speech registers a row (`GatewayProcess`) with its first speech
request and renews its lease every third of PROCESS_LEASE_SECONDS from a daemon thread,
whatever its request threads are doing: a stream blocked writing to a client that stopped
reading still belongs to a live process. A speech request names the process serving it, and
`flask speech settle` refunds a request only once that process's lease has run out (it
crashed, was killed, or lost its database for longer than the lease), never because a stream
is slow or its reader paused (app/metering.py `stale_charges`).

The renewals write with a connection of their own, outside any request's transaction.
A settlement a request could not write (its database was away for a moment) is handed to the
lease and tried again with each renewal, so a live process never leaves a request charged.
"""

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db
from app.models import GatewayProcess, utcnow

log = logging.getLogger(__name__)

_processes = GatewayProcess.__table__


class Lease:
    """This process's lease, registered on first use (again after a fork) and renewed until stopped."""

    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds
        self._id = None
        self._pid = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = None
        self._pending: list[Callable[[], object]] = []
        self._upkeep: list[Callable[[], object]] = []

    def process_id(self) -> str:
        """This process's id, its lease registered and its renewer running; for a speech request to name."""
        if self._pid == os.getpid():
            return self._id
        with self._lock:
            if self._pid != os.getpid():
                process_id = uuid.uuid4().hex
                self._write(insert(_processes), id=process_id, host=socket.gethostname()[:255], pid=os.getpid())
                self._id, self._pid = process_id, os.getpid()
                self._thread = threading.Thread(target=self._renew_until_stopped, name="gateway-lease", daemon=True)
                self._thread.start()
        return self._id

    def renew(self) -> None:
        """Push the lease on by PROCESS_LEASE_SECONDS from now; re-registers a row that an operator removed."""
        renewed = self._write(update(_processes).where(_processes.c.id == self._id))
        if not renewed:
            self._write(insert(_processes), id=self._id, host=socket.gethostname()[:255], pid=os.getpid())

    def on_renewal(self, upkeep: Callable[[], object]) -> None:
        """Run `upkeep` after each renewal, in the lease's thread (app/places.py's sweep)."""
        self._upkeep.append(upkeep)

    def retry_later(self, settle: Callable[[], object]) -> None:
        """Keep a settlement that failed to write; `settle_pending` (each renewal) tries it again."""
        with self._lock:
            self._pending.append(settle)

    def settle_pending(self) -> int:
        """Try the kept settlements again, each committed on its own; returns how many are still waiting."""
        with self._lock:
            pending, self._pending = self._pending, []
        failed = []
        for settle in pending:
            with self.app.app_context():
                try:
                    settle()
                    db.session.commit()
                except SQLAlchemyError:
                    db.session.rollback()
                    failed.append(settle)
                    log.exception("a speech request's settlement failed again; retried at the next renewal")
        with self._lock:
            self._pending[:0] = failed
            return len(self._pending)

    def stop(self, wait: float = 10.0) -> None:
        """End the renewals, waiting up to `wait` seconds for a renewal under way (tests; a process that ends
        takes its thread along and its lease runs out)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(wait)

    def _write(self, statement, **values) -> int:
        now = utcnow()
        values = {**values, "lease_until": now + timedelta(seconds=self.seconds)}
        if statement.is_insert:
            values["started_at"] = now
        with self.app.app_context(), db.engine.begin() as connection:
            return connection.execute(statement.values(**values)).rowcount

    def _renew_until_stopped(self) -> None:
        while not self._stopped.wait(self.seconds / 3):
            try:
                self.renew()
            except SQLAlchemyError:
                # The lease runs out if this goes on: settle may then refund this process's requests,
                # and each stream stops at its next progress record (app/speech.py).
                log.exception("could not renew this gateway process's lease (%s)", self._id)
            self.settle_pending()
            for upkeep in self._upkeep:
                try:
                    upkeep()
                except SQLAlchemyError:
                    log.exception("a lease renewal's upkeep failed; it runs again at the next renewal")


def too_short(stale: float, lease: float) -> str:
    """Why a settle threshold below the lease is refused: settle could not tell a live process from a dead one."""
    return (
        f"{stale:g} s is shorter than a gateway process's lease (PROCESS_LEASE_SECONDS, {lease:g} s), "
        f"the time it takes to tell that the process serving a request is gone; use at least {lease:g} s."
    )


def alive_processes(process_ids) -> set[str]:
    """Those of `process_ids` whose lease has not run out."""
    ids = {process_id for process_id in process_ids if process_id}
    if not ids:
        return set()
    alive = select(_processes.c.id).where(_processes.c.id.in_(ids), _processes.c.lease_until >= utcnow())
    return set(db.session.scalars(alive))
