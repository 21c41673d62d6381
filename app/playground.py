"""The playground: a signed-in customer hears a voice without writing code.

Metered exactly as `POST /v1/audio/speech`: the same checks, charge, relay and
settlement (app/speech.py), the same usage row, with no API key (the usage pages show
it as the playground's). The page's script posts JSON with the CSRF token in a header
and plays the audio as it streams in.
"""

import math
import threading
import time
from itertools import groupby

from babel import Locale
from flask import Blueprint, abort, current_app, render_template, request
from flask_login import current_user, login_required

from app import catalog, config, services, speech
from app import samples as kept_samples
from app.dashboard import can, current_team, team_permission
from app.errors import ApiError
from app.teams import Permission

bp = Blueprint("playground", __name__, url_prefix="/playground")

# Formats a browser's <audio> plays (raw pcm has no header to play it by).
PLAYABLE = ("mp3", "opus", "aac", "flac", "wav")


def language_name(code: str | None) -> str:
    """ "en-gb" → "English (United Kingdom)", by Babel's locale data; unknown codes as they are."""
    if not code:
        return "Other"
    try:
        return Locale.parse(code, sep="-").get_display_name("en")
    except (ValueError, TypeError):
        return code


# Pages that name a voice's language (the landing page's players) use the same words.
bp.add_app_template_filter(language_name)


def voice_groups() -> list[tuple[str, list[dict]]] | None:
    """The upstream's voices by language, each with its speaker's gender; None when the catalog is unreachable."""
    known = speech.upstream_catalog()
    if known is None:
        return None
    voices = sorted(
        (catalog.describe(voice) for voice in known.voices),
        key=lambda voice: (language_name(voice["language"]), voice["name"]),
    )
    return [(language, list(members)) for language, members in groupby(voices, lambda v: language_name(v["language"]))]


@bp.get("")
@login_required
@team_permission(Permission.SPEND)
def page():
    return render_template(
        "dashboard/playground.html",
        groups=voice_groups(),
        formats=PLAYABLE,
        default_voice=speech.DEFAULT_VOICE,
        max_chars=config.current().max_input_chars,
    )


@bp.post("/speech")
@login_required
def speak():
    """The playground's speech request: JSON in, audio out, errors as `{"detail": …}` (as under /v1)."""
    received = time.monotonic()
    if not current_user.verified:
        raise ApiError(403, "Confirm your email first: open the link we mailed you.", code="email_not_verified")
    if not can(Permission.SPEND):
        raise ApiError(403, "Your role in this team does not allow speech requests.", code="role_not_allowed")
    team = current_team()
    if team.disabled_at is not None:
        raise ApiError(403, "This team is disabled. Contact the operator of this service.", code="team_disabled")
    wait = services.throttle().api_request(f"playground-{current_user.id}", team.id)
    if wait is not None:
        raise ApiError(429, "Rate limit reached.", {"Retry-After": str(wait)})
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "Send the request as a JSON object.", code="invalid_json")
    if body.get("response_format", speech.DEFAULT_FORMAT) not in PLAYABLE:
        raise ApiError(400, f"The playground plays {', '.join(PLAYABLE)}.", param="response_format")
    order = speech.read_order(body, config.current().max_input_chars)
    payer = speech.Payer(team.id, current_user.id, None, team.balance, team.unlimited)
    return speech.serve(payer, order, speech.Arrival.of(request.environ, received))


# The landing page's samples: one fixed sentence per voice in SAMPLE_VOICES, synthesised once
# and kept (in memory, and on disk by app/samples.py, which makes them at start), so a visitor
# can hear the product without an account and nobody can make the server synthesise anything
# else through it. Each client address may fetch
# SAMPLE_LIMIT_PER_IP of them (429 beyond); a failed synthesis is remembered for
# SAMPLE_FAILURE_SECONDS and every visitor meanwhile shares its 503, so a speech server that is
# down is asked once, not once per visitor.
SAMPLE_FAILURE_SECONDS = 10.0
_sample_lock = threading.Lock()
# The samples' clock; tests move it by hand.
clock = time.monotonic


@bp.get("/samples/<voice>.mp3")
def sample(voice: str):
    wait = services.throttle().sample_request(request.remote_addr or "unknown")
    if wait is not None:
        return _refusal(429, "Too many samples from your address; try again in a minute.", wait)
    if voice not in config.current().sample_voices:
        abort(404)
    samples = current_app.extensions.setdefault("voice_samples", {})
    failed_until = current_app.extensions.setdefault("voice_sample_failures", {})
    with _sample_lock:
        if voice not in samples and (kept := kept_samples.load(voice, kept_samples.sample_request(voice))) is not None:
            samples[voice] = kept
        if voice not in samples:
            now = clock()
            if now < failed_until.get(voice, now):
                return _refusal(503, "The speech server cannot make the sample just now.", failed_until[voice] - now)
            try:
                samples[voice] = kept_samples.keep(
                    voice, kept_samples.sample_request(voice), kept_samples.synthesise_sample(voice)
                )
            except kept_samples.SampleUnavailable as failure:
                failed_until[voice] = clock() + SAMPLE_FAILURE_SECONDS
                return _refusal(503, str(failure), SAMPLE_FAILURE_SECONDS)
    response = current_app.response_class(samples[voice], mimetype="audio/mpeg")
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


def _refusal(status: int, message: str, retry_after: float):
    response = current_app.response_class(message + "\n", status=status, mimetype="text/plain")
    response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response
