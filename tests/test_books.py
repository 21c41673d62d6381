"""The books, specified where the rest of the suite left gaps a mutation run found.

Each audit offence planted and named; deduct and grant of nothing; the credit packs'
own checks; one user's debit never touching another's balance; reversals of the pro
pack to the cent, a late smaller refund, a storm of concurrent refunds on PostgreSQL;
and what every kind of Stripe event answers and records.
"""

import threading
from datetime import timedelta

import pytest
import stripe
from sqlalchemy import delete, select, update

import app.audit as audit_checks
from app import billing, metering, packs, payments
from app.audit import audit
from app.extensions import db
from app.models import (
    LedgerEntry,
    LedgerKind,
    Membership,
    Payment,
    PaymentReversal,
    SpeechRequest,
    StripeEvent,
    Team,
    utcnow,
)
from tests import factories
from tests.locks import second_waits_for_first
from tests.stripe_helpers import WEBHOOK_SECRET, charge, checkout_session, deliver, event, payment_intent, sign
from tests.test_auto_topups import automatic, turned_on


def problems(app) -> list[str]:
    with app.app_context():
        return audit().problems


# The audit names every offence


def _speech(user_id, **fields):
    return factories.charge_speech(user_id, fields.pop("characters", 10))


def plant_balance_off(user_id):
    db.session.execute(update(Team).where(Team.id == user_id).values(balance=Team.balance + 1))


def plant_charge_without_debit(user_id):
    speech = _speech(user_id)
    db.session.execute(delete(LedgerEntry).where(LedgerEntry.reference == f"speech:{speech.id}"))
    db.session.execute(update(Team).where(Team.id == user_id).values(balance=Team.balance + 10))


def plant_refund_without_charge(user_id):
    speech = _speech(user_id)
    metering.refund_speech(speech.id, "upstream failed", audio_ms=0)
    db.session.execute(delete(LedgerEntry).where(LedgerEntry.reference == f"speech:{speech.id}"))
    db.session.execute(update(Team).where(Team.id == user_id).values(balance=Team.balance + 10))


def plant_refund_row_that_disagrees(user_id):
    speech = _speech(user_id)
    metering.refund_speech(speech.id, "upstream failed", audio_ms=0)
    speech.credits_refunded = 4


def plant_refund_while_delivered(user_id):
    speech = _speech(user_id)
    metering.refund_speech(speech.id, "upstream failed", audio_ms=0)
    speech.state = "delivered"


def plant_orphan_debit(user_id):
    billing.apply(user_id, -5, kind=LedgerKind.DEBIT, reference="speech:req_nobody")


def plant_over_refund(user_id):
    speech = _speech(user_id, characters=100)
    metering.refund_speech(speech.id, "upstream broke off", audio_ms=4000)
    # 4 s of audio at 20 characters a second pays for 80 of the 100 credits: refund all 100 instead.
    extra = 100 - speech.credits_refunded
    billing.apply(user_id, extra, kind=LedgerKind.GRANT, reference="grant:cover")
    db.session.execute(update(LedgerEntry).where(LedgerEntry.reference == f"refund:{speech.id}").values(amount=100))
    db.session.execute(delete(LedgerEntry).where(LedgerEntry.reference == "grant:cover"))
    speech.credits_refunded = 100


def plant_balance_without_ledger(user_id):
    db.session.add(Team(name="Lonely", balance=5))


def plant_refund_row_missing(user_id):
    speech = _speech(user_id)
    metering.refund_speech(speech.id, "upstream failed", audio_ms=0)
    db.session.execute(delete(LedgerEntry).where(LedgerEntry.reference == f"refund:{speech.id}"))
    db.session.execute(update(Team).where(Team.id == user_id).values(balance=Team.balance - 10))


def plant_refund_beyond_the_charge(user_id):
    speech = _speech(user_id)
    metering.refund_speech(speech.id, "upstream failed", audio_ms=0)
    billing.apply(user_id, 2, kind=LedgerKind.GRANT, reference="grant:cover")
    db.session.execute(delete(LedgerEntry).where(LedgerEntry.reference == "grant:cover"))
    db.session.execute(update(LedgerEntry).where(LedgerEntry.reference == f"refund:{speech.id}").values(amount=12))
    speech.credits_refunded = 12


