"""automatic top-ups: a team's saved card, its automatic top-up settings, and payments that are not Checkout's

Adds to `teams` the saved card (`card_payment_method`, `card_brand`, `card_last4`, `card_expires`,
`card_saved_at`) and
automatic top-up (`auto_topup_below`, `auto_topup_pack`, `auto_topup_monthly_limit`, `auto_topup_by_id`,
`auto_topup_pending`, `auto_topup_paused`, `auto_topup_paused_at`, `auto_topup_capped_until`); to
`payments` their `kind` (existing rows: checkout), the automatic top-up's `idempotency_key`, the
`invoice_id` and `draft_invoice_id`, `failure`, and the worker's `attempts`, `claimed_until` and `next_attempt_at`.
`checkout_session_id` may be empty now (an automatic top-up has none). A partial unique index keeps
at most one automatic top-up in flight per team. Downgrade refuses while an automatic top-up or a
saved card exists, which 0012's schema cannot hold.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

IN_FLIGHT = "kind = 'automatic' AND status IN ('queued', 'processing')"


def upgrade():
    # Recreated on SQLite (a foreign key is added): it keeps AUTOINCREMENT, so a team's id is never reused.
    with op.batch_alter_table('teams', schema=None, table_kwargs={'sqlite_autoincrement': True}) as batch_op:
        batch_op.add_column(sa.Column('card_payment_method', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('card_brand', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('card_last4', sa.String(length=4), nullable=True))
        batch_op.add_column(sa.Column('card_expires', sa.String(length=7), nullable=True))
        batch_op.add_column(sa.Column('card_saved_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('auto_topup_below', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('auto_topup_pack', sa.String(length=50), nullable=True))
        batch_op.add_column(sa.Column('auto_topup_monthly_limit', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('auto_topup_by_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('auto_topup_pending', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('auto_topup_paused', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('auto_topup_paused_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('auto_topup_capped_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_teams_auto_topup_by_id_users'), 'users', ['auto_topup_by_id'], ['id'])

    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='checkout', nullable=False))
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('invoice_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('draft_invoice_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('failure', sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('claimed_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column('checkout_session_id', existing_type=sa.String(length=255), nullable=True)
        batch_op.create_unique_constraint(batch_op.f('uq_payments_idempotency_key'), ['idempotency_key'])
        batch_op.create_index(
            'ix_payments_one_automatic_in_flight', ['team_id'], unique=True,
            postgresql_where=sa.text(IN_FLIGHT), sqlite_where=sa.text(IN_FLIGHT),
        )


def downgrade():
    bind = op.get_bind()
    held = bind.execute(sa.text(
        "SELECT (SELECT COUNT(*) FROM payments WHERE kind <> 'checkout')"
        " + (SELECT COUNT(*) FROM teams WHERE card_payment_method IS NOT NULL OR auto_topup_below IS NOT NULL)"
    )).scalar()
    if held:
        raise RuntimeError(
            f"{held} automatic top-ups, saved cards or automatic top-up settings exist, which the schema before 0013"
            " cannot hold"
        )
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.drop_index('ix_payments_one_automatic_in_flight')
        batch_op.drop_constraint(batch_op.f('uq_payments_idempotency_key'), type_='unique')
        batch_op.alter_column('checkout_session_id', existing_type=sa.String(length=255), nullable=False)
        for column in ('next_attempt_at', 'claimed_until', 'attempts', 'failure', 'draft_invoice_id', 'invoice_id',
                       'idempotency_key', 'kind'):
            batch_op.drop_column(column)

    # Recreated on SQLite (a foreign key is added): it keeps AUTOINCREMENT, so a team's id is never reused.
    with op.batch_alter_table('teams', schema=None, table_kwargs={'sqlite_autoincrement': True}) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_teams_auto_topup_by_id_users'), type_='foreignkey')
        for column in ('auto_topup_capped_until', 'auto_topup_paused_at', 'auto_topup_paused', 'auto_topup_pending',
                       'auto_topup_by_id', 'auto_topup_monthly_limit', 'auto_topup_pack', 'auto_topup_below',
                       'card_saved_at', 'card_expires', 'card_last4', 'card_brand', 'card_payment_method'):
            batch_op.drop_column(column)
