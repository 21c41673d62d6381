"""The landing page's voice samples, made before a visitor asks for one.

Each sample is one fixed sentence per voice in SAMPLE_VOICES, made here and served by
app/playground.py.
Made on a visitor's click, the first play of each took 10-15 s. `flask samples prepare`
makes every missing one and keeps it in SAMPLES_DIR (instance/samples by default); `make
run` runs it as soon as the engine is up, and a deploy runs it once. A sample on disk
outlives restarts; its file name carries a hash of what was asked (voice, sentence, model),
so a changed sentence is made anew instead of an old recording being served.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import click
from flask.cli import AppGroup

from app import catalog, config, services, speech
from app.places import Busy
from app.upstream import UpstreamError

samples_cli = AppGroup("samples", help="The landing page's voice samples.")

SAMPLE_TEXT = "Hello! I am {name}, one of the voices you can use on kokoro-pay. One credit per character."


class SampleUnavailable(Exception):
    """The speech server gave no sample; the message is for the visitor."""


def sample_request(voice: str) -> dict:
    """What the speech server is asked for the voice's sample."""
    name = catalog.describe(voice)["name"]
    payload = {"model": speech.DEFAULT_MODEL, "voice": voice, "input": SAMPLE_TEXT.format(name=name)}
    payload["response_format"] = "mp3"
    return payload


def synthesise_sample(voice: str) -> bytes:
    """The voice's sample from the speech server; SampleUnavailable when it cannot give one."""
    payload = sample_request(voice)
    upstream = services.upstream()
    try:
        slot = upstream.reserve()
    except Busy:
        raise SampleUnavailable("The speech server is busy; try the sample again in a moment.") from None
    try:
        audio = upstream.open_speech(payload, config.current().stream_chunk_bytes, slot)
        try:
            return audio.first_chunk + b"".join(audio.rest)
        finally:
            audio.close()
    except UpstreamError:
        raise SampleUnavailable("The speech server cannot be reached; try the sample again in a moment.") from None
    finally:
        slot.release()


def _path(voice: str, request: dict) -> Path | None:
    directory = config.current().samples_dir
    if not directory:
        return None
    asked = "\n".join(f"{name}={request[name]}" for name in sorted(request))
    return Path(directory) / f"{voice}-{hashlib.sha256(asked.encode()).hexdigest()[:16]}.mp3"


def load(voice: str, request: dict) -> bytes | None:
    """The kept sample made for `request`, or None when there is none (or no SAMPLES_DIR)."""
    path = _path(voice, request)
    try:
        return path.read_bytes() if path else None
    except FileNotFoundError:
        return None


def keep(voice: str, request: dict, audio: bytes) -> bytes:
    """Keep `audio` as the sample made for `request`; returns it. Written whole or not at all."""
    path = _path(voice, request)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A reader (another gunicorn worker) sees the old file or the whole new one, never half.
        handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(handle, "wb") as out:
            out.write(audio)
        os.replace(partial, path)
    return audio


@samples_cli.command("prepare")
def prepare():
    """Make every sample in SAMPLE_VOICES that is not kept yet (run once the speech server is up)."""
    if not config.current().samples_dir:
        raise click.ClickException("SAMPLES_DIR is empty: there is nowhere to keep the samples.")
    failed = 0
    for voice in config.current().sample_voices:
        request = sample_request(voice)
        if load(voice, request) is not None:
            click.echo(f"{voice}: kept already")
            continue
        try:
            audio = keep(voice, request, synthesise_sample(voice))
        except SampleUnavailable as failure:
            failed += 1
            click.echo(f"{voice}: {failure}", err=True)
            continue
        click.echo(f"{voice}: made ({len(audio):,} bytes)")
    if failed:
        raise SystemExit(1)