def plant_one_credit_too_many_refunded(user_id):
    # 10 characters at 20 a second last 0.5 s: all of it was delivered, so nothing is due back.
    speech = _speech(user_id)
    metering.refund_speech(speech.id, "upstream broke off", audio_ms=500)
    billing.apply(user_id, 1, kind=LedgerKind.REFUND, reference=f"refund:{speech.id}", speech_request_id=speech.id)
    speech.credits_refunded = 1


def plant_stale_charge(user_id):
    speech = _speech(user_id)
    speech.created_at = utcnow() - timedelta(hours=2)


def _paid_payment(user_id, session_id="cs_planted", credits=10_000):
    payment = factories.starter_payment(user_id, session_id, payment_intent_id="pi_planted")
    payment.credits = credits
    payment.paid_at = utcnow()
    payment.status = "paid"
    db.session.flush()
    return payment


def plant_wrong_topup(user_id):
    payment = _paid_payment(user_id)
    billing.apply(user_id, 9_999, kind=LedgerKind.TOPUP, reference="topup:cs_planted", payment_id=payment.id)


def plant_credit_for_unpaid(user_id):
    payment = factories.starter_payment(user_id, "cs_unpaid")
    db.session.flush()
    billing.apply(user_id, payment.credits, kind=LedgerKind.TOPUP, reference="topup:cs_unpaid", payment_id=payment.id)


def plant_topup_for_no_payment(user_id):
    billing.apply(user_id, 500, kind=LedgerKind.TOPUP, reference="topup:cs_nowhere")


def plant_chargeback_for_no_payment(user_id):
    billing.apply(user_id, -50, kind=LedgerKind.CHARGEBACK, reference="chargeback:cs_nowhere:50")


def plant_paid_without_topup(user_id):
    _paid_payment(user_id)


def plant_unapplied_reversal(user_id):
    payment = _paid_payment(user_id)
    billing.apply(user_id, 10_000, kind=LedgerKind.TOPUP, reference="topup:cs_planted", payment_id=payment.id)
    db.session.add(PaymentReversal(payment_intent_id="pi_planted", kind="refund", amount_cents=250, event_id="evt_x"))
    payment.credits_reversed = 0


def plant_debit_on_another_accounts_request(user_id):
    other = Team(name="Other", balance=0)
    db.session.add(other)
    db.session.flush()
    speech = _speech(user_id)
    # The debit's row moved to a team that never asked for the request.
    db.session.execute(update(LedgerEntry).where(LedgerEntry.speech_request_id == speech.id).values(team_id=other.id))


def plant_topup_on_another_accounts_payment(user_id):
    other = Team(name="Other", balance=0)
    db.session.add(other)
    db.session.flush()
    payment = _paid_payment(user_id)
    billing.apply(other.id, payment.credits, kind=LedgerKind.TOPUP, reference="topup:cs_planted", payment_id=payment.id)


OFFENCES = {
    "balance off its ledger": (plant_balance_off, "but the ledger sums to"),
    "charged without a debit": (plant_charge_without_debit, "charged 10 credits but debited None"),
    "refunded without a charge": (plant_refund_without_charge, "refunded without a charge"),
    "a refund row that disagrees": (plant_refund_row_that_disagrees, "4 credits due back but 10 refunded"),
    "refunded while delivered": (plant_refund_while_delivered, "refunded 10 credits while delivered"),
    "an orphan debit": (plant_orphan_debit, "ledger speech:req_nobody: -5 credits for no speech request"),
    "a refund of delivered audio": (plant_over_refund, "ms of delivered audio pay for 80"),
    "a stale charge": (plant_stale_charge, "still charged, no progress since"),
    "a wrong top-up": (plant_wrong_topup, "10000 credits paid, 1 top-ups of 9999 in all"),
    "credit for an unpaid payment": (plant_credit_for_unpaid, "payment cs_unpaid: credited 10000 but not paid"),
    "a top-up for no payment": (plant_topup_for_no_payment, "ledger topup:cs_nowhere: a top-up for no payment"),
    "a paid payment never credited": (plant_paid_without_topup, "10000 credits paid, 0 top-ups of 0 in all"),
    "a chargeback for no payment": (plant_chargeback_for_no_payment, "chargeback:cs_nowhere:50: a chargeback for no"),
    "a reversal not applied": (plant_unapplied_reversal, "owe 5000 credits back but 0 were taken"),
    "a balance without any ledger": (plant_balance_without_ledger, "balance 5 but the ledger sums to 0"),
    "a refund with no refund row": (plant_refund_row_missing, "10 credits due back but 0 refunded"),
    "a refund beyond the charge": (plant_refund_beyond_the_charge, "refunded 12 of its 10 credits"),
    "one credit too many refunded": (plant_one_credit_too_many_refunded, "kept 9 credits, but its 500 ms"),
    "a debit on another account's request": (plant_debit_on_another_accounts_request, "request of team"),
    "a top-up on another account's payment": (plant_topup_on_another_accounts_payment, "payment of team"),
}


