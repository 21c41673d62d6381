"""What a request abandoned by its client still costs the embedded engine.

A client (a browser tab closed, a script interrupted) reads the first audio of a long request
through the gateway, then hangs up. The engine's busy time after the hang-up is the CPU work
done for nobody, and the requests behind it wait for it. Measured on the real engine and a
real gateway (gunicorn, SQLite), by the engine processes' CPU time (/proc): the engine is busy
until its CPU time stops growing.

    python -m bench.abandoned                       # this checkout's gateway
    python -m bench.abandoned --before /path/to/old  # and an earlier checkout's, side by side

Both gateways share one engine and one database (migrated by this checkout), and take turns.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests

from bench import launch
from bench.run import MemorySampler, migrated_with_a_customer

# Fourteen sentences of ordinary prose: about 50 s of speech, many pieces.
LONG = " ".join(
    f"This is sentence number {n} of a long request, which its client will not wait to hear." for n in range(14)
)
ENGINE_ARGS = ("--workers", "1", "--worker-class", "gthread", "--threads", "4", "--timeout", "120")
GATEWAY_ARGS = ("--workers", "1", "--worker-class", "gthread", "--threads", "4", "--access-logfile", "/dev/null")


def busy_after_hang_up(gateway: str, key: str, engine: MemorySampler) -> float:
    """Seconds the engine kept working after a client hung up on its first audio."""
    response = requests.post(
        f"{gateway}/v1/audio/speech",
        json={"input": LONG, "voice": "af_sky", "response_format": "pcm"},
        headers={"Authorization": f"Bearer {key}"},
        stream=True,
        timeout=120,
    )
    next(response.iter_content(chunk_size=None))
    left = time.monotonic()
    response.close()
    last_work, cpu = left, engine.cpu_seconds()
    # Until the engine has done nothing for two seconds (a piece takes well under that to start).
    while time.monotonic() - last_work < 2.0 and time.monotonic() - left < 120:
        time.sleep(0.05)
        now_cpu = engine.cpu_seconds()
        if now_cpu - cpu > 0.01:
            last_work = time.monotonic()
        cpu = now_cpu
    return last_work - left


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an earlier checkout, to measure its gateway alongside")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    gateways = {"now": launch.ROOT, **({"before": args.before.resolve()} if args.before else {})}
    results = {name: [] for name in gateways}
    with tempfile.TemporaryDirectory() as scratch:
        database = Path(scratch) / "abandoned.sqlite3"
        key = migrated_with_a_customer(f"sqlite:///{database}", 10**9)
        with launch.gunicorn("engine.server:create_app()", {}, ENGINE_ARGS, "/health", timeout=300) as (engine, pid):
            sampler = MemorySampler(pid.pid)
            env = {"DATABASE_URL": f"sqlite:///{database}", "UPSTREAM_URL": f"{engine}/v1", "SECRET_KEY": "bench"}
            with launch.gunicorn("wsgi:app", env, GATEWAY_ARGS, cwd=gateways["now"]) as (now, _):
                urls = {"now": now}
                if args.before:
                    before = launch.gunicorn("wsgi:app", env, GATEWAY_ARGS, cwd=gateways["before"])
                    urls["before"] = before.__enter__()[0]
                try:
                    requests.post(
                        f"{now}/v1/audio/speech",
                        json={"input": "Warming up."},
                        headers={"Authorization": f"Bearer {key}"},
                        timeout=120,
                    )
                    for _ in range(args.rounds):
                        for name, url in urls.items():
                            results[name].append(busy_after_hang_up(url, key, sampler))
                finally:
                    if args.before:
                        before.__exit__(None, None, None)
    lines = [
        "# Engine time spent after a client hangs up",
        "",
        f"A {len(LONG)}-character request, PCM, its first audio read, then the client gone. Seconds, "
        f"median of {args.rounds}.",
        "",
        "| gateway | engine busy after the hang-up | each round |",
        "|---|---|---|",
    ]
    for name, rounds in results.items():
        lines.append(f"| {name} | {statistics.median(rounds):.2f} | {', '.join(f'{r:.2f}' for r in rounds)} |")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
