"""The embedded engine, measured side by side against its earlier self in one run.

"before": one plain lock around the model and whole sentences as pieces (the engine until
2026-11-26). "now": the first sentence spoken from its first clause on its own, turns that go first to
requests still waiting for their first audio, and phonemising under a lock of its own, never
waiting for the model (engine/server.py).

    python -m bench.engine            # the full run
    python -m bench.engine --smoke    # a short run (the test suite's engine tests)

Prints a table and writes bench/results/engine-<time>.md and .json.
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import requests

from bench import launch
from engine import assets
from engine.server import Synthesizer, Turns, create_app, pieces, sentences

RESULTS = Path(__file__).resolve().parent / "results"
ONE_SENTENCE = "Kokoro-pay meters speech by the character, and streams it as it is made, sentence by sentence."
SHORT_SENTENCE = "Hello from kokoro-pay."
FORTY = "A short question, asked while others wait."
MIXED = (
    "The engine speaks each sentence as soon as it is ready. Clients hear the first words quickly, "
    "and the rest follows while they listen."
)
LONG_SENTENCE = "This is one sentence of a long request, read aloud while a short one arrives. "
PCM_BYTES_PER_SECOND = 24000 * 2


class OneLock(Turns):
    """The engine before: a plain lock, which the thread that just let go may take again at once."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def turn(self, first: bool):
        with self._lock:
            yield


def speak(url: str, text: str, voice: str = "af_sky", audible: threading.Event | None = None) -> dict:
    """One request: seconds to the first audio byte, in all, and the seconds of audio received.

    `audible` is set when the first audio has arrived.
    """
    started = time.perf_counter()
    first, size = None, 0
    with requests.post(url, json={"input": text, "voice": voice, "response_format": "pcm"}, stream=True) as response:
        for chunk in response.iter_content(chunk_size=None):
            if first is None:
                first = time.perf_counter() - started
                if audible is not None:
                    audible.set()
            size += len(chunk)
    total = time.perf_counter() - started
    return {"first": first or total, "total": total, "audio": size / PCM_BYTES_PER_SECOND}


def concurrent(url: str, clients: int, each: int) -> dict:
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: speak(url, MIXED), range(clients * each)))
    return {
        "first_p50": statistics.median(r["first"] for r in results),
        # Time spent per second of audio, as each client saw it: under 1 keeps up with playback.
        "rtf_p50": statistics.median(r["total"] / r["audio"] for r in results),
    }


def interleaved(url: str, repeats: int, long_text: str) -> dict:
    """A 40-character request's first byte alone, and while a ~4,000-character request streams."""
    idle = [speak(url, FORTY, "af_bella")["first"] for _ in range(repeats)]
    busy = []
    for _ in range(repeats):
        audible = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            long_one = pool.submit(speak, url, long_text, "af_sky", audible)
            audible.wait(120)  # the long request is under way: its first audio went out
            busy.append(speak(url, FORTY, "af_bella")["first"])
            long_one.result()
    return {"idle_p50": statistics.median(idle), "busy_p50": statistics.median(busy)}


def measure(url: str, args) -> dict:
    repeats = 2 if args.smoke else 5
    return {
        "one_sentence_first": statistics.median(speak(url, ONE_SENTENCE)["first"] for _ in range(repeats)),
        "short_sentence_first": statistics.median(speak(url, SHORT_SENTENCE)["first"] for _ in range(repeats)),
        "levels": {
            clients: concurrent(url, clients, 1 if args.smoke else 3)
            for clients in ((1, 2) if args.smoke else (1, 2, 4))
        },
        "interleaved": interleaved(url, 1 if args.smoke else 3, LONG_SENTENCE * (3 if args.smoke else 51)),
    }


def averaged(runs: list[dict]):
    """The mean of each number across rounds of the same shape."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: averaged([run[key] for run in runs]) for key in first}
    return statistics.fmean(runs)


def markdown(report: dict) -> str:
    before, now = report["before"], report["now"]
    lines = [
        f"# Embedded engine ({report['when']}, {report['machine']})",
        "",
        "Side by side in one process on one loaded model, PCM, voice af_sky. Seconds.",
        "",
        "| measure | before | now | now / before |",
        "|---|---|---|---|",
    ]

    def row(name, old, new):
        lines.append(f"| {name} | {old:.3f} | {new:.3f} | {new / old:.2f} |")

    row(
        f"first byte, one sentence of {len(ONE_SENTENCE)} characters",
        before["one_sentence_first"],
        now["one_sentence_first"],
    )
    row(
        f"first byte, one sentence of {len(SHORT_SENTENCE)} characters",
        before["short_sentence_first"],
        now["short_sentence_first"],
    )
    for clients in now["levels"]:
        row(
            f"first byte p50, {clients} at once ({len(MIXED)} characters)",
            before["levels"][clients]["first_p50"],
            now["levels"][clients]["first_p50"],
        )
        row(
            f"real-time factor p50, {clients} at once",
            before["levels"][clients]["rtf_p50"],
            now["levels"][clients]["rtf_p50"],
        )
    for name, variant in (("before", before), ("now", now)):
        inter = variant["interleaved"]
        lines.append("")
        lines.append(
            f"{name}: a {len(FORTY)}-character request's first byte {inter['idle_p50']:.3f} s alone, "
            f"{inter['busy_p50']:.3f} s while a long request streams ({inter['busy_p50'] / inter['idle_p50']:.1f}×)."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    model, voices = assets.ensure()
    now_synth = Synthesizer(str(model), str(voices))
    before_synth = copy.copy(now_synth)
    before_synth.turns = OneLock()
    # Before, phonemising took the model's lock too.
    before_synth._phonemizer = before_synth.turns._lock
    report = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
    }
    with (
        launch.serve(create_app(before_synth, split=sentences)) as before_url,
        launch.serve(create_app(now_synth, split=pieces)) as now_url,
    ):
        before, now = f"{before_url}/v1/audio/speech", f"{now_url}/v1/audio/speech"
        speak(before, SHORT_SENTENCE), speak(now, SHORT_SENTENCE)  # warm up
        # Rounds in ABBA order (one AB in a smoke run), so a drift of the machine weighs on both alike.
        order = ("before", "now") if args.smoke else ("before", "now", "now", "before")
        rounds = {"before": [], "now": []}
        for name in order:
            rounds[name].append(measure({"before": before, "now": now}[name], args))
        report.update((name, averaged(runs)) for name, runs in rounds.items())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"engine-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(text)
    print(f"written: {stem}.md, .json", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
