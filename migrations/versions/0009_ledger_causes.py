"""ledger causes: each ledger row points at the speech request or payment that caused it

Filled for the rows already there from their references, whose formats are fixed:
"speech:<request id>" (a debit), "refund:<request id>", "topup:<checkout session id>",
"<payment_refund|chargeback>:<checkout session id>:<credits owed>". A reference whose
request or payment does not exist is left without a cause, for `flask audit` to name.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

# "speech:" and "refund:" are both 7 characters: the request id starts at the 8th.
LINK_SPEECH = """
UPDATE ledger_entries SET speech_request_id = substr(reference, 8)
WHERE ((kind = 'debit' AND reference LIKE 'speech:%') OR (kind = 'refund' AND reference LIKE 'refund:%'))
  AND substr(reference, 8) IN (SELECT id FROM speech_requests)
"""
# "topup:" is 6 characters: the checkout session id starts at the 7th.
LINK_TOPUPS = """
UPDATE ledger_entries SET payment_id = (
    SELECT payments.id FROM payments WHERE payments.checkout_session_id = substr(ledger_entries.reference, 7)
)
WHERE kind = 'topup' AND reference LIKE 'topup:%'
"""
# "<kind>:<session>:<owed>": the session id follows the kind and its colon, and a colon follows it.
LINK_REVERSALS = """
UPDATE ledger_entries SET payment_id = (
    SELECT payments.id FROM payments
    WHERE substr(ledger_entries.reference, length(ledger_entries.kind) + 2, length(payments.checkout_session_id) + 1)
        = payments.checkout_session_id || ':'
)
WHERE kind IN ('payment_refund', 'chargeback')
"""


def upgrade():
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('speech_request_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('payment_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_ledger_entries_payment_id'), ['payment_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_entries_speech_request_id'), ['speech_request_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_ledger_entries_speech_request_id_speech_requests'), 'speech_requests', ['speech_request_id'], ['id'], initially='DEFERRED', deferrable=True)
        batch_op.create_foreign_key(batch_op.f('fk_ledger_entries_payment_id_payments'), 'payments', ['payment_id'], ['id'])
    for statement in (LINK_SPEECH, LINK_TOPUPS, LINK_REVERSALS):
        op.execute(statement)


def downgrade():
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_ledger_entries_payment_id_payments'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('fk_ledger_entries_speech_request_id_speech_requests'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_ledger_entries_speech_request_id'))
        batch_op.drop_index(batch_op.f('ix_ledger_entries_payment_id'))
        batch_op.drop_column('payment_id')
        batch_op.drop_column('speech_request_id')
