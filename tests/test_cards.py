"""Saved cards and the automatic top-up settings (app/cards.py, app/autotopup.py), to the field: what Stripe
is asked for, what is kept of what it answers, what each card event's outcome says, and when a month ends.

tests/test_auto_topups.py walks the whole flow; these pin what the customer, Stripe and the operator read.
"""

import dataclasses
import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from flask_sqlalchemy.session import Session
from sqlalchemy import event, select

from app import autotopup, card_payments, cards
from app.extensions import db
from app.models import Membership, Payment, PaymentKind, PaymentStatus, StripeEvent, Team, User
from tests import factories
from tests.locks import another_writer_could_go_ahead, second_waits_for_first
from tests.stripe_helpers import FakeStripe, checkout_session, deliver
from tests.stripe_helpers import event as stripe_event
from tests.test_auto_topups import (
    OWNER,
    a_day_passes,
    automatic,
    buy,
    owner,
    setup_completed,
    spend,
    succeeded,
    team_row,
    turned_on,
    with_card,
)


def other_team(app, web, email: str = "other@example.com") -> int:
    """Another person's team, `web` signed in as them on the billing page."""
    web.post("/logout")
    return owner(app, web, email=email)


def outcome(client, event_type: str, obj: dict) -> str:
    response = deliver(client, stripe_event(event_type, obj))
    assert response.status_code == 200
    return response.get_json()["outcome"]


def test_saving_a_card_asks_stripe_for_a_setup_session_of_this_team_only(app, web, stripe_api):
    bystander = owner(app, web)  # a team with no Stripe customer yet, as the next one has
    team_id = other_team(app, web)
    assert web.post("/billing/card").status_code == 303
    ((_, headers),) = stripe_api.called("POST", "/v1/customers")
    with app.app_context():
        created = db.session.get(Team, team_id).created_at
    assert headers["Idempotency-Key"] == f"kp-team-{team_id}-customer-{created.timestamp():.6f}"
    ((session, _),) = stripe_api.called("POST", "/v1/checkout/sessions")
    assert session == {
        "mode": "setup",
        "customer": FakeStripe.CUSTOMER,
        "currency": "usd",
        "payment_method_types[0]": "card",
        "client_reference_id": str(team_id),
        "metadata[team_id]": str(team_id),
        "metadata[purpose]": "save a card",
        "setup_intent_data[metadata][team_id]": str(team_id),
        "success_url": session["success_url"],
        "cancel_url": session["cancel_url"],
    }
    assert session["success_url"].endswith("/billing?card=saved")
    assert session["cancel_url"].endswith("/billing")
    assert team_row(app, team_id).stripe_customer_id == FakeStripe.CUSTOMER
    assert team_row(app, bystander).stripe_customer_id is None


def test_what_stripe_says_of_a_card_is_kept_to_the_columns_width(app, web, client, stripe_api):
    team_id = owner(app, web)
    web.post("/billing/card")
    stripe_api.CARD = {"brand": "b" * 40, "last4": "123456", "exp_month": 1, "exp_year": 2031}
    said = outcome(client, "checkout.session.completed", setup_completed(team_id))
    team = team_row(app, team_id)
    assert (team.card_brand, team.card_last4, team.card_expires) == ("b" * 32, "1234", "01/2031")
    assert said == f"card {'b' * 32} 1234 saved for team {team_id}"


def test_the_setup_intent_and_the_customer_are_asked_for_with_their_card(app, web, client, stripe_api):
    team_id = owner(app, web)
    web.post("/billing/card")
    outcome(client, "checkout.session.completed", setup_completed(team_id))
    ((params, _),) = stripe_api.called("GET", "/v1/setup_intents/seti_test_1")
    assert params == {"expand[0]": "payment_method"}
    changed = {"id": FakeStripe.CUSTOMER, "object": "customer", "invoice_settings": {}}
    assert outcome(client, "customer.updated", changed) == "no new default card"
    ((params, _),) = stripe_api.called("GET", f"/v1/customers/{FakeStripe.CUSTOMER}")
    assert params == {"expand[0]": "invoice_settings.default_payment_method"}


