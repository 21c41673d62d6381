"""Voices and models: OpenAI's names for them, the upstream's catalog, and what a request may ask for.

Clients written for OpenAI send OpenAI's voice and model names ("alloy", "tts-1"). The
gateway turns them into Kokoro's before anything goes upstream, so every upstream sees
a Kokoro id, and checks each voice and model against the upstream's own catalog
(cached, see app/upstream.py) before anything is charged: a name the upstream does not
know is the client's mistake, answered 400, never a refunded 502 that SDKs retry.
"""

import re
from dataclasses import dataclass
from fractions import Fraction

# OpenAI's voices and the Kokoro v1.0 voice each one is spoken by (VOICE_ALIASES overrides).
OPENAI_VOICES = {
    "alloy": "af_alloy",
    "ash": "am_adam",
    "ballad": "bm_lewis",
    "coral": "af_river",
    "echo": "am_echo",
    "fable": "bm_fable",
    "nova": "af_nova",
    "onyx": "am_onyx",
    "sage": "af_sarah",
    "shimmer": "af_sky",
    "verse": "am_michael",
    "marin": "af_heart",
    "cedar": "am_fenrir",
}
# OpenAI's speech models, all spoken by the upstream's "kokoro" (MODEL_ALIASES overrides).
OPENAI_MODELS = {"tts-1": "kokoro", "tts-1-hd": "kokoro", "gpt-4o-mini-tts": "kokoro"}
# The `created` time listed for the OpenAI model names (Kokoro-FastAPI lists the same).
OPENAI_CREATED = 1686935002
# OpenAI's dated snapshots, such as gpt-4o-mini-tts-2025-03-20, name the same model.
_SNAPSHOT = re.compile(r"(?P<model>[a-z0-9.\-]+?)-\d{4}-\d{2}-\d{2}")

# The first letter of a Kokoro voice id names its language, the second its speaker.
LANGUAGES = {
    "a": "en-us",
    "b": "en-gb",
    "e": "es",
    "f": "fr-fr",
    "h": "hi",
    "i": "it",
    "j": "ja",
    "p": "pt-br",
    "z": "zh",
}
GENDERS = {"f": "female", "m": "male"}

# A voice, or a blend as Kokoro-FastAPI takes it: "af_bella(2)+af_sky(1)", "af_bella-af_sky".
_PART = re.compile(r"(?P<name>[A-Za-z0-9_]{1,64})(?:\((?P<weight>\d{1,4}(?:\.\d{1,4})?)\))?")
MAX_BLEND = 8


class UnknownName(ValueError):
    """A voice or model the gateway cannot serve; the message is safe to show a client."""


@dataclass(frozen=True)
class Names:
    """The OpenAI names the gateway accepts, and the upstream names they stand for."""

    voices: dict[str, str]
    models: dict[str, str]

    @classmethod
    def from_settings(cls, voice_aliases: str, model_aliases: str) -> "Names":
        return cls(cls.voice_aliases(voice_aliases), cls.model_aliases(model_aliases))

    @staticmethod
    def voice_aliases(setting: str) -> dict[str, str]:
        """OpenAI's voice names, then VOICE_ALIASES over them; ValueError for a malformed setting."""
        return {**OPENAI_VOICES, **_pairs(setting)}

    @staticmethod
    def model_aliases(setting: str) -> dict[str, str]:
        return {**OPENAI_MODELS, **_pairs(setting)}


def _pairs(setting: str) -> dict[str, str]:
    """`alloy=af_bella,echo=am_adam` as a dict; ValueError for a malformed setting."""
    pairs = {}
    for item in filter(None, (part.strip() for part in (setting or "").split(","))):
        name, _, target = (side.strip() for side in item.partition("="))
        if not name or not target:
            raise ValueError(f"expected name=target, got {item!r}")
        pairs[name] = target
    return pairs


@dataclass(frozen=True)
class Catalog:
    """What the upstream serves, read from its /models and /audio/voices documents."""

    voices: frozenset[str]
    models: frozenset[str]

    @classmethod
    def from_documents(cls, models_document, voices_document) -> "Catalog":
        return cls(frozenset(voice_ids(voices_document)), frozenset(model_ids(models_document)))


