"""trial claims and mail stamps: one free trial per mailbox, one mail of a kind per mailbox at a time, and a version of each account's email

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

"""
from datetime import datetime, timezone

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    trial_claims = op.create_table('trial_claims',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox', sa.String(length=64), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_trial_claims')),
    sa.UniqueConstraint('mailbox', name=op.f('uq_trial_claims_mailbox'))
    )
    op.create_table('mail_stamps',
    sa.Column('mailbox', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=30), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('mailbox', 'kind', name=op.f('pk_mail_stamps'))
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email_version', sa.Integer(), server_default='0', nullable=False))

    _claim_the_trials_already_granted(trial_claims)


def _claim_the_trials_already_granted(trial_claims):
    """An account that had its trial before this revision counts as a claim for its current mailbox.

    The hash is the app's own (keyed with SECRET_KEY, computed in Python, so the same on SQLite
    and PostgreSQL). Accounts deleted before it have no address left to claim.
    """
    from app.accounts import mailbox_digest

    emails = op.get_bind().execute(sa.text(
        "SELECT DISTINCT users.email FROM users JOIN ledger_entries ON ledger_entries.user_id = users.id "
        "WHERE ledger_entries.kind = 'trial' AND ledger_entries.reference LIKE 'trial:%' "
        "AND users.deleted_at IS NULL"
    )).scalars()
    mailboxes = sorted({mailbox_digest(email) for email in emails})
    now = datetime.now(timezone.utc)
    if mailboxes:
        op.bulk_insert(trial_claims, [{'mailbox': mailbox, 'claimed_at': now} for mailbox in mailboxes])


def downgrade():
    # ALTER TABLE … DROP COLUMN (SQLite 3.35 and later): a copy of the table, batch mode's way,
    # cannot replace `users` while other tables' foreign keys point at it.
    with op.batch_alter_table('users', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('email_version')

    op.drop_table('mail_stamps')
    op.drop_table('trial_claims')