@pytest.mark.parametrize("offence", list(OFFENCES))
def test_the_audit_names_each_offence(app, customer, offence):
    plant, words = OFFENCES[offence]
    assert problems(app) == []
    with app.app_context():
        plant(customer.team_id)
        db.session.commit()
    found = problems(app)
    assert any(words in problem for problem in found), found


def test_an_offence_of_a_team_that_has_no_owner_left_says_so(app, customer):
    with app.app_context():
        team = db.session.get(Team, customer.team_id)
        db.session.execute(delete(Membership).where(Membership.team_id == team.id))
        plant_balance_off(team.id)
        db.session.commit()
        named = f"team {team.id} ({team.name}, no owner)"
    assert any(problem.startswith(named) for problem in problems(app)), problems(app)


@pytest.mark.parametrize(
    "plant, owner, cause",
    [
        (plant_debit_on_another_accounts_request, LedgerEntry.speech_request_id, "request"),
        (plant_topup_on_another_accounts_payment, LedgerEntry.payment_id, "payment"),
    ],
    ids=["request", "payment"],
)
def test_a_row_on_another_accounts_cause_is_named_with_both_accounts(app, customer, plant, owner, cause):
    with app.app_context():
        plant(customer.team_id)
        db.session.commit()
        row = db.session.scalar(select(LedgerEntry).where(owner.is_not(None), LedgerEntry.team_id != customer.team_id))
        said = f"ledger {row.reference}: {row.amount:+} credits of team {row.team_id}"
    assert f"{said} for a {cause} of team {customer.team_id}" in problems(app)


def test_a_stale_charge_is_named_with_the_last_time_it_made_progress(app, customer):
    with app.app_context():
        speech = _speech(customer.team_id)
        speech.created_at = utcnow() - timedelta(hours=3)
        speech.progress_at = progressed = utcnow() - timedelta(hours=2)
        request_id = speech.id
        db.session.commit()
    said = f"request {request_id}: still charged, no progress since {progressed:%Y-%m-%d %H:%M:%S}"
    assert f"{said} (run `flask speech settle`)" in problems(app)


def test_recorded_progress_keeps_an_old_request_from_being_settled(app, customer):
    with app.app_context():
        old = factories.charge_speech(customer.team_id, 10)
        old.created_at = utcnow() - timedelta(hours=2)
        quiet = factories.charge_speech(customer.team_id, 10)
        quiet.created_at = utcnow() - timedelta(hours=2)
        db.session.commit()
        assert metering.record_progress(old.id, 4096, 1500) is True
        db.session.commit()
        assert metering.stale_charges(600) == [quiet.id]
        row = db.session.get(SpeechRequest, old.id)
        assert (row.bytes_sent, row.audio_ms) == (4096, 1500) and row.progress_at is not None
        metering.refund_speech(quiet.id, "settled", audio_ms=0)
        db.session.commit()
        assert metering.record_progress(quiet.id, 1, 1) is False


def test_a_live_stream_with_recent_progress_is_not_stale_however_old(app, customer):
    with app.app_context():
        speech = factories.charge_speech(customer.team_id, 10)
        speech.created_at = utcnow() - timedelta(hours=2)
        speech.progress_at = utcnow()
        db.session.commit()
    assert problems(app) == []


