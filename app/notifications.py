"""Mail that money events cause, queued in the transaction of the event by a step billing does not know of.

billing and payments note what happened in the session (`billing.tell`: a balance that fell below
its alert threshold, a payment credited, a payment refunded or disputed); before that transaction
commits, this step queues the mail for each, to the team's owners, admins and billing people, with
its links to the dashboard. So the modules that
own the books import neither mail nor the web layer's endpoint names, and each mail still lands or
goes with the money event that caused it.
"""

from flask_sqlalchemy.session import Session
from sqlalchemy import event

from app import billing, mail, teams
from app.urls import external_url

# The dashboard's pages each kind of mail links to, by the name its template uses ("#…": a place on the page).
LINKS = {
    "low_balance": {"billing_url": "dashboard.billing_page", "account_url": "dashboard.account"},
    "receipt": {"billing_url": "dashboard.billing_page"},
    "reversal": {"billing_url": "dashboard.billing_page"},
    "auto_topup_paused": {"billing_url": "dashboard.billing_page", "card_url": "dashboard.billing_page#card"},
}


def _link(target: str) -> str:
    endpoint, _, place = target.partition("#")
    return external_url(endpoint) + (f"#{place}" if place else "")


def _links(kind: str, facts: dict) -> dict:
    links = {name: _link(target) for name, target in LINKS[kind].items()}
    payment = facts.get("payment")
    if payment is not None:
        # The payment's invoice or receipt at Stripe, through the page that looks it up when followed.
        links["document_url"] = external_url("dashboard.payment_document", payment_id=payment.id)
    return links


@event.listens_for(Session, "before_commit")
def _queue_money_mail(session):
    for kind, team_id, facts in session.info.pop(billing.TOLD, ()):
        links = _links(kind, facts)
        for person in teams.billing_people(team_id):
            mail.notify(person, kind, **facts, **links)


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back_events(session, _previous_transaction):
    session.info.pop(billing.TOLD, None)
