"""How right the embedded engine's word timings are, measured against its own audio.

For each sentence, voice and speed, /dev/captioned_speech is asked once (PCM, whole) and
its answer checked:

- every word of the input appears once, in order, pointing at its own characters;
- the timings never go back;
- the last word ends near the end of the audio;
- at every comma, semicolon, colon or sentence end between two words where the audio
  pauses (a quiet run of at least 50 ms, 10 ms frames 40 dB below the loudest, within
  200 ms of the gap), the gap the timings leave there lies on that silence: its middle
  inside it, its edges within 50 ms of the silence's. Marks the model reads without a
  pause are counted apart.

    python -m bench.captions            # 24 sentences × 3 voices × 2 speeds
    python -m bench.captions --smoke    # 3 sentences, one voice (the test suite)
"""

import argparse
import base64
import statistics
import sys

import numpy as np

from engine import captions

SENTENCES = [
    "Dr. Smith paid $5.20 on 3/4.",
    "The meeting starts at 10:30 a.m., not at noon.",
    "Kokoro speaks English, French, Spanish, and Hindi.",
    "If it rains tomorrow, we will stay inside; otherwise, we hike.",
    "She said: bring bread, cheese, and two bottles of water.",
    "Mr. O'Neil's 3rd car costs about €4,500.",
    "Wait! Did you hear that noise downstairs?",
    "The U.S. economy grew by 2.4 percent last year.",
    "Numbers like 1,000,000 and 3.14159 are read aloud.",
    "First, open the box. Second, read the manual.",
    "Our office is at 221B Baker Street, London.",
    "Call me at 555-0134, or send an e-mail instead.",
    "The quick brown fox jumps over the lazy dog.",
    "Temperatures fell to -5 degrees overnight, then rose again.",
    "Please bring: a pen, a notebook, and your ID.",
    "He read the book in 2019, and again in 2023.",
    "Is it a bird? Is it a plane? No, it is a kite.",
    "The recipe needs 2 cups of flour, 1 egg, and milk.",
    "After the storm, the streets were quiet, wet, and empty.",
    "Version 2.0 fixed 37 bugs; version 2.1 fixed 12 more.",
    "Yes, I know. But still, it matters to me.",
    "At 7 p.m. sharp, the doors opened, and people rushed in.",
    "Subtitles, karaoke, and lip-sync all need word timings.",
    "It costs $19.99 per month, or $199 per year.",
]
VOICES = ["af_heart", "am_adam", "bf_emma"]
SPEEDS = [1.0, 1.5]
SAMPLE_RATE = 24000
FRAME = 0.01
QUIET_DB = -40
PAUSE_MARKS = ",;:.!?"
# A pause in the audio: a quiet run at least this long, no further than NEAR from the gap.
PAUSE_MIN = 0.05
NEAR = 0.2


def quiet_runs(samples: np.ndarray) -> list[tuple[float, float]]:
    """The audio's silent stretches (start, end) in seconds: 10 ms frames 40 dB below the loudest."""
    frame = int(FRAME * SAMPLE_RATE)
    usable = len(samples) // frame * frame
    loudness = np.sqrt((samples[:usable].reshape(-1, frame) ** 2).mean(axis=1))
    quiet = loudness <= loudness.max() * 10 ** (QUIET_DB / 20)
    runs, start = [], None
    for index, is_quiet in enumerate([*quiet, False]):
        if is_quiet and start is None:
            start = index
        elif not is_quiet and start is not None:
            runs.append((start * FRAME, index * FRAME))
            start = None
    return runs