def test_a_refund_waiting_for_an_unpaid_payment_is_no_offence(app, client, customer):
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_test_1", payment_intent_id="pi_1")
        db.session.commit()
    deliver(client, event("charge.refunded", charge(amount_refunded=500)))
    assert problems(app) == []


def test_the_audit_says_what_it_checked(app, runner, customer):
    factories.customer(app, balance=0)
    with app.app_context():
        factories.charge_speech(customer.team_id, 10)
        db.session.commit()
        report = audit()
    assert report.checked == {"users": 2, "ledger entries": 2, "speech requests": 1, "payments": 0}
    result = runner.invoke(args=["audit"])
    assert (
        result.exit_code == 0
        and "Audit passed: 2 users, 2 ledger entries, 1 speech requests, 0 payments." in result.output
    )


# Notices: accounts whose streams often break off after audio went out


def _streams(user_id, broken: int, whole: int, before_audio: int = 0, days_ago: float = 0):
    for index in range(broken + whole + before_audio):
        speech = factories.charge_speech(user_id, 1)
        speech.created_at = utcnow() - timedelta(days=days_ago)
        if index < broken + before_audio:
            # A break after a single byte of audio is a break after audio went out.
            speech.state = "refunded"
            speech.bytes_sent = 0 if index >= broken else 1 + index * 100
        else:
            speech.state = "delivered"
            speech.bytes_sent = 5000


def notices(app) -> list[str]:
    with app.app_context():
        return audit().notices


@pytest.mark.parametrize(
    "broken,whole,before_audio,days_ago,named",
    [
        (5, 20, 0, 0, True),  # 5 of 25: exactly a fifth, at the minimum count
        (4, 0, 0, 0, False),  # below the minimum count, however large a share
        (5, 21, 0, 0, False),  # 5 of 26: under a fifth
        (5, 0, 20, 0, True),  # failures before any audio count as streams, not as breaks
        (4, 0, 20, 0, False),
        (5, 0, 0, 31, False),  # older than the 30 days looked at
        (5, 0, 0, 29, True),
    ],
)
def test_accounts_whose_streams_often_break_are_named(app, customer, broken, whole, before_audio, days_ago, named):
    other = factories.customer(app, balance=1000)
    with app.app_context():
        _streams(customer.team_id, broken, whole, before_audio, days_ago)
        _streams(other.team_id, 0, 30)
        db.session.commit()
    found = notices(app)
    total = broken + whole + before_audio
    who = f"team {customer.team_id} (Personal, <{customer.email}>)"
    expected = [f"{who}: {broken} of {total} streams in 30 days broke off after audio went out"]
    assert found == (expected if named else [])


@pytest.mark.parametrize("earlier", [timedelta(0), timedelta(microseconds=1)])
def test_a_stream_made_exactly_when_the_lookback_begins_still_counts(app, customer, monkeypatch, earlier):
    """The 30 days looked at include their first instant; a microsecond before it is outside (a frozen clock)."""
    now = utcnow()
    monkeypatch.setattr(audit_checks, "utcnow", lambda: now)
    with app.app_context():
        _streams(customer.team_id, 5, 0)
        first = db.session.scalars(select(SpeechRequest).where(SpeechRequest.team_id == customer.team_id)).first()
        first.created_at = now - timedelta(days=audit_checks.LOOKBACK_DAYS) - earlier
        db.session.commit()
    who = f"team {customer.team_id} (Personal, <{customer.email}>)"
    named = [f"{who}: 5 of 5 streams in 30 days broke off after audio went out"]
    assert notices(app) == (named if not earlier else [])


def test_clean_books_with_empty_accounts_raise_no_alarm(app, customer):
    for balance in (0, 0, 7):
        factories.customer(app, balance=balance)
    with app.app_context():
        speech = factories.charge_speech(customer.team_id, 10)
        metering.refund_speech(speech.id, "upstream failed", audio_ms=0)
        factories.charge_speech(customer.team_id, 20)
        db.session.commit()
    assert problems(app) == []


# Grants and deductions of nothing


