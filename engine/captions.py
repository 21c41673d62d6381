"""When each word of a text is spoken, from the model's own durations.

The model (its timed copy, engine/assets.py) says how many frames of audio each phoneme
token gets; kokoro-onnx turns that into a start and end per phoneme, after trimming and
pausing. What is left is to know which phonemes belong to which word of the text:

- A piece of text is phonemised whole (espeak-ng reads a word in its context: "it is"
  and "it" alone sound differently) and word by word. When the word-by-word phonemes
  give the same number of spoken groups as the whole, the whole's groups are dealt out
  to the words in order; a word such as "$5.20" or "3/4" gets all of the groups it is
  read as. When the counts differ, espeak-ng read some words differently in context,
  and the piece is spoken from the word-by-word phonemes instead, so every group still
  belongs to exactly one word.
- A word starts with its first phoneme and ends with its last one that is not
  punctuation: the pause a comma or full stop asks for lies between two words, never
  inside one. A word with nothing to say ("—", "&" alone) is placed, with no length, where
  the speech around it meets.
"""

import re
import unicodedata
from dataclasses import dataclass

WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Word:
    """A word of the request's input: its text and where it is, in code points (`end` excluded)."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    """How a piece is spoken: its phonemes, and which groups of them each of its words is."""

    phonemes: str
    words: tuple[Word, ...]
    # For each word, (first group, number of groups) among `phonemes.split(" ")`.
    groups: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Timed:
    """A word and when it is spoken, in seconds from the start of the whole audio."""

    word: Word
    start_time: float
    end_time: float

    def as_json(self) -> dict:
        """Kokoro-FastAPI's word timestamp, with where the word is in the input."""
        return {
            "word": self.word.text,
            "start_time": round(self.start_time, 3),
            "end_time": round(self.end_time, 3),
            "char_start": self.word.start,
            "char_end": self.word.end,
        }


def words(piece: str, offset: int) -> list[Word]:
    """The words of `piece`, which starts at code point `offset` of the input."""
    return [Word(match.group(), offset + match.start(), offset + match.end()) for match in WORD.finditer(piece)]


def plan(piece_words: list[Word], whole: str, each: list[str]) -> Plan:
    """How to speak a piece whose whole phonemes are `whole` and whose words alone are `each`."""
    counts = [len(phonemes.split()) for phonemes in each]
    if sum(counts) == len(whole.split()):
        phonemes = " ".join(whole.split())
    else:
        phonemes = " ".join(" ".join(p.split()) for p in each if p.split())
    groups, first = [], 0
    for count in counts:
        groups.append((first, count))
        first += count
    return Plan(phonemes, tuple(piece_words), tuple(groups))


def _spoken(phoneme: str) -> bool:
    return not unicodedata.category(phoneme).startswith("P")


def place(plan: Plan, timings, offset: float, scale: float) -> list[Timed]:
    """Each word of `plan` in time, from the piece's per-phoneme `timings` (kokoro-onnx's).

    `offset`: where the piece starts in the whole audio (seconds); `scale`: how much longer
    the audio was made after synthesis (a time stretch). The timings follow the phonemes
    one to one, but for the spaces kokoro-onnx drops where it splits a long piece in two.
    """
    # The (start, end) of each phoneme character; None for a space the model never saw.
    spans: list[tuple[float, float] | None] = []
    next_timing = 0
    for phoneme in plan.phonemes:
        if next_timing < len(timings) and timings[next_timing].phoneme == phoneme:
            spans.append((timings[next_timing].start, timings[next_timing].end))
            next_timing += 1
        elif phoneme == " ":
            spans.append(None)
        else:
            raise ValueError(f"the model's timings do not follow the phonemes at {phoneme!r}")
    # Where each group of phonemes starts in the string.
    group_at, position = [], 0
    for group in plan.phonemes.split(" "):
        group_at.append((position, position + len(group)))
        position += len(group) + 1
    placed, last_end = [], 0.0
    for word, (first, count) in zip(plan.words, plan.groups, strict=True):
        if count == 0:
            placed.append(Timed(word, offset + last_end * scale, offset + last_end * scale))
            continue
        begin, end = group_at[first][0], group_at[first + count - 1][1]
        inside = [(plan.phonemes[i], spans[i]) for i in range(begin, end) if spans[i] is not None]
        sounds = [span for phoneme, span in inside if _spoken(phoneme)] or [span for _, span in inside]
        start, stop = sounds[0][0], sounds[-1][1]
        last_end = stop
        placed.append(Timed(word, offset + start * scale, offset + stop * scale))
    return placed
