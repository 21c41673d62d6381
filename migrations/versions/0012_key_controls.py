"""key controls: spending limits, expiry, allowed addresses, voices and models, rolling, management keys

Adds to `api_keys`: `kind` (speech or management), `spend_limit` and `spend_period`, `spent` and
`spent_window` (what the key spent in its current period, kept with every debit and refund),
`expires_at`, `allowed_ips`, `allowed_voices`, `allowed_models`, and the previous secret of a rolled
key (`previous_digest`, `previous_prefix`, `previous_expires_at`, `rolled_at`); and an index on a
key's speech requests by time. Existing keys have no limit: their `spent` is their lifetime use,
taken from their requests. Downgrade refuses while a management key, a limit, an expiry, an
allowed list or a rolled secret still working exists, which 0011's schema cannot hold.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='speech', nullable=False))
        batch_op.add_column(sa.Column('spend_limit', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('spend_period', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('spent', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('spent_window', sa.String(length=24), server_default='lifetime', nullable=False))
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('allowed_ips', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('allowed_voices', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('allowed_models', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('previous_digest', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('previous_prefix', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('previous_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('rolled_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_api_keys_previous_digest'), ['previous_digest'])

    with op.batch_alter_table('speech_requests', schema=None) as batch_op:
        batch_op.create_index('ix_speech_requests_api_key_id_created_at', ['api_key_id', 'created_at'], unique=False)

    # A key's lifetime use so far: what it was charged less what was refunded.
    op.execute(
        "UPDATE api_keys SET spent = COALESCE((SELECT SUM(credits - credits_refunded) FROM speech_requests"
        " WHERE speech_requests.api_key_id = api_keys.id), 0)"
    )


def downgrade():
    bind = op.get_bind()
    controlled = bind.execute(sa.text(
        "SELECT COUNT(*) FROM api_keys WHERE kind <> 'speech' OR spend_limit IS NOT NULL OR expires_at IS NOT NULL"
        " OR allowed_ips IS NOT NULL OR allowed_voices IS NOT NULL OR allowed_models IS NOT NULL"
        " OR previous_digest IS NOT NULL"
    )).scalar()
    if controlled:
        raise RuntimeError(
            f"{controlled} keys are management keys, have controls or a rolled secret, which the schema before 0012"
            " cannot hold"
        )
    with op.batch_alter_table('speech_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_speech_requests_api_key_id_created_at')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_api_keys_previous_digest'), type_='unique')
        for column in ('rolled_at', 'previous_expires_at', 'previous_prefix', 'previous_digest', 'allowed_models',
                       'allowed_voices', 'allowed_ips', 'expires_at', 'spent_window', 'spent', 'spend_period',
                       'spend_limit', 'kind'):
            batch_op.drop_column(column)
