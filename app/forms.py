"""Dashboard forms (Flask-WTF: every one carries a CSRF token)."""

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, HiddenField, PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, Optional, Regexp

from app.accounts import EMAIL_PATTERN

MIN_PASSWORD = 10


class SignupForm(FlaskForm):
    email = EmailField(
        "Email",
        validators=[DataRequired(), Length(max=254), Regexp(EMAIL_PATTERN, message="Enter a valid email address.")],
    )
    password = PasswordField(
        "Password",
        validators=[
            DataRequired(),
            Length(min=MIN_PASSWORD, max=200, message=f"Use at least {MIN_PASSWORD} characters."),
        ],
    )
    confirm = PasswordField(
        "Repeat password", validators=[DataRequired(), EqualTo("password", message="The passwords do not match.")]
    )


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired(), Length(max=200)])
    password = PasswordField(
        "New password",
        validators=[
            DataRequired(),
            Length(min=MIN_PASSWORD, max=200, message=f"Use at least {MIN_PASSWORD} characters."),
        ],
    )
    confirm = PasswordField(
        "Repeat new password", validators=[DataRequired(), EqualTo("password", message="The passwords do not match.")]
    )


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
