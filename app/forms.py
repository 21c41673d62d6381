"""Dashboard forms (Flask-WTF: every one carries a CSRF token)."""

import unicodedata

from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    DateTimeLocalField,
    EmailField,
    HiddenField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, EqualTo, Length, NumberRange, Optional, ValidationError

from app.accounts import AccountError, parse_email
from app.models import KeyKind, LimitPeriod, TeamRole

MIN_PASSWORD = 10


def new_password(label: str) -> PasswordField:
    return PasswordField(
        label,
        validators=[
            DataRequired(),
            Length(min=MIN_PASSWORD, max=200, message=f"Use at least {MIN_PASSWORD} characters."),
        ],
    )


def repeated(label: str) -> PasswordField:
    return PasswordField(label, validators=[DataRequired(), EqualTo("password", message="The passwords do not match.")])


def one_plain_address(form, field) -> None:
    """The field holds one plain email address, as accounts.parse_email reads it (which says what is wrong)."""
    try:
        parse_email(field.data)
    except AccountError as error:
        raise ValidationError(str(error)) from None


def email_field(label: str) -> EmailField:
    return EmailField(label, validators=[DataRequired(), Length(max=254), one_plain_address])


def current_password() -> PasswordField:
    return PasswordField("Current password", validators=[DataRequired(), Length(max=200)])


class SignupForm(FlaskForm):
    email = email_field("Email")
    password = new_password("Password")
    confirm = repeated("Repeat password")


class PasswordForm(FlaskForm):
    current = current_password()
    password = new_password("New password")
    confirm = repeated("Repeat new password")


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])
    remember = BooleanField("Keep me signed in")


class KeyForm(FlaskForm):
    name = StringField("Name (optional)", validators=[Optional(), Length(max=100)])
    # Management keys: only for those who manage every key of the team (the view checks the role).
    kind = SelectField(
        "Kind",
        choices=[
            SelectChoice(KeyKind.SPEECH.value, "Speech"),
            SelectChoice(KeyKind.MANAGEMENT.value, "Management (the key API)"),
        ],
        default=KeyKind.SPEECH.value,
    )


class KeyControlsForm(FlaskForm):
    """A key's name and controls; app/keys.py reads and checks the values (read_controls)."""

    name = StringField("Name", validators=[Optional(), Length(max=100)])
    spend_limit = IntegerField("Spending limit (credits)", validators=[Optional(), NumberRange(min=0)])
    spend_period = SelectField(
        "Limit period",
        choices=[
            SelectChoice("", "No limit"),
            SelectChoice(LimitPeriod.DAY.value, "Per day (UTC)"),
            SelectChoice(LimitPeriod.WEEK.value, "Per week (from Monday, UTC)"),
            SelectChoice(LimitPeriod.MONTH.value, "Per month (UTC)"),
            SelectChoice(LimitPeriod.LIFETIME.value, "In all (the key's lifetime)"),
        ],
    )
    # Browsers send minutes, or seconds when the field was given them.
    expires_at = DateTimeLocalField(
        "Expires (UTC, optional)", validators=[Optional()], format=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
    )
    allowed_ips = TextAreaField("Allowed addresses (IPs or CIDR ranges; empty: any)", validators=[Length(max=4000)])
    allowed_voices = StringField("Allowed voices (empty: any)", validators=[Length(max=4000)])
    allowed_models = StringField("Allowed models (empty: any)", validators=[Length(max=4000)])


class RollForm(FlaskForm):
    grace = SelectField(
        "The current secret keeps working for",
        choices=[
            SelectChoice("0", "No time: it stops now"),
            SelectChoice("3600", "1 hour"),
            SelectChoice("86400", "1 day"),
            SelectChoice("259200", "3 days"),
            SelectChoice("604800", "7 days"),
        ],
        default="86400",
    )


class ConfirmForm(FlaskForm):
    """A button and its CSRF token: revoke, sign out."""


class BuyForm(FlaskForm):
    pack = HiddenField(validators=[DataRequired()])


class AutoTopupForm(FlaskForm):
    """Automatic top-up's settings; the pack's choices are the packs on sale (set by the view)."""

    below = IntegerField(
        "Threshold (credits)",
        validators=[NumberRange(min=1, max=10**12, message="Enter a whole number of credits, at least 1.")],
    )
    pack = SelectField("Pack to buy", choices=[])
    monthly_limit = IntegerField(
        "Most top-ups a month",
        validators=[NumberRange(min=1, max=100, message="Enter a number from 1 to 100.")],
        default=5,
    )


class ForgotForm(FlaskForm):
    email = email_field("Email")


class ResetForm(FlaskForm):
    password = new_password("New password")
    confirm = repeated("Repeat new password")


class EmailForm(FlaskForm):
    email = email_field("New email")
    current = current_password()


class AlertForm(FlaskForm):
    threshold = IntegerField(
        "Email me when my balance falls below (credits; 0 turns the alert off)",
        validators=[NumberRange(min=0, max=10**12, message="Enter a whole number of credits, 0 or more.")],
    )


class DeleteForm(FlaskForm):
    current = current_password()
    understood = BooleanField(
        "I understand: my keys stop working, my remaining credits are forfeited and this cannot be undone.",
        validators=[DataRequired(message="Tick the box to confirm.")],
    )


def role_field(label: str = "Role") -> SelectField:
    """A team role; the view narrows `choices` to the roles its user may give."""
    return SelectField(label, choices=role_choices(list(TeamRole)))


def role_choices(roles) -> list[SelectChoice]:
    return [SelectChoice(role.value, role.value.capitalize()) for role in roles]


def one_line_of_text(form, field) -> None:
    """Text shown in page headers and mail subjects: no line break, control or formatting character
    (a right-to-left override would reverse how the rest reads)."""
    if any(unicodedata.category(character).startswith("C") for character in field.data or ""):
        raise ValidationError("Use one line of plain text: no line breaks, control or formatting characters.")


class TeamForm(FlaskForm):
    name = StringField("Team name", validators=[DataRequired(), Length(max=100), one_line_of_text])


class SwitchTeamForm(FlaskForm):
    team = IntegerField(validators=[DataRequired()])


class InviteForm(FlaskForm):
    email = email_field("Email")
    role = role_field()


class RoleForm(FlaskForm):
    role = role_field("New role")


class JoinForm(FlaskForm):
    """An account made from an invitation's link: its address is the invitation's."""

    password = new_password("Password")
    confirm = repeated("Repeat password")
