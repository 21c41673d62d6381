"""Proving a lock: on PostgreSQL one transaction takes its locks and stays open while a second one starts;
the second must wait for them, seen in pg_stat_activity, not by sleeping. On both databases, whether another
connection could write the row now, asked without waiting."""

import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.extensions import db
from tests.servers import wait_for


def waiting_for_a_lock() -> bool:
    """Whether a session of this database waits for a lock another one holds (PostgreSQL)."""
    with db.engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        )


def recording(failures: list, step: Callable[[], None]) -> Callable[[], None]:
    """`step`, with its assertion failures kept in `failures` (a thread's own are lost otherwise)."""

    def run():
        try:
            step()
        except AssertionError as failure:
            failures.append(str(failure))

    return run


def second_waits_for_first(
    context: Callable[[], AbstractContextManager], first: Callable[[], None], second: Callable[[], None], what: str
) -> list[str]:
    """Run `first` in a transaction of its own (inside `context()`) and keep it open while `second`
    starts in another thread; `second` must wait for the locks `first` holds. The failures seen."""
    held, finished = threading.Event(), threading.Event()

    def hold():
        with context():
            first()
            held.set()
            wait_for(lambda: finished.is_set() or waiting_for_a_lock(), what=f"{what} to wait (or to go ahead)")
            assert not finished.is_set(), f"{what} went ahead while the locks were held"
            db.session.commit()
            db.session.remove()

    def then():
        held.wait(10)
        second()
        finished.set()

    failures = []
    threads = [threading.Thread(target=recording(failures, step)) for step in (hold, then)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if not finished.is_set():
        failures.append(f"{what} never finished")
    return failures


def another_writer_could_go_ahead(table: str, row_id: int | str, column: str = "id") -> bool:
    """Whether a transaction of another connection could change that row of `table` now, asked without waiting:
    a row lock on PostgreSQL; on SQLite, which locks the whole database, the right to write at all."""
    if db.engine.dialect.name == "sqlite":
        other = sqlite3.connect(db.engine.url.database, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            other.close()
    with db.engine.connect() as other:
        try:
            other.execute(text(f"SELECT 1 FROM {table} WHERE {column} = :row FOR UPDATE NOWAIT"), {"row": row_id})
            return True
        except OperationalError:
            return False
