import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import billing, metering
from app.extensions import db
from app.models import LedgerEntry, SpeechRequest, Team
from tests import factories


def _charge(user_id, key_id, characters):
    speech = factories.charge_speech(user_id, characters)
    assert speech.api_key_id == key_id
    return speech


def test_charge_debits_and_ledgers_once(app, customer):
    with app.app_context():
        speech = _charge(customer.team_id, customer.key_id, 42)
        db.session.commit()
        assert speech.state == "charged" and speech.credits == 42
    assert factories.balance(app, customer.team_id) == 958
    assert factories.ledger(app, customer.team_id)[-1] == ("debit", -42, 958)
    factories.assert_books_balance(app, customer.team_id)


def test_charge_beyond_the_balance_writes_nothing(app, customer):
    with app.app_context():
        with pytest.raises(billing.InsufficientCredits) as short:
            _charge(customer.team_id, customer.key_id, 1001)
        db.session.rollback()
        assert (short.value.balance, short.value.cost) == (1000, 1001)
        assert db.session.scalars(select(SpeechRequest)).all() == []
    assert factories.balance(app, customer.team_id) == 1000
    assert len(factories.ledger(app, customer.team_id)) == 1


def test_the_whole_balance_can_be_spent_to_exactly_zero(app, customer):
    with app.app_context():
        _charge(customer.team_id, customer.key_id, 1000)
        db.session.commit()
    assert factories.balance(app, customer.team_id) == 0


def test_refund_returns_the_charge_exactly_once(app, customer):
    with app.app_context():
        request_id = _charge(customer.team_id, customer.key_id, 100).id
        db.session.commit()
        assert metering.refund_speech(request_id, "upstream down") == 100
        db.session.commit()
        assert metering.refund_speech(request_id, "upstream down again") is None
        db.session.commit()
        speech = db.session.get(SpeechRequest, request_id)
        assert speech.state == "refunded" and speech.error == "upstream down"
    assert factories.balance(app, customer.team_id) == 1000
    assert [kind for kind, _, _ in factories.ledger(app, customer.team_id)] == ["grant", "debit", "refund"]
    factories.assert_books_balance(app, customer.team_id)


def test_a_refund_with_a_long_reason_is_still_made_and_its_reason_kept_to_500_characters(app, customer):
    # The reason column holds 500 characters; PostgreSQL refuses a longer value, which would lose the refund.
    with app.app_context():
        request_id = _charge(customer.team_id, customer.key_id, 100).id
        db.session.commit()
        assert metering.refund_speech(request_id, "r" * 600) == 100
        db.session.commit()
        assert db.session.get(SpeechRequest, request_id).error == "r" * 500
    assert factories.balance(app, customer.team_id) == 1000
    factories.assert_books_balance(app, customer.team_id)


def test_a_delivered_request_is_never_refunded(app, customer):
    with app.app_context():
        request_id = _charge(customer.team_id, customer.key_id, 100).id
        assert metering.mark_delivered(request_id, bytes_sent=10) is True
        assert metering.refund_speech(request_id, "too late") is None
        assert metering.mark_delivered(request_id, bytes_sent=10) is False
        db.session.commit()
    assert factories.balance(app, customer.team_id) == 900


def test_refund_of_an_unknown_request_gives_nothing(app, customer):
    with app.app_context():
        assert metering.refund_speech("req_unknown", "no such request") is None
        db.session.commit()
    assert factories.balance(app, customer.team_id) == 1000


def test_a_ledger_reference_is_used_once(app, customer):
    with app.app_context():
        billing.apply(customer.team_id, 5, kind="grant", reference="stripe:evt_1")
        db.session.commit()
        with pytest.raises(IntegrityError):
            billing.apply(customer.team_id, 5, kind="grant", reference="stripe:evt_1")
        db.session.rollback()
    assert factories.balance(app, customer.team_id) == 1005


def test_unlimited_accounts_are_recorded_but_never_debited(app):
    rich = factories.customer(app, balance=0, unlimited=True)
    with app.app_context():
        speech = _charge(rich.team_id, rich.key_id, 5000)
        db.session.commit()
        assert (speech.characters, speech.credits) == (5000, 0)
        assert metering.refund_speech(speech.id, "upstream down") == 0
        db.session.commit()
    assert factories.balance(app, rich.team_id) == 0
    assert factories.ledger(app, rich.team_id) == []


def test_grant_and_deduct_are_ledgered_and_never_go_below_zero(app, customer):
    with app.app_context():
        user = db.session.get(Team, customer.team_id)
        assert billing.grant(user, 50, "goodwill") == 1050
        assert billing.deduct(user, 1050, "closing") == 0
        with pytest.raises(billing.InsufficientCredits):
            billing.deduct(user, 1, "one more")
        with pytest.raises(ValueError):
            billing.grant(user, 0, "nothing")
        db.session.commit()
        notes = db.session.scalars(select(LedgerEntry.note).order_by(LedgerEntry.id)).all()
    assert notes == ["test credits", "goodwill", "closing"]
    factories.assert_books_balance(app, customer.team_id)


def test_the_database_refuses_a_negative_balance(app, customer):
    with app.app_context():
        with pytest.raises(IntegrityError):
            db.session.execute(db.update(Team).where(Team.id == customer.team_id).values(balance=-1))
        db.session.rollback()