@pytest.mark.parametrize("amount", [0, -5])
def test_grant_and_deduct_refuse_nothing_or_less(app, customer, amount):
    with app.app_context():
        user = db.session.get(Team, customer.team_id)
        with pytest.raises(ValueError, match="^a grant must be a positive number of credits$"):
            billing.grant(user, amount, "operator")
        with pytest.raises(ValueError, match="^a deduction must be a positive number of credits$"):
            billing.deduct(user, amount, "operator")
        db.session.commit()
    assert factories.ledger(app, customer.team_id) == [("grant", 1000, 1000)]


def test_an_operators_long_reason_is_kept_to_its_first_500_characters(app, customer):
    with app.app_context():
        billing.grant(db.session.get(Team, customer.team_id), 5, "r" * 600)
        db.session.commit()
    assert factories.ledger_notes(app, customer.team_id)[-1] == ("grant", 5, "r" * 500)


# The credit packs' own checks


def test_credit_packs_are_read_with_their_prices():
    read = packs.parse_packs("starter:10000:500, pro:250000:8000, sample:1:1")
    assert [(pack.id, pack.credits, pack.price_cents, pack.price) for pack in read] == [
        ("starter", 10_000, 500, "5.00"),
        ("pro", 250_000, 8000, "80.00"),
        # The smallest pack there can be: one credit for one cent.
        ("sample", 1, 1, "0.01"),
    ]


@pytest.mark.parametrize(
    "setting", ["starter:0:500", "starter:10000:0", "starter:-1:500", "starter:10000:-500", ":10:5", "a:b:c", "a:1"]
)
def test_a_pack_without_a_name_or_with_nothing_to_sell_is_refused(setting):
    with pytest.raises(ValueError):
        packs.parse_packs(setting)


# One account's debit never touches another's


def test_charging_one_account_never_touches_another(app, customer):
    poorer = factories.customer(app, balance=5)
    with app.app_context():
        with pytest.raises(billing.InsufficientCredits) as short:
            factories.charge_speech(poorer.team_id, 6)
        db.session.rollback()
        assert (short.value.balance, short.value.cost) == (5, 6)
        paid = factories.charge_speech(customer.team_id, 6)
        db.session.commit()
        assert (paid.credits, paid.state) == (6, "charged")
    assert factories.balance(app, poorer.team_id) == 5 and factories.balance(app, customer.team_id) == 994
    # The customer's ledger says what the debit was for, and the poorer account's has no debit at all.
    assert factories.ledger_notes(app, customer.team_id)[-1] == ("debit", -6, "6 characters")
    assert [kind for kind, _, _ in factories.ledger(app, poorer.team_id)] == ["grant"]


# What is kept after a break, at the edges


def test_a_one_credit_request_with_audio_delivered_keeps_its_credit():
    assert metering.kept_credits(1, 1, 1.0, 100, 20) == 1
    assert metering.kept_credits(1, 1, 1.0, 0, 20) == 0


def test_delivered_audio_that_covers_the_whole_text_keeps_the_whole_charge():
    # 1,000 characters at 20 a second: 50 s. All of it delivered keeps all 1,000 credits, not 999.
    assert metering.kept_credits(1000, 1000, 1.0, 50_000, 20) == 1000
    assert metering.kept_credits(1000, 1000, 1.0, 49_950, 20) == 999
    assert metering.kept_credits(1000, 1000, 2.0, 25_000, 20) == 1000


def test_a_long_request_cut_at_half_its_length_keeps_exactly_half_its_charge():
    # 10,000 characters at 20 a second: 500 s. 250 s delivered pays 5,000 credits, not 4,996.
    assert metering.kept_credits(10_000, 10_000, 1.0, 250_000, 20) == 5000
    assert metering.kept_credits(10_000, 10_000, 1.0, 250_001, 20) == 5001


# Reversals, to the cent


def _buy(app, client, user_id, pack="starter", credits=10_000, cents=500, session_id="cs_test_1"):
    with app.app_context():
        payment = factories.starter_payment(user_id, session_id)
        payment.pack, payment.credits, payment.amount_cents = pack, credits, cents
        db.session.commit()
    deliver(client, event("checkout.session.completed", checkout_session(user_id, session_id, amount_total=cents)))


