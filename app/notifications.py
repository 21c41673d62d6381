"""Mail that money events cause, queued in the transaction of the event by a step billing does not know of.

billing notes what happened in the session (`billing.CROSSED`: a balance that fell below its
alert threshold, once per arming); before that transaction commits, this step queues the mail for
each, with its links to the dashboard. So the module that owns the books imports neither mail nor
the web layer's endpoint names, and the mail still lands or goes with the debit that caused it.
"""

from flask_sqlalchemy.session import Session
from sqlalchemy import event

from app import billing, mail
from app.models import User
from app.urls import external_url


@event.listens_for(Session, "before_commit")
def _queue_money_mail(session):
    for user_id, balance, threshold in session.info.pop(billing.CROSSED, ()):
        mail.notify(
            session.get(User, user_id),
            "low_balance",
            balance=balance,
            threshold=threshold,
            billing_url=external_url("dashboard.billing_page"),
            account_url=external_url("dashboard.account"),
        )


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back_events(session, _previous_transaction):
    session.info.pop(billing.CROSSED, None)
