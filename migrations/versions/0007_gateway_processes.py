"""gateway processes: a lease per serving process, and the process each speech request is served by

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('gateway_processes',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gateway_processes'))
    )
    with op.batch_alter_table('speech_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('process_id', sa.String(length=32), nullable=True))


def downgrade():
    with op.batch_alter_table('speech_requests', schema=None) as batch_op:
        batch_op.drop_column('process_id')

    op.drop_table('gateway_processes')