def _taken_back(app, session_id="cs_test_1") -> int:
    with app.app_context():
        return db.session.scalar(select(Payment.credits_reversed).where(Payment.checkout_session_id == session_id))


def test_the_pro_pack_refunded_by_one_cent_takes_back_its_share_rounded_down(app, client, customer):
    _buy(app, client, customer.team_id, "pro", 250_000, 8000)
    assert factories.balance(app, customer.team_id) == 251_000
    deliver(client, event("charge.refunded", charge(amount=8000, amount_refunded=1)))
    # 250,000 credits × 1 / 8,000 cents = 31.25: 31 taken back, never a fraction in the customer's disfavour.
    assert _taken_back(app) == 31 and factories.balance(app, customer.team_id) == 251_000 - 31
    deliver(client, event("charge.refunded", charge(amount=8000, amount_refunded=7999)))
    assert _taken_back(app) == 249_968
    deliver(client, event("charge.refunded", charge(amount=8000, amount_refunded=8000)))
    assert _taken_back(app) == 250_000 and factories.balance(app, customer.team_id) == 1000
    factories.assert_books_balance(app, customer.team_id)
    assert problems(app) == []


def test_what_a_reversal_takes_back_is_its_share_of_the_price_and_never_more():
    pack = Payment(credits=10_000, amount_cents=500)
    assert payments.owed_credits(pack, 250, 0) == 5000
    assert payments.owed_credits(pack, 400, 400) == 10_000
    # A payment recorded at no price (a free pack) has no price to share out: nothing is owed back.
    assert payments.owed_credits(Payment(credits=10_000, amount_cents=0), 500, 0) == 0


def test_a_late_smaller_refund_changes_nothing(app, client, customer):
    _buy(app, client, customer.team_id)
    deliver(client, event("charge.refunded", charge(amount_refunded=300)))
    assert _taken_back(app) == 6000
    # Stripe's older event, with the smaller running total, arrives last.
    deliver(client, event("charge.refunded", charge(amount_refunded=100)))
    assert _taken_back(app) == 6000 and factories.balance(app, customer.team_id) == 1000 + 10_000 - 6000
    assert problems(app) == []


def test_a_refund_and_a_lost_dispute_never_take_back_more_than_was_paid(app, client, customer):
    _buy(app, client, customer.team_id)
    deliver(client, event("charge.refunded", charge(amount_refunded=400)))
    deliver(
        client,
        event(
            "charge.dispute.closed",
            {"id": "dp_1", "object": "dispute", "payment_intent": "pi_1", "amount": 500, "status": "lost"},
        ),
    )
    assert _taken_back(app) == 10_000 and factories.balance(app, customer.team_id) == 1000
    assert problems(app) == []


def test_a_refund_and_a_lost_dispute_add_up(app, client, customer):
    _buy(app, client, customer.team_id)
    deliver(client, event("charge.refunded", charge(amount_refunded=100)))
    lost = {"id": "dp_1", "object": "dispute", "payment_intent": "pi_1", "amount": 200, "status": "lost"}
    deliver(client, event("charge.dispute.closed", lost))
    # 100 + 200 of 500 cents: three fifths of the 10,000 credits.
    assert _taken_back(app) == 6000 and factories.balance(app, customer.team_id) == 1000 + 4000
    kinds = [kind for kind, _, _ in factories.ledger(app, customer.team_id)]
    assert kinds == ["grant", "topup", "payment_refund", "chargeback"]


def test_a_refund_worth_one_credit_takes_one_credit(app, client, customer):
    _buy(app, client, customer.team_id, "tiny", 500, 500)
    deliver(client, event("charge.refunded", charge(amount_refunded=1)))
    assert _taken_back(app) == 1 and factories.balance(app, customer.team_id) == 1000 + 499


def test_a_payment_without_a_payment_intent_is_credited_in_full(app, client, customer):
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_no_intent")
        db.session.commit()
    session = checkout_session(customer.team_id, "cs_no_intent", payment_intent=None)
    response = deliver(client, event("checkout.session.completed", session))
    assert response.get_json()["outcome"] == f"credited 10000 to team {customer.team_id}; balance 11000"
    assert factories.balance(app, customer.team_id) == 11_000 and _taken_back(app, "cs_no_intent") == 0


