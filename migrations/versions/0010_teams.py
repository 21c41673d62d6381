"""teams: a team owns the money; people belong to teams with a role

Every existing account gets a personal team, with the same id as the account, that takes
its balance, unlimited flag, Stripe customer and alert settings; the account becomes the
team's owner (a disabled account stays disabled: the keys it made are refused). Keys, ledger rows, speech requests and payments move to that
team; a key and a speech request remember who made them and a payment who bought it (the
account they had).

Downgrade moves the money of each personal team back to its owner's account. It refuses
while a team that is not personal exists, or a personal team has other members: their
books have no single account to go back to.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

PERSONAL_TEAMS = """
INSERT INTO teams (id, name, personal, balance, unlimited, stripe_customer_id, created_at,
                   low_balance_credits, low_balance_sent_at)
SELECT id, 'Personal', :yes, balance, unlimited, stripe_customer_id, created_at,
       low_balance_credits, low_balance_sent_at
FROM users
"""
OWNERS = "INSERT INTO memberships (team_id, user_id, role, created_at) SELECT id, id, 'owner', created_at FROM users"
# The money tables' owner, renamed: (table, column that joins the person, kept under this name or dropped).
MOVED = (
    ('api_keys', 'created_by_id'),
    ('ledger_entries', None),
    ('speech_requests', 'made_by_id'),
    ('payments', 'bought_by_id'),
)
MONEY_COLUMNS = ('balance', 'unlimited', 'stripe_customer_id', 'low_balance_credits', 'low_balance_sent_at')


def upgrade():
    if op.get_bind().dialect.name == 'postgresql':
        # An upgrade from before 0009 runs it in this transaction: its checks of the ledger's deferred
        # foreign key are still pending, and PostgreSQL alters no table with pending trigger events.
        op.execute('SET CONSTRAINTS ALL IMMEDIATE')
    op.create_table('teams',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('personal', sa.Boolean(), nullable=False),
    sa.Column('balance', sa.BigInteger(), nullable=False),
    sa.Column('unlimited', sa.Boolean(), nullable=False),
    sa.Column('stripe_customer_id', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('low_balance_credits', sa.BigInteger(), nullable=True),
    sa.Column('low_balance_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('balance >= 0', name=op.f('ck_teams_balance_not_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_teams')),
    sqlite_autoincrement=True,
    )
    op.create_table('memberships',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('team_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_memberships_team_id_teams')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_memberships_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_memberships')),
    sa.UniqueConstraint('team_id', 'user_id', name=op.f('uq_memberships_team_id')),
    )
    with op.batch_alter_table('memberships', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_memberships_team_id'), ['team_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_memberships_user_id'), ['user_id'], unique=False)

    op.execute(sa.text(PERSONAL_TEAMS).bindparams(yes=True))
    op.execute(OWNERS)
    if op.get_bind().dialect.name == 'postgresql':
        # Ids were given explicitly: the next team made gets the one after the highest.
        op.execute("SELECT setval(pg_get_serial_sequence('teams', 'id'), (SELECT COALESCE(MAX(id), 0) + 1 FROM teams), false)")
    else:
        # Inserting ids into an AUTOINCREMENT table already noted the highest; with no accounts, note 0.
        op.execute(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'teams', 0"
            " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'teams')"
        )

    for table, person in MOVED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('team_id', sa.Integer(), nullable=True))
            if person:
                batch_op.add_column(sa.Column(person, sa.Integer(), nullable=True))
        op.execute(f"UPDATE {table} SET team_id = user_id" + (f", {person} = user_id" if person else ""))
        with op.batch_alter_table(table, schema=None) as batch_op:
            if table == 'speech_requests':
                batch_op.drop_index('ix_speech_requests_user_id_state')
            batch_op.drop_constraint(f'fk_{table}_user_id_users', type_='foreignkey')
            batch_op.drop_index(f'ix_{table}_user_id')
            batch_op.drop_column('user_id')
            batch_op.alter_column('team_id', existing_type=sa.Integer(), nullable=False)
            batch_op.create_index(batch_op.f(f'ix_{table}_team_id'), ['team_id'], unique=False)
            batch_op.create_foreign_key(batch_op.f(f'fk_{table}_team_id_teams'), 'teams', ['team_id'], ['id'])
            if person:
                batch_op.alter_column(person, existing_type=sa.Integer(), nullable=False)
                batch_op.create_index(batch_op.f(f'ix_{table}_{person}'), [person], unique=False)
                batch_op.create_foreign_key(batch_op.f(f'fk_{table}_{person}_users'), 'users', [person], ['id'])
            if table == 'speech_requests':
                batch_op.create_index('ix_speech_requests_team_id_state', ['team_id', 'state'], unique=False)

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_users_balance_not_negative'), type_='check')
        for column in MONEY_COLUMNS:
            batch_op.drop_column(column)


def downgrade():
    bind = op.get_bind()
    shared = bind.execute(sa.text(
        "SELECT COUNT(*) FROM teams WHERE personal = :no"
        " OR id IN (SELECT team_id FROM memberships GROUP BY team_id HAVING COUNT(*) > 1)"
    ).bindparams(no=False)).scalar()
    if shared:
        raise RuntimeError(f"{shared} teams are shared or not personal: their books have no single account to go back to")

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('balance', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('unlimited', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('stripe_customer_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('low_balance_credits', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('low_balance_sent_at', sa.DateTime(timezone=True), nullable=True))
    # Each personal team's owner, by the membership (a team made after the upgrade has an id of its own).
    owner = "(SELECT memberships.user_id FROM memberships WHERE memberships.team_id = {}.team_id)"
    for column in MONEY_COLUMNS:
        op.execute(
            f"UPDATE users SET {column} = (SELECT teams.{column} FROM teams JOIN memberships"
            " ON memberships.team_id = teams.id WHERE memberships.user_id = users.id)"
        )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.alter_column('balance', server_default=None)
        batch_op.alter_column('unlimited', server_default=None)
        batch_op.create_check_constraint('balance_not_negative', 'balance >= 0')

    for table, person in MOVED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('user_id', sa.Integer(), nullable=True))
        op.execute(f"UPDATE {table} SET user_id = {owner.format(table)}")
        with op.batch_alter_table(table, schema=None) as batch_op:
            if table == 'speech_requests':
                batch_op.drop_index('ix_speech_requests_team_id_state')
            if person:
                batch_op.drop_constraint(batch_op.f(f'fk_{table}_{person}_users'), type_='foreignkey')
                batch_op.drop_index(batch_op.f(f'ix_{table}_{person}'))
                batch_op.drop_column(person)
            batch_op.drop_constraint(batch_op.f(f'fk_{table}_team_id_teams'), type_='foreignkey')
            batch_op.drop_index(batch_op.f(f'ix_{table}_team_id'))
            batch_op.drop_column('team_id')
            batch_op.alter_column('user_id', existing_type=sa.Integer(), nullable=False)
            batch_op.create_index(f'ix_{table}_user_id', ['user_id'], unique=False)
            batch_op.create_foreign_key(f'fk_{table}_user_id_users', 'users', ['user_id'], ['id'])
            if table == 'speech_requests':
                batch_op.create_index('ix_speech_requests_user_id_state', ['user_id', 'state'], unique=False)

    with op.batch_alter_table('memberships', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_memberships_user_id'))
        batch_op.drop_index(batch_op.f('ix_memberships_team_id'))
    op.drop_table('memberships')
    op.drop_table('teams')
