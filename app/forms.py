"""Dashboard forms (Flask-WTF: every one carries a CSRF token)."""

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, HiddenField, PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, Optional, Regexp

from app.accounts import EMAIL_PATTERN

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


class SignupForm(FlaskForm):
    email = EmailField(
        "Email",
        validators=[DataRequired(), Length(max=254), Regexp(EMAIL_PATTERN, message="Enter a valid email address.")],
    )
    password = new_password("Password")
    confirm = repeated("Repeat password")


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired(), Length(max=200)])
    password = new_password("New password")
    confirm = repeated("Repeat new password")


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])
    remember = BooleanField("Keep me signed in")


class KeyForm(FlaskForm):
    name = StringField("Name (optional)", validators=[Optional(), Length(max=100)])


class ConfirmForm(FlaskForm):
    """A button and its CSRF token: revoke, sign out."""


class BuyForm(FlaskForm):
    pack = HiddenField(validators=[DataRequired()])