def test_what_the_ledger_and_the_event_rows_say_of_a_payment_and_its_reversals(app, client, customer):
    _buy(app, client, customer.team_id)
    assert factories.ledger_notes(app, customer.team_id)[-1] == ("topup", 10_000, "starter pack, 5.00 USD")
    again = deliver(client, event("checkout.session.completed", checkout_session(customer.team_id)))
    assert again.get_json()["outcome"] == "already credited"
    with app.app_context():
        billing.deduct(db.session.get(Team, customer.team_id), 10_500, "spent")
        db.session.commit()
    refunded = deliver(client, event("charge.refunded", charge(amount_refunded=250)))
    assert refunded.get_json()["outcome"] == f"took back 500 of 5000 credits from team {customer.team_id}"
    assert factories.ledger_notes(app, customer.team_id)[-1] == (
        "payment_refund",
        -500,
        "refunded payment cs_test_1; 4500 credits already spent",
    )
    same = deliver(client, event("charge.refunded", charge(amount_refunded=250)))
    assert same.get_json()["outcome"] == "already reversed"
    with app.app_context():
        billing.grant(db.session.get(Team, customer.team_id), 10_000, "goodwill")
        db.session.commit()
    lost = {"id": "dp_1", "object": "dispute", "payment_intent": "pi_1", "amount": 250, "status": "lost"}
    deliver(client, event("charge.dispute.closed", lost))
    assert factories.ledger_notes(app, customer.team_id)[-1] == ("chargeback", -5000, "disputed payment cs_test_1")


def test_a_refund_waiting_for_its_payment_is_applied_and_said_when_the_payment_arrives(app, client, customer):
    deliver(client, event("charge.refunded", charge(amount_refunded=500)))
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_test_1")
        db.session.commit()
    response = deliver(client, event("checkout.session.completed", checkout_session(customer.team_id)))
    assert response.get_json()["outcome"] == (
        f"credited 10000 to team {customer.team_id}; balance 11000; "
        f"took back 10000 of 10000 credits from team {customer.team_id}"
    )
    assert factories.balance(app, customer.team_id) == 1000