@pytest.mark.parametrize(
    ("status", "method", "said"),
    [
        ("requires_payment_method", "card", "setup intent seti_test_1 saved no card (requires_payment_method)"),
        ("succeeded", None, "setup intent seti_test_1 saved no card (succeeded)"),
        ("succeeded", "sepa_debit", "setup intent seti_test_1 saved no card (succeeded)"),
    ],
)
def test_a_setup_that_saved_no_card_keeps_nothing_and_says_so(app, web, client, stripe_api, status, method, said):
    team_id = owner(app, web)
    web.post("/billing/card")
    stripe_api.setup_status, stripe_api.setup_method = status, method
    assert outcome(client, "checkout.session.completed", setup_completed(team_id)) == said
    assert team_row(app, team_id).card_payment_method is None


def test_an_outcome_longer_than_its_column_is_kept_to_its_first_200_characters(app, web, client, stripe_api):
    # Stripe's ids run to 255 characters; the event row keeps what fits, the answer and the log say it all.
    team_id = owner(app, web)
    web.post("/billing/card")
    stripe_api.setup_status = "requires_payment_method"
    intent = "seti_" + "x" * 245
    response = deliver(
        client, stripe_event("checkout.session.completed", setup_completed(team_id, setup_intent=intent), "evt_long")
    )
    said = f"setup intent {intent} saved no card (requires_payment_method)"
    assert response.get_json()["outcome"] == said
    with app.app_context():
        assert db.session.get(StripeEvent, "evt_long").outcome == said[:200]


def test_a_customer_change_that_keeps_the_same_default_card_changes_nothing(app, web, client, stripe_api):
    team_id = owner(app, web)
    with_card(app, team_id)
    stripe_api.default_method = "pm_test_1"  # the team's card already
    changed = {"id": FakeStripe.CUSTOMER, "object": "customer", "invoice_settings": {}}
    assert outcome(client, "customer.updated", changed) == "no new default card"
    team = team_row(app, team_id)
    assert (team.card_payment_method, team.card_last4, team.card_saved_at) == ("pm_test_1", "4242", None)


@pytest.mark.parametrize(("created", "taken"), [(-1, False), (0, True), (2**37 - 1, True), (2**37, False)])
def test_a_setup_events_time_is_taken_within_the_years_a_date_holds(app, web, client, stripe_api, created, taken):
    team_id = owner(app, web)
    web.post("/billing/card")
    response = deliver(
        client, stripe_event("checkout.session.completed", setup_completed(team_id) | {"created": created})
    )
    if taken:
        assert response.get_json()["outcome"] == f"card visa 4242 saved for team {team_id}"
    else:
        assert (response.status_code, response.get_json()) == (400, {"detail": "Malformed event."})
        assert team_row(app, team_id).card_payment_method is None


def test_a_setup_with_no_setup_intent_customer_or_stripe_key_is_not_applied_and_says_why(
    app, web, client, make_app, stripe_api
):
    team_id = owner(app, web)
    web.post("/billing/card")
    # Stripe writes null; an event without the field at all is taken the same way (app/payments.py's OPTIONAL).
    intentless = setup_completed(team_id) | {"setup_intent": None}
    assert outcome(client, "checkout.session.completed", intentless) == ("setup session without a setup intent")
    del intentless["setup_intent"]
    assert outcome(client, "checkout.session.completed", intentless) == ("setup session without a setup intent")
    customerless = setup_completed(team_id)
    del customerless["customer"]
    assert outcome(client, "checkout.session.completed", customerless) == "a customer of no team of ours"
    modeless = checkout_session(team_id, session_id="cs_test_nobodys")
    del modeless["mode"]
    assert outcome(client, "checkout.session.completed", modeless) == "unknown checkout session"
    keyless = make_app(STRIPE_SECRET_KEY="")
    assert outcome(keyless.test_client(), "checkout.session.completed", setup_completed(team_id)) == (
        "not applied: STRIPE_SECRET_KEY is not set, so the card cannot be looked up"
    )
    assert team_row(app, team_id).card_payment_method is None


