"""Operator commands: `flask users …`, `flask credits …`, `flask keys …`."""

import click
from flask import Flask
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from app import accounts, billing, card_payments, config, keys, liveness, mail, metering, services, teams
from app.audit import audit
from app.extensions import db
from app.forms import MIN_PASSWORD
from app.models import ApiKey, LedgerEntry, LoginSession, User, utcnow
from app.samples import samples_cli

users_cli = AppGroup("users", help="Customer accounts.")
mail_cli = AppGroup("mail", help="Outgoing email (the outbox).")
credits_cli = AppGroup("credits", help="Grant or deduct credits (ledgered, with a reason).")
keys_cli = AppGroup("keys", help="API keys.")
speech_cli = AppGroup("speech", help="Metered speech requests.")


def _user(email: str) -> User:
    user = accounts.find_by_email(email)
    if user is None:
        raise click.ClickException(f"No user with email {email!r}.")
    return user


def _key(key_id: int) -> ApiKey:
    key = db.session.get(ApiKey, key_id)
    if key is None:
        raise click.ClickException(f"No API key with id {key_id}.")
    return key


@users_cli.command("create")
@click.argument("email")
@click.option("--password", help="Lets the user sign in to the dashboard. Prompted for if --prompt is given.")
@click.option("--prompt", is_flag=True, help="Ask for the password without echoing it.")
@click.option("--unlimited", is_flag=True, help="Never debit this account.")
@click.option("--admin", is_flag=True)
def create_user(email, password, prompt, unlimited, admin):
    """Create a user account."""
    if prompt:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        user = accounts.create_user(email, password)
        teams.personal(user).unlimited = unlimited
        user.is_admin = admin
        # The operator vouches for the address: the account can create keys and buy at once.
        user.email_verified_at = utcnow()
        db.session.commit()
    except accounts.AccountError as error:
        raise click.ClickException(str(error)) from None
    except IntegrityError:
        db.session.rollback()
        raise click.ClickException("An account with that email already exists.") from None
    click.echo(f"Created user {user.id} <{user.email}>.")


@users_cli.command("set-password")
@click.argument("email")
def set_password(email):
    """Set an account's password (prompted, not echoed); every sign-in of the account ends."""
    user = _user(email)
    password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD:
        raise click.ClickException(f"Use at least {MIN_PASSWORD} characters. Nothing changed.")
    accounts.set_password(user, password)
    ended = db.session.execute(delete(LoginSession).where(LoginSession.user_id == user.id)).rowcount
    db.session.commit()
    click.echo(f"Password set for {user.email}; {ended} sign-in(s) ended.")


@users_cli.command("admin")
@click.argument("email")
@click.option("--on/--off", "enabled", default=True, help="Give (default) or take away the admin console.")
def set_admin(email, enabled):
    """Let an account use the admin console (/admin), or stop it."""
    _set_flag(email, "is_admin", enabled, "an admin")


def _set_flag(email: str, flag: str, enabled: bool, what: str) -> None:
    user = _user(email)
    setattr(user, flag, enabled)
    db.session.commit()
    click.echo(f"{user.email} is {'now' if enabled else 'no longer'} {what}.")


@users_cli.command("show")
@click.argument("email")
@click.option("--limit", default=20, show_default=True, help="How many ledger entries to list.")
def show_user(email, limit):
    """Print the balance, keys and latest ledger entries of a user's personal team."""
    user = _user(email)
    team = teams.personal(user)
    click.echo(f"User {user.id} <{user.email}>, personal team {team.id}")
    click.echo(f"Balance: {team.balance} credits" + (" (unlimited)" if team.unlimited else ""))
    for key in db.session.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.id)):
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked else "active"
        used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
        click.echo(f"Key {key.id}: {key.prefix}… {key.name or '(no name)'} · {state} · last used {used}")
    entries = db.session.scalars(
        select(LedgerEntry).where(LedgerEntry.team_id == team.id).order_by(LedgerEntry.id.desc()).limit(limit)
    ).all()
    click.echo("Ledger (newest first):" if entries else "Ledger: empty")
    for entry in entries:
        click.echo(
            f"  {entry.created_at:%Y-%m-%d %H:%M:%S}  {entry.kind:<10} {entry.amount:>+10}  "
            f"→ {entry.balance_after:>10}  {entry.note or ''}"
        )


@users_cli.command("unlimited")
@click.argument("email")
@click.option("--on/--off", "enabled", default=True, help="Set (default) or clear the unlimited flag.")
def set_unlimited(email, enabled):
    """Set or clear the unlimited flag of a user's personal team."""
    team = teams.personal(_user(email))
    team.unlimited = enabled
    db.session.commit()
    click.echo(f"{email} is {'now' if enabled else 'no longer'} unlimited.")


@credits_cli.command("grant")
@click.argument("email")
@click.argument("amount", type=click.IntRange(min=1))
@click.option("--reason", required=True, help="Recorded in the ledger.")
def grant_credits(email, amount, reason):
    """Add AMOUNT credits to the balance of a user's personal team."""
    balance = billing.grant(teams.personal(_user(email)), amount, reason)
    db.session.commit()
    click.echo(f"Granted {amount} credits to {email}; balance is now {balance}.")


