"""upstream places: each speech server's health and the places gateway processes hold on it or in its wait

Before, every gateway process counted its streams, its wait and its servers' failures in memory, so two
processes (or two hosts) sent a server twice the streams it was sized for. Both tables start empty:
the servers' rows are written by the gateways when they first take a place.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('upstream_servers',
    sa.Column('url', sa.String(length=512), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('out_until', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('url', name=op.f('pk_upstream_servers'))
    )
    op.create_table('upstream_places',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('process_id', sa.String(length=32), nullable=False),
    sa.Column('server_url', sa.String(length=512), nullable=True),
    sa.Column('team_id', sa.Integer(), nullable=True),
    sa.Column('taken_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['process_id'], ['gateway_processes.id'], name=op.f('fk_upstream_places_process_id_gateway_processes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_upstream_places'))
    )
    with op.batch_alter_table('upstream_places', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_upstream_places_process_id'), ['process_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_upstream_places_server_url'), ['server_url'], unique=False)


def downgrade():
    with op.batch_alter_table('upstream_places', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_upstream_places_server_url'))
        batch_op.drop_index(batch_op.f('ix_upstream_places_process_id'))

    op.drop_table('upstream_places')
    op.drop_table('upstream_servers')
