"""A read that locks what it reads (SELECT … FOR UPDATE) holds it until its transaction ends, on both databases.

PostgreSQL locks the rows. SQLite has no row locks, SQLAlchemy leaves the clause out there, and its driver
begins a transaction only at the first write: without app/__init__.py's hook the read would hold nothing, and
a debit could commit between it and the write it decides (the owner count two owners demoting each other both
read, a key's spending its controls recount, the balance a refund takes back). There it takes the database's
write lock first. Each locking read of the app, probed right after it: another connection cannot write the
row without waiting until the transaction ends.
"""

import pytest
from sqlalchemy import select

from app import billing, keys, teams
from app.extensions import db
from app.models import ApiKey, Team
from tests import factories
from tests.locks import another_writer_could_go_ahead

READS = {
    "a select of a team for update": lambda customer: db.session.execute(
        select(Team.id).where(Team.id == customer.team_id).with_for_update()
    ),
    "a refresh of a team for update": lambda customer: db.session.refresh(
        db.session.get(Team, customer.team_id), with_for_update=True
    ),
    "a change to a team's members (teams._lock)": lambda customer: teams._lock(customer.team_id),
    "a change to a key's controls (keys.lock)": lambda customer: keys.lock(db.session.get(ApiKey, customer.key_id)),
    "a refund taken back (billing.take_back, nothing due)": lambda customer: billing.take_back(
        customer.team_id, 0, kind="refund", reference="refund:test", note="test", payment_id=0
    ),
}


@pytest.mark.parametrize("read", READS)
def test_a_read_for_update_holds_the_row_until_its_transaction_ends(app, read):
    customer = factories.customer(app, balance=100)
    table, row = ("api_keys", customer.key_id) if "key" in read else ("teams", customer.team_id)
    with app.app_context():
        assert another_writer_could_go_ahead(table, row)
        READS[read](customer)
        assert not another_writer_could_go_ahead(table, row)
        db.session.rollback()
        assert another_writer_could_go_ahead(table, row)


def test_a_plain_read_holds_nothing(app):
    # The hook takes the write lock for a locking read only: pages and balances read without waiting for it.
    customer = factories.customer(app, balance=100)
    with app.app_context():
        db.session.get(Team, customer.team_id)
        db.session.execute(select(Team.balance).where(Team.id == customer.team_id))
        assert another_writer_could_go_ahead("teams", customer.team_id)
        db.session.rollback()


def test_the_lock_upstream_places_are_taken_under_holds_until_its_transaction_ends(app):
    """app/places.py takes each place on a connection of its own, under a lock on the first server's row."""
    upstreams = app.extensions["upstream"].upstreams
    upstreams.reserve().release()  # the servers' rows are written
    (url,) = (server.base_url for server in upstreams.servers)
    with app.app_context():
        assert another_writer_could_go_ahead("upstream_servers", url, column="url")
        with upstreams._begin() as connection:
            upstreams._lock(connection)
            assert not another_writer_could_go_ahead("upstream_servers", url, column="url")
        assert another_writer_could_go_ahead("upstream_servers", url, column="url")
