"""invitations: people are invited to teams by email; teams can be closed and disabled

Adds the `invitations` table (a signed link per row, working once and until it expires),
`teams.closed_at` (closed by an owner: its keys revoked, its books kept), `teams.disabled_at`
(set by an operator: its keys refused) and `admin_actions.team_id` (the team an operator's
action changed). Downgrade drops them: invitations still pending are lost, and it refuses
while a team is closed or disabled, which 0010's schema cannot say.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('invitations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('team_id', sa.Integer(), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('invited_by_id', sa.Integer(), nullable=False),
    sa.Column('nonce', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('accepted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('accepted_by_id', sa.Integer(), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['accepted_by_id'], ['users.id'], name=op.f('fk_invitations_accepted_by_id_users')),
    sa.ForeignKeyConstraint(['invited_by_id'], ['users.id'], name=op.f('fk_invitations_invited_by_id_users')),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_invitations_team_id_teams')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invitations')),
    )
    with op.batch_alter_table('invitations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_invitations_team_id'), ['team_id'], unique=False)

    with op.batch_alter_table('teams', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('team_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_admin_actions_team_id'), ['team_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_admin_actions_team_id_teams'), 'teams', ['team_id'], ['id'])


def downgrade():
    bind = op.get_bind()
    flagged = bind.execute(sa.text(
        "SELECT COUNT(*) FROM teams WHERE closed_at IS NOT NULL OR disabled_at IS NOT NULL"
    )).scalar()
    if flagged:
        raise RuntimeError(f"{flagged} teams are closed or disabled, which the schema before 0011 cannot hold")
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_admin_actions_team_id_teams'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_admin_actions_team_id'))
        batch_op.drop_column('team_id')

    with op.batch_alter_table('teams', schema=None) as batch_op:
        batch_op.drop_column('closed_at')
        batch_op.drop_column('disabled_at')

    with op.batch_alter_table('invitations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_invitations_team_id'))
    op.drop_table('invitations')