def test_a_setup_made_in_the_very_second_the_card_was_saved_is_not_older_and_is_applied(
    app, web, client, stripe_api, monkeypatch
):
    team_id = owner(app, web)
    web.post("/billing/card")
    saved_at = datetime(2026, 12, 4, 12, 0, 0, tzinfo=timezone.utc)
    monkeypatch.setattr(cards, "utcnow", lambda: saved_at)
    first = setup_completed(team_id, "cs_test_setup_1", "seti_first") | {"created": int(saved_at.timestamp()) - 60}
    outcome(client, "checkout.session.completed", first)
    assert team_row(app, team_id).card_saved_at == saved_at
    stripe_api.CARD = {"brand": "mastercard", "last4": "4444", "exp_month": 2, "exp_year": 2032}
    same_second = setup_completed(team_id, "cs_test_setup_2", "seti_second") | {"created": int(saved_at.timestamp())}
    assert outcome(client, "checkout.session.completed", same_second).startswith("card mastercard 4444 saved")
    assert team_row(app, team_id).card_last4 == "4444"


def test_a_card_event_of_a_customer_that_is_no_teams_any_more_saves_nothing(app, web, client, stripe_api):
    team_id = owner(app, web)
    web.post("/billing/card")

    def meanwhile(path):
        # While Stripe is asked for the card, the team's customer changes (another tab, the admin).
        if path.startswith("/v1/setup_intents"):
            with app.app_context():
                db.session.get(Team, team_id).stripe_customer_id = "cus_other"
                db.session.commit()

    stripe_api.meanwhile = meanwhile
    assert outcome(client, "checkout.session.completed", setup_completed(team_id)) == "a customer of no team of ours"
    assert team_row(app, team_id).card_payment_method is None
    stripe_api.meanwhile = None
    unknown = {"id": "cus_nobody", "object": "customer", "invoice_settings": {"default_payment_method": None}}
    assert outcome(client, "customer.updated", unknown) == "a customer of no team of ours"


def test_a_removed_card_pauses_only_an_automatic_top_up_that_is_on(app, web, client, stripe_api):
    unknown = {"id": "pm_unknown", "object": "payment_method", "type": "card", "customer": None}
    assert outcome(client, "payment_method.detached", unknown) == "not a saved card"

    team_id = owner(app, web)
    with_card(app, team_id)  # automatic top-up off
    detached = {"id": "pm_test_1", "object": "payment_method", "type": "card", "customer": None}
    assert outcome(client, "payment_method.detached", detached) == f"card of team {team_id} removed"
    team = team_row(app, team_id)
    assert team.card_payment_method is None and team.auto_topup_paused is None
    assert factories.mails(app, OWNER, "auto_topup_paused") == []


