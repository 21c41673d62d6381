"""Word timings passed on with the audio, and subtitles made from them.

A speech request that asks for timings is sent to the speech server's captioned route
(Kokoro-FastAPI's `/dev/captioned_speech`, which the embedded engine has too): one JSON
object per line, each with a piece of audio in base64 and the words it holds. `lines`
reads that stream; `Words` keeps what is passed on honest whatever the server sends: each
word once (Kokoro-FastAPI has sent words twice), in order, with where it is in `input`
(`char_start`, `char_end`, code points, as characters are billed): the server's own
span when it gives one that points at the word, else the word found in `input` after
the words before it, else null.

Subtitles (`subtitles`): cues of at most two lines of MAX_LINE characters, at most
MAX_CUE_SECONDS of speech and shown at least MIN_CUE_SECONDS (less only when the next cue
starts sooner), each ending at a sentence's end (a full stop after "Dr." or "a.m." is not
one), as SRT or WebVTT.
"""

import base64
import binascii
import json
import math
import textwrap
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import requests

SUBTITLE_FORMATS = ("srt", "vtt")
MAX_LINE = 42
MAX_CUE_SECONDS = 6.0
MIN_CUE_SECONDS = 1.0
# Titles and such that a full stop follows inside a sentence (case as written).
ABBREVIATIONS = frozenset(
    "Mr. Mrs. Ms. Dr. Prof. St. Sr. Jr. Mt. Inc. Ltd. Co. Corp. vs. Gen. Sen. Rep. Gov. Capt. Lt. Col. "
    "Sgt. Rev. Fig. Vol. approx. Jan. Feb. Mar. Apr. Aug. Sep. Sept. Oct. Nov. Dec.".split()
)


class Line(NamedTuple):
    """One line of the captioned stream: its audio, the words the server placed with it, and the
    audio's content type as the server names it (None when it does not)."""

    audio: bytes
    words: list
    audio_format: str | None = None


class NotCaptions(requests.exceptions.ContentDecodingError):
    """A line of the captioned stream that is not one: the server broke its side off."""


def lines(chunks: Iterable[bytes]) -> Iterator[Line]:
    """The captioned stream `chunks` (bytes as they arrive) as Lines; NotCaptions for a malformed line."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            if raw.strip():
                yield _line(raw)
    if pending.strip():
        yield _line(pending)


def _line(raw: bytes) -> Line:
    try:
        document = json.loads(raw)
        audio = base64.b64decode(document["audio"], validate=True)
        words = document.get("timestamps") or []
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise NotCaptions("The speech server sent a line that is not captioned audio.") from None
    if not isinstance(words, list):
        raise NotCaptions("The speech server sent timestamps that are not a list.")
    audio_format = document.get("audio_format")
    return Line(audio, words, audio_format if isinstance(audio_format, str) and audio_format.isprintable() else None)


def _seconds(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return round(float(value), 3)


class Words:
    """The words of one request's `input` as they are passed on (see the module's docstring)."""

    def __init__(self, text: str):
        self.text = text
        self.cursor = 0
        self.last_start = 0.0
        self.seen: set[tuple[str, float]] = set()

    def take(self, raw: list) -> list[dict]:
        """The words of one line worth passing on; anything that is not a timed word is left out."""
        taken = []
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("word"), str):
                continue
            start, end = _seconds(item.get("start_time")), _seconds(item.get("end_time"))
            if start is None or end is None or (item["word"], start) in self.seen or start < self.last_start:
                continue
            self.seen.add((item["word"], start))
            self.last_start = start
            char_start, char_end = self._span(item)
            taken.append(
                {
                    "word": item["word"],
                    "start_time": start,
                    "end_time": max(start, end),
                    "char_start": char_start,
                    "char_end": char_end,
                }
            )
        return taken

    def _span(self, item: dict) -> tuple[int | None, int | None]:
        word, start, end = item["word"], item.get("char_start"), item.get("char_end")
        if (
            isinstance(start, int)
            and isinstance(end, int)
            and not isinstance(start, bool)
            and 0 <= start <= end <= len(self.text)
            and self.text[start:end] == word
        ):
            self.cursor = end
            return start, end
        found = self.text.find(word, self.cursor) if word.strip() else -1
        if found < 0:
            return None, None
        self.cursor = found + len(word)
        return found, found + len(word)


class Cue(NamedTuple):
    start: float
    end: float
    text: str


def cues(words: list[dict]) -> list[Cue]:
    """The words in cues: at most two lines of MAX_LINE, at most MAX_CUE_SECONDS, ending at sentence ends."""
    made, current = [], []

    def close():
        if current:
            text = "\n".join(textwrap.wrap(" ".join(w["word"] for w in current), MAX_LINE, break_long_words=False))
            made.append(Cue(current[0]["start_time"], current[-1]["end_time"], text))
            current.clear()

    for word in words:
        candidate = [*current, word]
        wrapped = textwrap.wrap(" ".join(w["word"] for w in candidate), MAX_LINE, break_long_words=False)
        if current and (len(wrapped) > 2 or word["end_time"] - current[0]["start_time"] > MAX_CUE_SECONDS):
            close()
        current.append(word)
        if ends_sentence(word["word"]):
            close()
    close()
    # A cue too short to read stays up longer, until the next one starts at the latest.
    for index, cue in enumerate(made):
        following = made[index + 1].start if index + 1 < len(made) else math.inf
        made[index] = cue._replace(end=max(cue.end, min(cue.start + MIN_CUE_SECONDS, following)))
    return made


def ends_sentence(word: str) -> bool:
    """A word that ends a sentence: ! ? … or a full stop that is not an abbreviation's: a title such as
    "Dr." (ABBREVIATIONS), or a word with a full stop inside ("a.m.", "U.S.")."""
    if word[-1:] in "!?…":
        return True
    return word.endswith(".") and word.lstrip("\"'“‘(") not in ABBREVIATIONS and "." not in word[:-1]


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d}{separator}{millis % 1000:03d}"


def subtitles(words: list[dict], kind: str) -> str:
    """The words as SRT (`srt`) or WebVTT (`vtt`)."""
    if kind == "vtt":
        blocks = [f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{c.text}\n" for c in cues(words)]
        return "WEBVTT\n\n" + "\n".join(blocks)
    blocks = [f"{n}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{c.text}\n" for n, c in enumerate(cues(words), 1)]
    return "\n".join(blocks)