def test_a_storm_of_concurrent_partial_refunds_takes_back_at_most_the_pack(make_app, postgres_only):
    app = make_app()
    customer = factories.customer(app, balance=0)
    client = app.test_client()
    _buy(app, client, customer.team_id)
    cents_seen = (125, 250, 375, 500, 500, 250, 375, 125, 250, 500)
    payloads = [event("charge.refunded", charge(amount_refunded=cents)) for cents in cents_seen]
    barrier = threading.Barrier(len(payloads))
    statuses = []

    def send(payload):
        barrier.wait(timeout=10)
        statuses.append(deliver(app.test_client(), payload).status_code)

    threads = [threading.Thread(target=send, args=(payload,)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert statuses == [200] * len(payloads)
    assert _taken_back(app) == 10_000 and factories.balance(app, customer.team_id) == 0
    taken = [amount for kind, amount, _ in factories.ledger(app, customer.team_id) if kind == "payment_refund"]
    assert sum(taken) == -10_000
    assert problems(app) == []


def test_refunds_racing_the_payment_they_reverse_are_all_applied(make_app, postgres_only):
    # The refunds arrive while the payment is being credited, before it is linked to its
    # payment intent: each must be either seen by the credit or see the credit, never neither.
    app = make_app()
    for round_ in range(5):
        customer = factories.customer(app, balance=0)
        session_id = f"cs_race_{round_}"
        with app.app_context():
            factories.starter_payment(customer.team_id, session_id)
            db.session.commit()
        intent = f"pi_race_{round_}"
        credit = event(
            "checkout.session.completed", checkout_session(customer.team_id, session_id, payment_intent=intent)
        )
        refunds = [event("charge.refunded", charge(payment_intent=intent, amount_refunded=c)) for c in (100, 200, 300)]
        barrier = threading.Barrier(4)

        def send(payload, barrier=barrier):
            barrier.wait(timeout=10)
            assert deliver(app.test_client(), payload).status_code == 200

        threads = [threading.Thread(target=send, args=(payload,)) for payload in [credit, *refunds]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert _taken_back(app, session_id) == 6000, f"round {round_}"
        assert factories.balance(app, customer.team_id) == 4000
    assert problems(app) == []


def test_each_event_and_a_session_of_another_user_are_logged_for_the_operator(app, client, customer, caplog):
    caplog.set_level("INFO", logger="app.payments")
    deliver(client, event("customer.created", {"id": "cus_1", "object": "customer"}, event_id="evt_logged"))
    assert "stripe event evt_logged (customer.created): ignored" in caplog.messages
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_theirs")
        db.session.commit()
    stranger = factories.customer(app, balance=0)
    deliver(client, event("checkout.session.completed", checkout_session(stranger.team_id, "cs_theirs")))
    assert "checkout session cs_theirs names another team; ignored" in caplog.messages
    assert factories.balance(app, stranger.team_id) == 0 and factories.balance(app, customer.team_id) == 1000


# Every kind of event answers 200 and records what it did


@pytest.mark.parametrize(
    "event_type,obj,outcome",
    [
        ("customer.created", {"id": "cus_1", "object": "customer"}, "ignored"),
        ("checkout.session.completed", checkout_session(1, "cs_nobody"), "unknown checkout session"),
        ("checkout.session.async_payment_failed", checkout_session(1, "cs_nobody"), "unknown checkout session"),
        ("charge.refunded", charge(payment_intent=None), "no payment intent on this event"),
        (
            "charge.refunded",
            charge(payment_intent="pi_later"),
            "kept: a refund of 500 cents, applied when its payment is credited",
        ),
        (
            "charge.dispute.closed",
            {"id": "dp_1", "object": "dispute", "payment_intent": "pi_1", "amount": 500, "status": "won"},
            "ignored",
        ),
    ],
)
def test_every_event_is_acknowledged_and_its_outcome_recorded(app, client, event_type, obj, outcome):
    payload = event(event_type, obj, event_id="evt_spec")
    response = deliver(client, payload)
    assert response.status_code == 200 and response.get_json() == {"received": True, "outcome": outcome}
    with app.app_context():
        row = db.session.get(StripeEvent, "evt_spec")
        assert (row.type, row.outcome) == (event_type, outcome)
    again = deliver(client, payload)
    assert again.status_code == 200 and again.get_json()["outcome"] == "already processed"


def test_a_refund_that_arrives_while_its_payment_is_being_credited_waits_for_the_credit(make_app, postgres_only):
    """The race above, made certain: the credit's transaction is held open while the refund arrives."""
    app = make_app()
    customer = factories.customer(app, balance=0)
    with app.app_context():
        factories.starter_payment(customer.team_id, "cs_held")
        db.session.commit()
    credit = event(
        "checkout.session.completed", checkout_session(customer.team_id, "cs_held", payment_intent="pi_held")
    )
    _refund_waits_for(app, credit)
    assert _taken_back(app, "cs_held") == 5000 and factories.balance(app, customer.team_id) == 5000
    assert problems(app) == []


def test_a_refund_that_arrives_while_an_automatic_top_up_is_being_credited_waits_for_the_credit(
    make_app, postgres_only
):
    """The same race for an automatic top-up, credited by its payment_intent.succeeded event."""
    app = make_app()
    team_id = turned_on(app, factories.WebClient(app.test_client()), credits=100)
    (queued,) = automatic(app, team_id)
    _refund_waits_for(
        app, event("payment_intent.succeeded", payment_intent(queued.idempotency_key, team_id, "pi_held"))
    )
    # Half the pack's price refunded: half its credits taken back.
    assert factories.balance(app, team_id) == 100 + 10_000 - 5_000
    assert problems(app) == []


def _refund_waits_for(app, credit: str) -> None:
    """`credit` is applied, with its locks, and not committed until a refund of half of pi_held has had its
    chance: the refund must wait for it."""
    refund = event("charge.refunded", charge(payment_intent="pi_held", amount_refunded=250))
    failures = second_waits_for_first(
        app.test_request_context,
        lambda: payments.handle_event(stripe.Webhook.construct_event(credit, sign(credit), WEBHOOK_SECRET)),
        lambda: deliver(app.test_client(), refund),
        "the refund",
    )
    assert failures == []