def voice_ids(document) -> list[str]:
    """The voice ids in either of Kokoro-FastAPI's shapes: plain ids, or objects with an id."""
    voices = document.get("voices", []) if isinstance(document, dict) else []
    ids = (voice.get("id") if isinstance(voice, dict) else voice for voice in voices if voice)
    return [voice for voice in ids if isinstance(voice, str)]


def model_ids(document) -> list[str]:
    models = document.get("data", []) if isinstance(document, dict) else []
    return [model["id"] for model in models if isinstance(model, dict) and isinstance(model.get("id"), str)]


def blend(voice: str) -> list[tuple[str, str, Fraction | None]]:
    """A voice or blend as (sign, name, weight) parts; ValueError when it is neither."""
    text = voice.replace(" ", "")
    pieces = re.split(r"([+-])", text)
    parts = []
    for index in range(0, len(pieces), 2):
        sign = "+" if index == 0 else pieces[index - 1]
        match = _PART.fullmatch(pieces[index])
        if match is None:
            raise ValueError(f"'{pieces[index] or voice}' is not a voice id or a weighted voice such as af_bella(2)")
        weight = match["weight"]
        parts.append((sign, match["name"], Fraction(weight) if weight is not None else None))
    if len(parts) > MAX_BLEND:
        raise ValueError(f"a blend may join at most {MAX_BLEND} voices")
    if sum(weight if weight is not None else 1 for _, _, weight in parts) <= 0:
        raise ValueError("the weights of a blend must not all be zero")
    return parts


def resolve_voice(voice: str, names: Names, catalog: Catalog | None) -> str:
    """The upstream voice for `voice`: OpenAI names replaced, every part checked against `catalog`.

    Raises UnknownName for a voice the upstream does not have (`catalog` None: not checked).
    """
    try:
        parts = blend(voice)
    except ValueError as error:
        raise UnknownName(f"'voice' {error}.") from None
    resolved = []
    for sign, name, weight in parts:
        target = names.voices.get(name, name)
        if catalog is not None and target not in catalog.voices:
            shown = f"'{name}' (spoken by '{target}')" if target != name else f"'{name}'"
            raise UnknownName(
                f"Voice {shown} is not available. See GET /v1/audio/voices for the {len(catalog.voices)} voices, "
                f"such as {', '.join(sorted(catalog.voices)[:3])}, or use an OpenAI name such as alloy."
            )
        written = target if weight is None else f"{target}({_number(weight)})"
        resolved.append(written if not resolved else f"{sign}{written}")
    return "".join(resolved)


def resolve_model(model: str, names: Names, catalog: Catalog | None) -> str:
    """The upstream model for `model`; UnknownName when neither we nor the upstream know it."""
    snapshot = _SNAPSHOT.fullmatch(model)
    base = snapshot["model"] if snapshot and snapshot["model"] in names.models else model
    if base in names.models:
        return names.models[base]
    if catalog is None or model in catalog.models:
        return model
    known = sorted(catalog.models | set(names.models))
    raise UnknownName(f"Model '{model}' is not available; use one of {', '.join(known)}.")


def _number(weight: Fraction) -> str:
    return str(weight.numerator) if weight.denominator == 1 else f"{float(weight):g}"


def describe(voice: str) -> dict:
    """A catalog entry for a Kokoro voice id: its name, language and speaker, read off the id."""
    prefix, _, rest = voice.partition("_")
    known = len(prefix) == 2 and rest
    return {
        "id": voice,
        "name": rest.replace("_", " ").title() if known else voice,
        "language": LANGUAGES.get(prefix[:1]) if known else None,
        "gender": GENDERS.get(prefix[1:2]) if known else None,
    }


def listing(upstream_voices: list[str], names: Names) -> list[dict]:
    """The voices a client may ask for: the upstream's, then the OpenAI names that map to one of them."""
    available = set(upstream_voices)
    entries = [describe(voice) for voice in upstream_voices]
    for alias, target in names.voices.items():
        if target in available and alias not in available:
            entry = describe(target)
            entries.append({**entry, "id": alias, "name": alias.title(), "voice": target})
    return entries
