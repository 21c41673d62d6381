"""Word timings passed on with the audio, and subtitles made from them.

A speech request that asks for timings is sent to the speech server's captioned route
(Kokoro-FastAPI's `/dev/captioned_speech`, which the embedded engine has too): one JSON
object per line, each with a piece of audio in base64 and the words it holds. `lines`
reads that stream; `Words` keeps what is passed on honest whatever the server sends: each
word once (Kokoro-FastAPI has sent words twice), in order, with where it is in `input`
(`char_start`, `char_end`, code points, as characters are billed): the server's own
span when it gives one that points at the word, else the word found, whole, in `input`
shortly after the words before it, else null. A time no audio could have (negative, beyond
a day, not a number) leaves its word out.

Subtitles (`subtitles`): cues of at most two lines of MAX_LINE characters, at most
MAX_CUE_SECONDS of speech and shown at least MIN_CUE_SECONDS (less only when the next cue
starts sooner), each ending at a sentence's end (a full stop after "Dr." or "a.m." is not
one), as SRT or WebVTT.
"""

import base64
import binascii
import html
import json
import math
import re
import textwrap
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import requests

SUBTITLE_FORMATS = ("srt", "vtt")
# No audio is longer (the gateway ends a stream long before); a time beyond it is not one.
MAX_SECONDS = 24 * 3600.0
# A captioned line holds one piece of audio in base64; none is near this long.
MAX_LINE_BYTES = 128 * 1024 * 1024
# How far past the last word found a word is looked for in the input.
FIND_WITHIN = 64
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
    """The captioned stream `chunks` (bytes as they arrive) as Lines; NotCaptions for a malformed
    line, or one longer than MAX_LINE_BYTES."""
    pending = bytearray()
    for chunk in chunks:
        # Only the new bytes are searched: a line cut into many reads is not searched again at each one.
        first, *rest = chunk.split(b"\n")
        pending += first
        for piece in rest:
            raw, pending = bytes(pending), bytearray(piece)
            if raw.strip():
                yield _line(raw)
        if len(pending) > MAX_LINE_BYTES:
            raise NotCaptions("The speech server sent a line longer than any captioned audio.")
    if pending.strip():
        yield _line(bytes(pending))


def _line(raw: bytes) -> Line:
    try:
        document = json.loads(raw)
        audio = base64.b64decode(document["audio"], validate=True)
        words = document.get("timestamps") or []
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise NotCaptions("The speech server sent a line that is not captioned audio.") from None
    if not isinstance(words, list):
        raise NotCaptions("The speech server sent timestamps that are not a list.")
    audio_format = document.get("audio_format")
    return Line(audio, words, audio_format if isinstance(audio_format, str) and audio_format.isprintable() else None)


def _seconds(value) -> float | None:
    """A time in seconds as the server sent it; None for anything no audio could have."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return round(seconds, 3) if 0 <= seconds <= MAX_SECONDS else None


class Words:
    """The words of one request's `input` as they are passed on (see the module's docstring)."""

    def __init__(self, text: str):
        self.text = text
        self.cursor = 0
        self.last_start = 0.0
        self.seen: set[tuple] = set()

    def take(self, raw: list) -> list[dict]:
        """The words of one line worth passing on; anything that is not a timed word is left out."""
        taken = []
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("word"), str) or not item["word"].strip():
                continue
            start, end = _seconds(item.get("start_time")), _seconds(item.get("end_time"))
            # The same word at the same time and place, sent again (Kokoro-FastAPI has).
            place = item.get("char_start")
            said = (item["word"], start, end, place if isinstance(place, int) else None)
            if start is None or end is None or said in self.seen or start < self.last_start:
                continue
            self.seen.add(said)
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
        # As a whole word (not "one" inside "gone"), not far past the last word found.
        pattern = (
            (r"(?<!\w)" if word[0].isalnum() else "") + re.escape(word) + (r"(?!\w)" if word[-1].isalnum() else "")
        )
        found = re.compile(pattern).search(self.text, self.cursor, self.cursor + FIND_WITHIN + len(word))
        if found is None:
            return None, None
        self.cursor = found.end()
        return found.start(), found.end()


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
    if not word:
        return False
    if word[-1] in "!?…":
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
        # WebVTT's cue text is markup: & and < (and so any "-->") are written as entities.
        blocks = [
            f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{html.escape(c.text, quote=False)}\n"
            for c in cues(words)
        ]
        return "WEBVTT\n\n" + "\n".join(blocks)
    blocks = [f"{n}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{c.text}\n" for n, c in enumerate(cues(words), 1)]
    return "\n".join(blocks)
