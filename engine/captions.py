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
- The decoder's sound lags its frames: every time is taken LEAD frames earlier, as
  Kokoro's own `join_timestamps` does (3 frames of 25 ms). The model also lengthens the last
  sound before a pause, and part of that length is already silence: a word's start and end
  are moved in over the quiet 10 ms frames at its edges (40 dB below the piece's loudest),
  never past its own span. Where a mark ends a word, the pause is the silence the audio
  has nearest to the mark (within 150 ms, as kokoro-onnx looks for it when it lengthens
  pauses): the word ends where that silence starts, the next starts where it ends.
"""

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

WORD = re.compile(r"\S+")
SAMPLE_RATE = 24000
# Kokoro's frames are 600 samples (25 ms) at the speed the model spoke.
LEAD = 3 * 600 / SAMPLE_RATE
FRAME = 0.01
QUIET_DB = -40
# A pause is at least this much silence, found this close to its mark (kokoro-onnx looks as far).
PAUSE_MIN = 0.02
REACH = 0.15
TAIL_PAUSE = 0.05


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


def place(plan: Plan, timings, samples: np.ndarray, offset: float, scale: float) -> list[Timed]:
    """Each word of `plan` in time, from the piece's per-phoneme `timings` (kokoro-onnx's).

    `samples`: the piece's audio as it goes out; `offset`: where it starts in the whole
    audio (seconds); `scale`: how much longer the audio was made after synthesis (a time
    stretch). The timings follow the phonemes one to one, but for the spaces kokoro-onnx
    drops where it splits a long piece in two.
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
    loud = _loud_frames(samples)
    # [start, stop, where its closing mark ends or None] per word, in seconds into the piece.
    times: list[list] = []
    last_end = 0.0
    for first, count in plan.groups:
        if count == 0:
            times.append([last_end, last_end, None])
            continue
        begin, end = group_at[first][0], group_at[first + count - 1][1]
        inside = [(plan.phonemes[i], spans[i]) for i in range(begin, end) if spans[i] is not None]
        sounds = [span for phoneme, span in inside if _spoken(phoneme)] or [span for _, span in inside]
        start = max(last_end, (sounds[0][0] - LEAD) * scale)
        stop = max(start, (sounds[-1][1] - LEAD) * scale)
        start, stop = _heard(loud, start, stop)
        mark = inside[-1][1][1] * scale if not _spoken(inside[-1][0]) else None
        last_end = stop
        times.append([start, stop, mark])
    # A mark's pause is the silence the audio has around the mark: the word before it ends
    # where the silence starts, the word after it starts where the silence ends.
    # When the silence outlasts the next word's frames, the decoder spoke that word later than
    # its frames say: it moves past the silence, and the words after it follow.
    for before, after in zip(times, times[1:], strict=False):
        pause = _pause_at(loud, before[2]) if before[2] is not None else None
        if pause is not None and before[0] <= pause[0] <= after[0] + REACH:
            before[1], after[0] = pause[0], max(pause[1], before[1])
        after[0] = max(after[0], before[1])
        after[1] = max(after[1], after[0])
    # Sound that goes on after the piece's last word, with no pause between, is that word's end.
    if times:
        times[-1][1] = _sounding_until(loud, times[-1][1])
    return [
        Timed(word, offset + start, offset + stop) for word, (start, stop, _) in zip(plan.words, times, strict=True)
    ]


def _sounding_until(loud: np.ndarray, at: float) -> float:
    """The end of the sound going on at `at` seconds: until the first quiet of TAIL_PAUSE or more
    (longer than PAUSE_MIN: the closure before a "t" is a short silence inside a word)."""
    frame, end, quiet = int(at / FRAME), at, 0
    while frame < len(loud) and quiet * FRAME < TAIL_PAUSE:
        if loud[frame]:
            end, quiet = (frame + 1) * FRAME, 0
        else:
            quiet += 1
        frame += 1
    return max(at, end)


def _pause_at(loud: np.ndarray, at: float) -> tuple[float, float] | None:
    """The longest run of quiet frames (at least PAUSE_MIN) within REACH of `at` seconds: a stop
    consonant's closure near the mark is silent too, but shorter than the pause."""
    runs, run_start = [], None
    for index, is_loud in enumerate([*loud, True]):
        if not is_loud and run_start is None:
            run_start = index
        elif is_loud and run_start is not None:
            if (index - run_start) * FRAME >= PAUSE_MIN:
                runs.append((run_start * FRAME, index * FRAME))
            run_start = None

    def distance(run):
        return 0.0 if run[0] <= at <= run[1] else min(abs(at - run[0]), abs(at - run[1]))

    near = [run for run in runs if distance(run) <= REACH]
    return max(near, key=lambda run: run[1] - run[0]) if near else None


def _loud_frames(samples: np.ndarray) -> np.ndarray:
    """Which 10 ms frames of `samples` are louder than 40 dB below the loudest."""
    frame = int(FRAME * SAMPLE_RATE)
    usable = len(samples) // frame * frame
    if not usable:
        return np.zeros(0, dtype=bool)
    loudness = np.sqrt((samples[:usable].astype(np.float64).reshape(-1, frame) ** 2).mean(axis=1))
    return loudness > loudness.max() * 10 ** (QUIET_DB / 20)


def end_of_speech(samples: np.ndarray, keep: float) -> int:
    """How many samples to keep: up to the last loud 10 ms frame, and `keep` seconds after it."""
    loud = np.flatnonzero(_loud_frames(samples))
    if not len(loud):
        return len(samples)
    return min(len(samples), int(((loud[-1] + 1) * FRAME + keep) * SAMPLE_RATE))


def _heard(loud: np.ndarray, start: float, stop: float) -> tuple[float, float]:
    """(start, stop) moved in over the quiet frames at its edges; as it is when all of it is quiet."""
    first, last = int(start / FRAME), min(len(loud), int(np.ceil(stop / FRAME)))
    heard = np.flatnonzero(loud[first:last])
    if not len(heard):
        return start, stop
    return max(start, (first + heard[0]) * FRAME), min(stop, (first + heard[-1] + 1) * FRAME)