def measure(client, text: str, voice: str, speed: float) -> dict:
    response = client.post(
        "/dev/captioned_speech",
        json={"input": text, "voice": voice, "speed": speed, "response_format": "pcm", "stream": False},
    )
    assert response.status_code == 200, response.data
    body = response.get_json()
    samples = np.frombuffer(base64.b64decode(body["audio"]), dtype="<i2").astype(np.float32) / 32768
    words = body["timestamps"]
    expected = [(word.start, word.end) for word in captions.words(text, 0)]
    every_word = [(w["char_start"], w["char_end"]) for w in words] == expected and all(
        text[w["char_start"] : w["char_end"]] == w["word"] for w in words
    )
    ends = [0.0] + [w["end_time"] for w in words]
    monotonic = all(ends[i] <= words[i]["start_time"] <= words[i]["end_time"] for i in range(len(words)))
    seconds = len(samples) / SAMPLE_RATE
    runs = quiet_runs(samples)
    pauses = []
    for before, after in zip(words, words[1:], strict=False):
        if before["word"][-1] not in PAUSE_MARKS:
            continue
        gap = (before["end_time"], after["start_time"])
        middle = sum(gap) / 2
        # The silence the model made for this mark, if it made one: 50 ms or more, near the gap,
        # ending after the middle of the word with the mark and starting before the next word
        # ends (a silence wholly before or after those is another mark's).
        near = [
            run
            for run in runs
            if run[1] - run[0] >= PAUSE_MIN
            and run[1] > max(gap[0] - NEAR, (before["start_time"] + before["end_time"]) / 2)
            and run[0] < min(gap[1] + NEAR, after["end_time"])
        ]
        if not near:
            pauses.append(None)
            continue
        run = min(near, key=lambda run: abs((run[0] + run[1]) / 2 - middle))
        on_it = run[0] <= middle <= run[1]
        pauses.append(max(abs(gap[0] - run[0]), abs(gap[1] - run[1])) if on_it else float("inf"))
    return {
        "every_word": every_word,
        "monotonic": monotonic,
        "tail": seconds - words[-1]["end_time"],
        "pauses": pauses,
    }


def run(sentences, voices, speeds, synthesizer=None) -> dict:
    """The figures for every sentence × voice × speed; `synthesizer`: a loaded engine model, else one is loaded."""
    from engine import assets
    from engine.server import Synthesizer, create_app

    if synthesizer is None:
        model, voice_file = assets.ensure()
        synthesizer = Synthesizer(str(model), str(voice_file))
    client = create_app(synthesizer).test_client()
    results = [measure(client, text, voice, speed) for text in sentences for voice in voices for speed in speeds]
    pauses = [error for result in results for error in result["pauses"]]
    tails = [result["tail"] for result in results]
    paused = [error for error in pauses if error is not None]
    on_silence = [error for error in paused if error != float("inf")]
    return {
        "requests": len(results),
        "every_word_once_in_order": sum(result["every_word"] for result in results),
        "monotonic": sum(result["monotonic"] for result in results),
        "tail_ms": {
            "median": statistics.median(tails) * 1000,
            "max": max(tails) * 1000,
            "within_100": sum(tail <= 0.1 for tail in tails),
        },
        "marks": len(pauses),
        "pauses": len(paused),
        "pause_gap_on_silence": len(on_silence),
        "pause_within_50ms": sum(error <= 0.05 for error in on_silence),
        "pause_error_ms": {
            "median": statistics.median(on_silence) * 1000 if on_silence else 0.0,
            "max": max(on_silence) * 1000 if on_silence else 0.0,
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 sentences, one voice, one speed")
    args = parser.parse_args(argv)
    if args.smoke:
        figures = run(SENTENCES[:3], VOICES[:1], SPEEDS[:1])
    else:
        figures = run(SENTENCES, VOICES, SPEEDS)
    n = figures["requests"]
    tail, error = figures["tail_ms"], figures["pause_error_ms"]
    print(f"{n} requests ({len(SENTENCES) if not args.smoke else 3} sentences × voices × speeds)")
    print(f"every input word once, in order: {figures['every_word_once_in_order']}/{n}")
    print(f"timings never go back: {figures['monotonic']}/{n}")
    print(
        f"last word to end of audio: median {tail['median']:.0f} ms, max {tail['max']:.0f} ms; "
        f"≤ 100 ms: {tail['within_100']}/{n}"
    )
    print(
        f"marks , ; : . ! ? between words: {figures['marks']}, with a pause in the audio: {figures['pauses']}; "
        f"gap on that silence: {figures['pause_gap_on_silence']}; "
        f"edges within 50 ms: {figures['pause_within_50ms']} "
        f"(median {error['median']:.0f} ms, max {error['max']:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
