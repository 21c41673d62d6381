"""partial refunds, stream progress, payment reversals kept in any order

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('speech_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('speed', sa.Float(), nullable=False, server_default='1.0'))
        batch_op.add_column(sa.Column('credits_refunded', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('audio_ms', sa.BigInteger(), nullable=True, server_default='0'))
        batch_op.add_column(sa.Column('progress_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_speech_requests_user_id_state', ['user_id', 'state'], unique=False)
    # Until now a refund always gave back the whole charge.
    op.execute("UPDATE speech_requests SET credits_refunded = credits WHERE state = 'refunded'")

    op.create_table('payment_reversals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('payment_intent_id', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('amount_cents', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.String(length=255), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payment_reversals')),
    sa.UniqueConstraint('event_id', name=op.f('uq_payment_reversals_event_id'))
    )
    with op.batch_alter_table('payment_reversals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_payment_reversals_payment_intent_id'), ['payment_intent_id'], unique=False)


def downgrade():
    with op.batch_alter_table('payment_reversals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_payment_reversals_payment_intent_id'))
    op.drop_table('payment_reversals')
    with op.batch_alter_table('speech_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_speech_requests_user_id_state')
        batch_op.drop_column('progress_at')
        batch_op.drop_column('audio_ms')
        batch_op.drop_column('credits_refunded')
        batch_op.drop_column('speed')