def test_a_receipt_is_asked_for_with_its_charge_expanded(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    buy(app)
    succeeded(client, queued)
    assert web.get(f"/billing/payments/{queued.id}/document").headers["Location"].endswith("/receipts/pi_auto_1")
    ((params, _),) = stripe_api.called("GET", "/v1/payment_intents/pi_auto_1")
    assert params == {"expand[0]": "latest_charge"}
    # Invoiced, but Stripe's answer has no hosted page for it (yet): the receipt still opens.
    with app.app_context():
        db.session.get(Payment, queued.id).invoice_id = "in_test_9"
        db.session.commit()
    stripe_api.invoice_hosted = False
    assert web.get(f"/billing/payments/{queued.id}/document").headers["Location"].endswith("/receipts/pi_auto_1")
    assert len(stripe_api.called("GET", "/v1/invoices/in_test_9")) == 1


@pytest.mark.parametrize(
    "moment, following",
    [
        (datetime(2026, 1, 31, 23, 59), datetime(2026, 2, 1)),
        (datetime(2026, 11, 15, 8), datetime(2026, 12, 1)),
        (datetime(2026, 12, 1), datetime(2027, 1, 1)),
        (datetime(2026, 12, 31, 23, 59, 59), datetime(2027, 1, 1)),
    ],
)
def test_a_monthly_cap_ends_on_the_first_of_the_next_month(moment, following):
    assert autotopup.next_month(moment) == following


def test_turning_off_calls_off_only_this_teams_top_up_that_was_never_sent(app, web, stripe_api, caplog):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    # An older top-up of the team that a day called off keeps its own reason.
    a_day_passes(app, queued.id)
    assert buy(app) == {"called off": 1}
    with app.app_context():
        team = db.session.get(Team, team_id)
        team.auto_topup_pending = False
        db.session.commit()
    web.post("/billing/automatic", {"below": 5_000, "pack": "starter", "monthly_limit": 5})
    (_, waiting) = automatic(app, team_id)
    web.post("/logout")
    (theirs,) = automatic(app, turned_on(app, web, credits=100, email="other@example.com"))

    web.post("/logout")
    web.login(OWNER)
    web.get("/billing")
    assert web.post("/billing/automatic", {"action": "off"}).status_code == 302
    with app.app_context():
        rows = {p.id: (p.status, p.failure) for p in db.session.scalars(select(Payment))}
    assert rows[queued.id] == (PaymentStatus.EXPIRED, "Called off: not sent within a day.")
    turned_off = "Called off: automatic top-up was turned off before it was sent."
    assert rows[waiting.id] == (PaymentStatus.EXPIRED, turned_off)
    assert rows[theirs.id] == (PaymentStatus.QUEUED, None)
    assert not team_row(app, team_id).auto_topup_pending


def test_the_admin_console_says_since_when_automatic_top_up_is_paused(app, web, runner, stripe_api, caplog):
    caplog.set_level(logging.WARNING)
    stripe_api.intent_outcome = "declined"
    team_id = turned_on(app, web, credits=100)
    buy(app)
    paused_at = team_row(app, team_id).auto_topup_paused_at
    assert paused_at is not None
    runner.invoke(args=["users", "create", "boss@example.com", "--password", "correct horse battery"])
    runner.invoke(args=["users", "admin", "boss@example.com", "--on"])
    operator = factories.WebClient(app.test_client())
    operator.login("boss@example.com")
    page = operator.get(f"/admin/teams/{team_id}").get_data(as_text=True)
    assert f"since {paused_at.strftime('%Y-%m-%d %H:%M')} UTC: Your card has insufficient funds." in page
    assert PaymentKind.AUTOMATIC in page


def test_a_top_up_tried_before_turning_off_that_then_fails_is_still_told(app, web, stripe_api):
    stripe_api.intent_outcome = "down"
    team_id = turned_on(app, web, credits=100)
    assert buy(app) == {"later": 1}  # tried: it may have reached Stripe, so turning off leaves it in flight
    assert web.post("/billing/automatic", {"action": "off"}).status_code == 302
    (waiting,) = automatic(app, team_id)
    assert waiting.status == PaymentStatus.QUEUED
    with app.app_context():
        db.session.get(Payment, waiting.id).next_attempt_at = waiting.created_at
        db.session.commit()
    stripe_api.intent_outcome = "declined"
    assert buy(app) == {"failed": 1}
    (notice,) = factories.mails(app, OWNER, "auto_topup_paused")
    assert "Your card has insufficient funds." in notice.body


def test_a_removed_card_tells_which_team_stopped_and_asks_no_one_to_confirm_a_payment(app, web, client, stripe_api):
    team_id = turned_on(app, web, credits=20_000)
    detached = {"id": "pm_test_1", "object": "payment_method", "type": "card", "customer": None}
    said = outcome(client, "payment_method.detached", detached)
    assert said == f"card of team {team_id} removed; automatic top-up paused"
    (notice,) = factories.mails(app, OWNER, "auto_topup_paused")
    assert notice.subject == "Automatic top-up is paused for Personal"
    assert "Automatic top-up for Personal has stopped:\n\n  The saved card was removed." in notice.body
    assert "confirm" not in notice.body and "charged" not in notice.body


@pytest.mark.parametrize(
    "latest_charge",
    [
        None,  # no charge yet (the intent is still processing)
        {"id": "ch_auto_1", "object": "charge"},  # a charge without its receipt yet
        "ch_auto_1",  # a charge Stripe did not expand
    ],
    ids=["no charge", "no receipt", "not expanded"],
)
def test_a_payment_with_no_receipt_yet_says_so_and_links_nowhere(app, web, client, stripe_api, latest_charge):
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    buy(app)
    succeeded(client, queued)
    stripe_api.latest_charge = latest_charge
    answer = web.get(f"/billing/payments/{queued.id}/document")
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/billing")
    assert "Stripe has no invoice or receipt for this payment yet." in web.get("/billing").get_data(as_text=True)


def test_the_first_customer_written_for_a_team_is_kept(app, web, stripe_api):
    # Two tabs save a card at once: the other's Customer is written while Stripe answers this one.
    team_id = owner(app, web)

    def meanwhile(path):
        if path == "/v1/customers":
            with app.app_context():
                db.session.get(Team, team_id).stripe_customer_id = "cus_first"
                db.session.commit()

    stripe_api.meanwhile = meanwhile
    assert web.post("/billing/card").status_code == 303
    assert team_row(app, team_id).stripe_customer_id == "cus_first"
    ((session, _),) = stripe_api.called("POST", "/v1/checkout/sessions")
    assert session["customer"] == "cus_first"


def test_a_card_saved_just_as_the_old_one_is_removed_is_kept(postgres_only, app, web, client, stripe_api, monkeypatch):
    # On PostgreSQL (on SQLite the webhook holds the whole database): the detach event finds the team by
    # its old card; before it takes the team's row, another request saves a new card. The new card
    # stays, and automatic top-up is not paused.
    team_id = turned_on(app, web, credits=20_000)
    original = Session.refresh

    def refresh(session, instance, *args, **kwargs):
        if isinstance(instance, Team) and kwargs.get("with_for_update"):
            monkeypatch.setattr(Session, "refresh", original)
            with app.app_context():
                db.session.get(Team, team_id).card_payment_method = "pm_new"
                db.session.commit()
        return original(session, instance, *args, **kwargs)

    monkeypatch.setattr(Session, "refresh", refresh)
    detached = {"id": "pm_test_1", "object": "payment_method", "type": "card", "customer": None}
    assert outcome(client, "payment_method.detached", detached) == "not the saved card any more"
    team = team_row(app, team_id)
    assert (team.card_payment_method, team.auto_topup_paused) == ("pm_new", None)
    assert factories.mails(app, OWNER, "auto_topup_paused") == []


def test_a_pack_no_longer_sold_pauses_automatic_top_up_and_says_which(app, web, caplog):
    team_id = turned_on(app, web, credits=5_010)
    settings = app.extensions["settings"]
    app.extensions["settings"] = dataclasses.replace(
        settings, credit_packs=[pack for pack in settings.credit_packs if pack.id != "starter"]
    )
    spend(app, team_id, 20)  # crosses the threshold
    assert automatic(app, team_id) == []
    team = team_row(app, team_id)
    assert team.auto_topup_paused == "The pack 'starter' is not sold any more: choose another."
    assert team.auto_topup_paused_at is not None
    warned = [r.getMessage() for r in caplog.records if r.name == "app.autotopup" and r.levelno == logging.WARNING]
    assert warned == [f"team {team_id}: automatic top-up pack 'starter' is not sold any more; paused"]


CHANGES = ["turn on", "turn off", "keep a card", "remove the card", "fail a top-up"]


def team_with(make_app, change: str) -> tuple:
    """An app and a team with a card and automatic top-up on, ready for `change` (a top-up queued to fail)."""
    app = make_app()
    team_id = turned_on(app, factories.WebClient(app.test_client()), credits=20_000)
    if change == "fail a top-up":
        spend(app, team_id, 15_001)  # queues one
    return app, team_id


def make(change: str, team_id: int) -> None:
    """One change to the team's card or automatic top-up, in the current session, not committed."""
    team = db.session.get(Team, team_id)
    if change == "turn on":
        person = db.session.get(
            User, db.session.scalar(select(Membership.user_id).where(Membership.team_id == team_id))
        )
        assert autotopup.turn_on(team, person, autotopup.Settings(6_000, "pro", 5)) is None
    elif change == "turn off":
        autotopup.turn_off(team)
    elif change == "keep a card":
        card = SimpleNamespace(brand="visa", last4="1111", exp_month=1, exp_year=2031)
        cards._keep(team, SimpleNamespace(id="pm_new", card=card))
    elif change == "remove the card":
        cards.removed(SimpleNamespace(id="pm_test_1"))
    else:
        (payment,) = db.session.scalars(select(Payment).where(Payment.team_id == team_id)).all()
        assert card_payments.failed(payment, PaymentStatus.FAILED, "Declined.")


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_to_a_teams_card_or_automatic_top_up_holds_its_row_so_a_debit_waits(make_app, postgres_only, change):
    """A debit of the team while the change is open (which may queue a top-up by the settings it changes) waits
    for it (PostgreSQL: on SQLite any write holds the whole database)."""
    app, team_id = team_with(make_app, change)
    failures = second_waits_for_first(
        app.app_context, lambda: make(change, team_id), lambda: spend(app, team_id, 10), "a debit"
    )
    assert failures == []


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_to_a_teams_card_or_automatic_top_up_holds_its_row_from_the_read_it_decides_on(make_app, change):
    """Each decides by what it reads of the team (the balance, a pending top-up, the card it still has): that read
    is made under the hold, on both databases, so no debit slips between the read and the write. (On SQLite the
    driver reads outside any transaction until the first write: a SELECT … FOR UPDATE there holds nothing.)"""
    app, team_id = team_with(make_app, change)
    free = []

    def probe(team, _context, attributes):
        # A whole read of the row (not a query filling in what an earlier one left unloaded).
        if team.id == team_id and attributes is None:
            free.append(another_writer_could_go_ahead("teams", team_id))

    event.listen(Team, "refresh", probe)
    try:
        with app.app_context():
            make(change, team_id)
            db.session.rollback()
    finally:
        event.remove(Team, "refresh", probe)
    assert free and not any(free)


def test_the_monthly_cap_counts_this_teams_top_ups_made_or_on_their_way_from_the_months_first_instant(app, web):
    team_id = owner(app, web)
    other = other_team(app, web)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    now = start + timedelta(days=3, microseconds=500_000)
    with app.app_context():

        def made(team, created_at, status=PaymentStatus.PAID, kind=PaymentKind.AUTOMATIC):
            factories.starter_payment(team, None, kind=kind, status=status, created_at=created_at)

        made(team_id, start)  # the month's first instant: counted
        made(team_id, start - timedelta(microseconds=1))  # last month's
        made(team_id, now, PaymentStatus.FAILED)  # not made
        made(team_id, now, PaymentStatus.PAID, PaymentKind.CHECKOUT)  # bought by hand
        made(other, now, PaymentStatus.QUEUED)  # another team's, in flight
        db.session.commit()
        assert autotopup.counted_this_month(team_id, now) == 1
        assert autotopup.in_flight(team_id) is None  # the other team's is not this one's


def test_the_settings_are_checked_whoever_gives_them(app):
    # The form checks them too; the rule itself is the module's, and its words are what the page shows.
    threshold = "The threshold must be a whole number of credits, at least 1."
    pack = "Choose one of the credit packs."
    cap = f"The monthly cap must be between 1 and {autotopup.MONTHLY_LIMIT_MAX} top-ups."
    with app.app_context():
        for below, pack_name, monthly_limit in [(1, "starter", 1), (10**12, "pro", autotopup.MONTHLY_LIMIT_MAX)]:
            settings = autotopup.check(below, pack_name, monthly_limit)
            assert settings == autotopup.Settings(below, pack_name, monthly_limit)
        refused = [
            *[((below, "starter", 1), threshold) for below in (None, 0, 10**12 + 1)],
            *[((1, name, 1), pack) for name in (None, "", "gold")],
            *[((1, "starter", limit), cap) for limit in (None, 0, autotopup.MONTHLY_LIMIT_MAX + 1)],
        ]
        for given, words in refused:
            with pytest.raises(autotopup.NotAllowed) as refusal:
                autotopup.check(*given)
            assert str(refusal.value) == words, given


def test_turning_off_leaves_a_top_up_its_webhook_already_credited_as_it_is(app, web, client, stripe_api):
    # Stripe's event came before any buyer sent it (attempts 0): paid, and turning off changes nothing of it.
    team_id = turned_on(app, web, credits=100)
    (queued,) = automatic(app, team_id)
    succeeded(client, queued)
    assert web.post("/billing/automatic", {"action": "off"}).status_code == 302
    (paid,) = automatic(app, team_id)
    assert (paid.status, paid.attempts, paid.failure) == (PaymentStatus.PAID, 0, None)
    assert factories.balance(app, team_id) == 10_100