@credits_cli.command("deduct")
@click.argument("email")
@click.argument("amount", type=click.IntRange(min=1))
@click.option("--reason", required=True, help="Recorded in the ledger.")
def deduct_credits(email, amount, reason):
    """Take AMOUNT credits from the balance of a user's personal team (never below zero)."""
    try:
        balance = billing.deduct(teams.personal(_user(email)), amount, reason)
    except billing.InsufficientCredits as short:
        db.session.rollback()
        raise click.ClickException(f"Balance is {short.balance}; cannot deduct {amount}. Nothing changed.") from None
    db.session.commit()
    click.echo(f"Deducted {amount} credits from {email}; balance is now {balance}.")


@keys_cli.command("create")
@click.argument("email")
@click.option("--name", default="", help="A label for the key.")
def create_key(email, name):
    """Create an API key of a user's personal team; the secret is printed once and never stored."""
    user = _user(email)
    key, secret = keys.create_key(teams.personal(user), user, name)
    db.session.commit()
    click.echo(f"Created key {key.id} ({key.prefix}…) for {email}. Copy it now, it is not shown again:")
    click.echo(secret)


@keys_cli.command("revoke")
@click.argument("key_id", type=int)
def revoke_key(key_id):
    """Revoke an API key by id (see `flask users show`)."""
    key = _key(key_id)
    if not keys.revoke(key):
        raise click.ClickException(f"Key {key_id} was already revoked.")
    db.session.commit()
    click.echo(f"Revoked key {key_id} ({key.prefix}…).")


@speech_cli.command("settle")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds without progress before a request of a dead process is settled (default STALE_CHARGE_SECONDS; "
    "at least PROCESS_LEASE_SECONDS).",
)
def settle_speech(older_than):
    """Settle requests a dead gateway process left charged. Safe from cron, and beside live traffic.

    Only requests whose gateway process is gone (its lease ran out) and that show no progress
    for the given time are touched; a live process's stream is never settled, however long
    its reader pauses. Each is refunded for the audio its last recorded progress does not
    cover, as when an upstream breaks off.
    """
    settings = config.current()
    age = settings.stale_charge_seconds if older_than is None else older_than
    if age < settings.process_lease_seconds:
        raise click.BadParameter(liveness.too_short(age, settings.process_lease_seconds), param_hint="--older-than")
    done = metering.settle_stale(age)
    click.echo(
        f"{done.found} requests of gone processes without progress for over {age:g} s; settled {done.settled}, "
        f"refunding {done.credits} credits."
    )


@click.command("audit")
@with_appcontext
def audit_books():
    """Check the books; exit 1 and list the offenders when anything is off."""
    report = audit()
    summary = ", ".join(f"{count} {name}" for name, count in report.checked.items())
    for notice in report.notices:
        click.echo(f"notice: {notice}", err=True)
    if report.problems:
        for problem in report.problems:
            click.echo(problem, err=True)
        click.echo(f"AUDIT FAILED: {len(report.problems)} problems in {summary}.", err=True)
        raise SystemExit(1)
    click.echo(f"Audit passed: {summary}.")


@mail_cli.command("send")
@click.option("--once", is_flag=True, help="Send what is due now and exit (for cron), instead of running on.")
def send_mail(once):
    """Send the outbox's due mail: on and on (a service of its own, with MAIL_WORKER=false), or --once."""
    if once:
        outcome = mail.deliver_due(config.current())
        click.echo(f"sent {outcome['sent']}, to retry {outcome['retry']}, failed {outcome['failed']}")
        return
    click.echo(f"Sending mail every {config.current().mail_poll_seconds} s; Ctrl+C stops.")
    services.postman().run()


topups_cli = AppGroup("topups", help="Automatic top-ups: pay the queued ones with each team's saved card.")


@topups_cli.command("buy")
@click.option("--once", is_flag=True, help="Pay what is due now and exit (for cron), instead of running on.")
def buy_topups(once):
    """Pay the queued automatic top-ups at Stripe and make their invoices: on and on (a service of its own,
    with TOPUP_WORKER=false), or --once."""
    client = services.stripe_client()
    if client is None:
        raise click.ClickException("STRIPE_SECRET_KEY is not set: automatic top-ups cannot be paid.")
    if once:
        bought, invoiced = card_payments.buy_due(client), card_payments.invoice_due(client)
        click.echo(
            f"sent {bought['sent']}, failed {bought['failed']}, to retry {bought['later']};"
            f" invoiced {invoiced['invoiced']}"
        )
        return
    click.echo(f"Paying automatic top-ups every {config.current().topup_poll_seconds} s; Ctrl+C stops.")
    services.buyer().run()


def register_commands(app: Flask) -> None:
    for group in (users_cli, credits_cli, keys_cli, speech_cli, mail_cli, topups_cli):
        app.cli.add_command(group)
    app.cli.add_command(samples_cli)
    app.cli.add_command(audit_books)
