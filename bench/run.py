"""What the gateway costs on top of the upstream: the same requests sent directly to a stand-in
Kokoro server, through a bare forwarder (bench/floor.py: the floor for any Python gateway, under
the same gunicorn settings) and through kokoro-pay (gunicorn, production settings, PostgreSQL),
in rounds that alternate the three.

    python -m bench.run                 # the full run: concurrency 1, 4, 16, 64
    python -m bench.run --smoke         # a short run (CI)

Prints a table and writes bench/results/bench-<time>.{md,json,png}.
"""

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import requests

from bench import launch, litellm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# A fixed mix of input lengths, in characters (about 3, 11 and 43 seconds of speech).
INPUT_LENGTHS = (40, 160, 640)
SENTENCE = "Kokoro-pay meters speech by the character and streams it as it is made. "


def prepare_database(url: str) -> str:
    """An empty, migrated PostgreSQL database with one customer; returns the customer's key."""
    launch.empty_database(url)
    return migrated_with_a_customer(url, 10**15)


def migrated_with_a_customer(uri: str, credits: int) -> str:
    """Migrate the empty database at `uri` and add one customer with `credits`; returns its key."""
    from flask_migrate import upgrade

    from app import billing, create_app, keys, teams
    from app.accounts import create_user
    from app.extensions import db

    app = create_app({"TESTING": True, "SECRET_KEY": "bench", "SQLALCHEMY_DATABASE_URI": uri})
    with app.app_context():
        upgrade()
        user = create_user("bench@example.com")
        db.session.flush()
        team = teams.personal(user)
        billing.grant(team, credits, "benchmark credits")
        _, secret = keys.create_key(team, user, "bench")
        db.session.commit()
        db.engine.dispose()
    return secret


class MemorySampler:
    """Peak resident memory of a process and its children (the gunicorn master and workers)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def pids(self) -> list[int]:
        return [self.pid] + [
            int(child) for child in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        ]

    def cpu_seconds(self) -> float:
        """User and system CPU time used so far by the app's processes."""
        ticks = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
            except FileNotFoundError:
                pass
        return ticks / os.sysconf("SC_CLK_TCK")

    def current(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except FileNotFoundError:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.02)

    def __enter__(self):
        self.peak = self.current()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def one_request(session: requests.Session, url: str, headers: dict, body: dict) -> dict:
    started = time.perf_counter()
    first = None
    size = 0
    with session.post(url, json=body, headers=headers, stream=True, timeout=120) as response:
        for chunk in response.iter_content(chunk_size=65536):
            if first is None:
                first = time.perf_counter()
            size += len(chunk)
        status = response.status_code
        timing = server_timing(response.headers.get("Server-Timing", ""))
    ended = time.perf_counter()
    return {
        "status": status,
        "ttfb": (first or ended) - started,
        "total": ended - started,
        "bytes": size,
        "server_timing": timing,
    }


def server_timing(header: str) -> dict:
    """`gateway;dur=1.20, upstream;dur=50.3` → {"gateway": 1.2, "upstream": 50.3} (milliseconds)."""
    timings = {}
    for part in filter(None, (piece.strip() for piece in header.split(","))):
        name, _, duration = part.partition(";dur=")
        timings[name] = float(duration)
    return timings


def drive(
    url: str | list[str], headers: dict, concurrency: int, count: int, first: int = 0, ramp: float = 0.0
) -> tuple[list[dict], float]:
    """`count` speech requests, `concurrency` at a time, each thread on its own kept-alive connection;
    each request's result, and the wall time they took. `first` continues the mix of input lengths.
    Given several URLs (several gateway hosts), the threads are dealt out over them in turn.

    The threads start spread evenly over `ramp` seconds, as independent clients would, rather than
    all in one instant: a burst of `concurrency` simultaneous first requests is another test.
    """
    local = threading.local()
    starters = itertools.count()

    def work(index: int) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            starter = next(starters)
            local.url = urls[starter % len(urls)]
            delay = started + starter * ramp / concurrency - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        length = INPUT_LENGTHS[index % len(INPUT_LENGTHS)]
        text = (SENTENCE * (length // len(SENTENCE) + 1))[:length]
        body = {"model": "kokoro", "input": text, "voice": "af_sky"}
        return one_request(local.session, f"{local.url}/v1/audio/speech", headers, body)

    urls = [url] if isinstance(url, str) else url

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(work, range(first, first + count)))
    return results, time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summarise(results: list[dict], wall: float) -> dict:
    ttfb = [r["ttfb"] * 1000 for r in results]
    total = [r["total"] * 1000 for r in results]
    timed = [r["server_timing"] for r in results if "upstream" in r["server_timing"]]
    return {
        "requests": len(results),
        "failed": sum(r["status"] != 200 for r in results),
        # What the gateway says of itself (Server-Timing), where it said it.
        "said_gateway_p50": percentile([t["gateway"] + t["queue"] for t in timed], 0.5) if timed else None,
        "said_upstream_p50": percentile([t["upstream"] for t in timed], 0.5) if timed else None,
        "ttfb_p50": percentile(ttfb, 0.50),
        "ttfb_p95": percentile(ttfb, 0.95),
        "ttfb_p99": percentile(ttfb, 0.99),
        "total_p50": percentile(total, 0.50),
        "total_mean": statistics.fmean(total),
        "rps": len(results) / wall,
        "mb": sum(r["bytes"] for r in results) / 1e6,
    }


def balance_rps(url: str, headers: dict, concurrency: int, seconds: float) -> float:
    deadline = time.perf_counter() + seconds
    counts = []

    def work(_):
        session, count = requests.Session(), 0
        while time.perf_counter() < deadline:
            if session.get(f"{url}/v1/balance", headers=headers, timeout=10).status_code == 200:
                count += 1
        counts.append(count)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(work, range(concurrency)))
    return sum(counts) / seconds


def large_body(url: str, headers: dict, sampler: MemorySampler, size: int) -> dict:
    before = sampler.current()
    with sampler:
        result = one_request(
            requests.Session(),
            f"{url}/v1/audio/speech",
            headers,
            # The gateway sends only the fields it knows upstream: the size travels in the text.
            {"model": "kokoro", "input": f"standin_bytes={size}", "voice": "af_sky"},
        )
    return {
        "bytes": result["bytes"],
        "status": result["status"],
        "rss_before_mb": before / 2**20,
        "rss_peak_mb": sampler.peak / 2**20,
        "growth_mb": (sampler.peak - before) / 2**20,
    }


# direct: the stand-in itself; floor: the bare forwarder; books: the floor with books (bench/floor.py);
# gateway: kokoro-pay; litellm: LiteLLM's proxy, when it is installed (bench/litellm.py).
PATHS = ("direct", "floor", "books", "gateway", "litellm")
# What the gateway is held to against the floor with books, at every level (throughput at 64 streams).
TARGETS = {"added_p50": 1.3, "added_p99": 2.0, "cpu": 1.5, "rps_at_64": 0.95}


def markdown(report: dict) -> str:
    paths = report["paths"]
    lines = [
        f"# kokoro-pay gateway benchmark ({report['when']})",
        "",
        f"Stand-in upstream: {report['standin']}. Floors (bench/floor.py) and gateway: gunicorn {report['gunicorn']}; "
        f"the floor with books and the gateway on PostgreSQL. {report.get('litellm', '')} Requests per path: "
        f"{', '.join(str(level['direct']['requests']) for level in report['levels'])} at "
        f"concurrency {', '.join(str(level['concurrency']) for level in report['levels'])}, in {report['rounds']} "
        f"rounds rotating the paths, the clients of a round starting over {report['ramp_s']} s; "
        f"input lengths {list(INPUT_LENGTHS)} characters.",
        "",
        "| concurrency | path | TTFB p50 ms | TTFB p95 ms | TTFB p99 ms | total p50 ms | req/s | failed "
        "| peak RSS MB | CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        for path in paths:
            row = level[path]
            own = f"{row['peak_rss_mb']:.0f} | {row['cpu_ms_per_request']:.1f}" if path != "direct" else " | "
            lines.append(
                f"| {level['concurrency']} | {path} | {row['ttfb_p50']:.1f} | {row['ttfb_p95']:.1f} | "
                f"{row['ttfb_p99']:.1f} | {row['total_p50']:.1f} | {row['rps']:.1f} | {row['failed']} | {own} |"
            )
        ratio = level["ratio"]
        lines.append(
            f"| {level['concurrency']} | **gateway/direct** | {ratio['ttfb_p50']:.3f} | "
            f"{ratio['ttfb_p95']:.3f} | {ratio['ttfb_p99']:.3f} | {ratio['total_p50']:.3f} | "
            f"{ratio['rps']:.3f} | | | |"
        )
    lines += [
        "",
        "Against the floors: the time each path adds to the first byte over direct, and CPU per request. The "
        f"targets are against the floor with books: added first byte p50 ≤ {TARGETS['added_p50']}×, "
        f"p99 ≤ {TARGETS['added_p99']}×, CPU per request ≤ {TARGETS['cpu']}×, and ≥ {TARGETS['rps_at_64']} of "
        "direct's throughput at 64 streams.",
        "",
        "| concurrency | added TTFB p50 ms: " + " / ".join(paths[1:]) + " | gateway ÷ books "
        "| added TTFB p99 ms: " + " / ".join(paths[1:]) + " | gateway ÷ books "
        "| CPU ms/request: " + " / ".join(paths[1:]) + " | gateway ÷ books "
        "| Server-Timing: gateway's own p50 ms | upstream p50 ms said / direct measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        books, said, added = level["books_ratio"], level["server_timing"], level["added"]
        p50 = " / ".join(f"{added[f'{path}_p50']:+.2f}" for path in paths[1:])
        p99 = " / ".join(f"{added[f'{path}_p99']:+.2f}" for path in paths[1:])
        cpu = " / ".join(f"{level[path]['cpu_ms_per_request']:.1f}" for path in paths[1:])
        lines.append(
            f"| {level['concurrency']} | {p50} | {books['added_p50']:.2f} {_met(level, 'added_p50')} "
            f"| {p99} | {books['added_p99']:.2f} {_met(level, 'added_p99')} "
            f"| {cpu} | {books['cpu']:.2f} {_met(level, 'cpu')} "
            f"| {said['gateway_p50']:.2f} | {said['upstream_p50']:.1f} / {level['direct']['ttfb_p50']:.1f} "
            f"({'agrees' if said['agrees'] else 'DISAGREES'} within 0.5 ms) |"
        )
    sixty_four = [level for level in report["levels"] if level["concurrency"] == 64]
    if sixty_four:
        rps = sixty_four[0]["ratio"]["rps"]
        lines += [
            "",
            f"Throughput at 64 streams, gateway/direct: {rps:.3f} (target ≥ {TARGETS['rps_at_64']}: "
            f"{'met' if rps >= TARGETS['rps_at_64'] else 'NOT met'}).",
        ]
    hosts = report["upstreams"][0]
    lines += [
        "",
        f"Several speech servers: {hosts['hosts']} gateway hosts of {hosts['workers']} workers each (gunicorn "
        f"masters on one database) in front of one stand-in, then two, each taking at most "
        f"{hosts['max_streams']} streams at once (`UPSTREAM_MAX_STREAMS`, kept by every gateway together), "
        f"{hosts['concurrency']} concurrent clients dealt out over the hosts. The stand-ins count the most "
        "streams they were sent at once.",
        "",
        "| speech servers | TTFB p50 ms | TTFB p95 ms | total p50 ms | req/s | failed | most at once per server |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["upstreams"]:
        lines.append(
            f"| {row['upstreams']} | {row['ttfb_p50']:.1f} | {row['ttfb_p95']:.1f} | {row['total_p50']:.1f} | "
            f"{row['rps']:.1f} | {row['failed']} | {', '.join(str(most) for most in row['most'])} |"
        )
    big = report["large_body"]
    lines += [
        "",
        f"`GET /v1/balance` alone: **{report['balance_rps']:.0f} req/s** "
        f"at concurrency {report['balance_concurrency']}.",
        "",
        f"Large body: {big['bytes'] / 1e6:.0f} MB streamed through the gateway (status {big['status']}); app RSS "
        f"{big['rss_before_mb']:.0f} MB before, {big['rss_peak_mb']:.0f} MB at peak "
        f"(growth {big['growth_mb']:+.1f} MB).",
    ]
    return "\n".join(lines) + "\n"


def _met(level: dict, target: str) -> str:
    return "(met)" if level["targets_met"][target] else "(**not met**)"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [level["concurrency"] for level in report["levels"]]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"direct": "o--", "floor": "^:", "books": "v:", "gateway": "s-", "litellm": "d-."}
    for name in report["paths"]:
        style = styles[name]
        latency.plot(levels, [level[name]["ttfb_p50"] for level in report["levels"]], style, label=f"{name} p50")
        latency.plot(
            levels, [level[name]["ttfb_p95"] for level in report["levels"]], style, alpha=0.5, label=f"{name} p95"
        )
        throughput.plot(levels, [level[name]["rps"] for level in report["levels"]], style, label=name)
    latency.set(
        xscale="log", xlabel="concurrent streams", ylabel="time to first audio byte (ms)", title="Latency to first byte"
    )
    throughput.set(xscale="log", xlabel="concurrent streams", ylabel="requests per second", title="Throughput")
    for axes in (latency, throughput):
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def measure(args, levels, large, paths: dict) -> dict:
    """Each level's rounds over the paths; then /v1/balance alone, and one large body.

    `paths`: for each path, its (URL, request headers, server process or None for direct)."""
    names = [name for name in PATHS if name in paths]
    measured = {"levels": [], "paths": names}
    samplers = {name: MemorySampler(process.pid) for name, (_, _, process) in paths.items() if process is not None}
    # Warm every path up: a fresh gateway answers its first ~100 requests about a millisecond slower
    # (connection pools filling, statements prepared), which is not what a customer of a running one sees.
    for url, headers, _ in paths.values():
        drive(url, headers, *((4, 8) if args.smoke else (8, 128)))
    for index, concurrency in enumerate(levels):
        count = args.requests or (8 if args.smoke else max(256, 32 * concurrency))
        rounds = args.rounds
        per_round = max(1, count // rounds)
        results = {name: [] for name in names}
        walls = dict.fromkeys(names, 0.0)
        cpu, peak = dict.fromkeys(samplers, 0.0), dict.fromkeys(samplers, 0)
        for round_ in range(rounds):
            # The paths' order rotates each round, so a drift of the machine weighs on all alike.
            shift = (index + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                url, headers, _ = paths[name]
                run = partial(drive, url, headers, concurrency, per_round, round_ * per_round, args.ramp)
                if name in samplers:
                    cpu_before = samplers[name].cpu_seconds()
                    with samplers[name]:
                        done, wall = run()
                    cpu[name] += samplers[name].cpu_seconds() - cpu_before
                    peak[name] = max(peak[name], samplers[name].peak)
                else:
                    done, wall = run()
                results[name] += done
                walls[name] += wall
        level = {name: summarise(results[name], walls[name]) for name in names}
        level["concurrency"] = concurrency
        for name in samplers:
            level[name]["peak_rss_mb"] = peak[name] / 2**20
            level[name]["cpu_ms_per_request"] = cpu[name] * 1000 / len(results[name])
        level["ratio"] = {
            key: level["gateway"][key] / level["direct"][key]
            for key in ("ttfb_p50", "ttfb_p95", "ttfb_p99", "total_p50", "rps")
        }
        level["added"] = {
            f"{name}_{share}": level[name][f"ttfb_{share}"] - level["direct"][f"ttfb_{share}"]
            for name in names[1:]
            for share in ("p50", "p99")
        }
        for floor in ("floor", "books"):
            level[f"{floor}_ratio"] = {
                "added_p50": level["added"]["gateway_p50"] / level["added"][f"{floor}_p50"],
                "added_p99": level["added"]["gateway_p99"] / level["added"][f"{floor}_p99"],
                "cpu": level["gateway"]["cpu_ms_per_request"] / level[floor]["cpu_ms_per_request"],
            }
        level["targets_met"] = {target: ratio <= TARGETS[target] for target, ratio in level["books_ratio"].items()}
        said_upstream = level["gateway"]["said_upstream_p50"]
        level["server_timing"] = {
            "gateway_p50": level["gateway"]["said_gateway_p50"],
            "upstream_p50": said_upstream,
            # The upstream's time to first byte as the gateway measured it, against a client's own.
            "agrees": abs(said_upstream - level["direct"]["ttfb_p50"]) <= 0.5,
        }
        level["added_ttfb_p50_ms"] = level["added"]["gateway_p50"]
        measured["levels"].append(level)
        print(
            f"concurrency {concurrency:>3}: TTFB p50 direct {level['direct']['ttfb_p50']:.1f} ms, added: "
            + ", ".join(f"{name} {level['added'][f'{name}_p50']:+.2f} ms" for name in names[1:])
            + f" (gateway ×{level['books_ratio']['added_p50']:.2f} the floor with books'); req/s "
            f"{level['direct']['rps']:.1f} vs {level['gateway']['rps']:.1f} (×{level['ratio']['rps']:.3f}); "
            "CPU ms/request "
            + ", ".join(f"{name} {level[name]['cpu_ms_per_request']:.1f}" for name in samplers)
            + f"; failed {level['gateway']['failed']}",
            file=sys.stderr,
        )
    app_url, headers, app_process = paths["gateway"]
    measured["balance_concurrency"] = 16
    measured["balance_rps"] = balance_rps(app_url, headers, 16, 1.0 if args.smoke else 5.0)
    measured["large_body"] = large_body(app_url, headers, samplers["gateway"], large * 1_000_000)

    return measured


def upstreams_table(args, headers, standin_env, app_env, app_args) -> list[dict]:
    """Two gateway hosts of `args.workers` workers each in front of one stand-in, then two, each stand-in
    taking at most 8 streams at once (UPSTREAM_MAX_STREAMS=8, kept by all the gateways together):
    16 concurrent clients queue for the one, and are spread over the two. Each stand-in (one worker)
    says the most streams it was sent at once."""
    concurrency, count, max_streams, hosts = (4, 8, 2, 2) if args.smoke else (16, 256, 8, 2)
    standin_args = ("--config", os.devnull, "--workers", "1", "--worker-class", "gthread", "--threads", "32")
    rows = []
    for servers in (1, 2):
        with contextlib.ExitStack() as stack:
            standins = [
                stack.enter_context(launch.gunicorn("bench.standin:app", standin_env, standin_args, "/v1/models"))[0]
                for _ in range(servers)
            ]
            env = {
                **app_env,
                "UPSTREAM_URL": ",".join(f"{url}/v1" for url in standins),
                "UPSTREAM_MAX_STREAMS": str(max_streams),
                "UPSTREAM_QUEUE": "256",
                "UPSTREAM_QUEUE_PER_ACCOUNT": "256",
                "UPSTREAM_QUEUE_SECONDS": "60",
            }
            gateways = [launch.gunicorn("wsgi:app", env, app_args, "/healthz") for _ in range(hosts)]
            urls = [stack.enter_context(gateway)[0] for gateway in gateways]
            drive(urls, headers, concurrency, concurrency)
            results, wall = drive(urls, headers, concurrency, count, ramp=args.ramp)
            most = [requests.get(f"{url}/stats", timeout=10).json()["most"] for url in standins]
        rows.append(
            {
                "upstreams": servers,
                "hosts": hosts,
                "workers": int(app_env["WEB_CONCURRENCY"]),
                "max_streams": max_streams,
                "concurrency": concurrency,
                "most": most,
                **summarise(results, wall),
            }
        )
        print(f"{servers} speech server(s): most streams at once {most} (limit {max_streams})", file=sys.stderr)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a short run: few requests, two levels")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per level and path (default 32 per concurrent stream, at least 256)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/kokoro_bench"),
        help="a PostgreSQL database the benchmark may empty (created if missing)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds per level, direct and gateway alternating",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.5,
        help="seconds over which a round's clients start (about one request's length at the stand-in's defaults)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--large-mb", type=int, default=50)
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out even when installed")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = 2
    levels = [1, 4] if args.smoke else [int(level) for level in args.levels.split(",")]
    large = 5 if args.smoke else args.large_mb

    from app.config import database_url

    db_url = database_url(args.database_url)
    secret = prepare_database(db_url)
    headers = {"Authorization": f"Bearer {secret}"}
    standin_env = {"STANDIN_TTFB_MS": "50", "STANDIN_SPEED": "20", "STANDIN_BITRATE_KBPS": "128"}
    # A smoke run checks that every path runs and is written up, not what it measures: its paths' audio is
    # made 5× faster. The several-servers table keeps the real pace, so its streams overlap up to the limit.
    speed = 100 if args.smoke else 20
    app_env = {
        "DATABASE_URL": db_url,
        "SECRET_KEY": "bench",
        "WEB_CONCURRENCY": str(args.workers),
        "GUNICORN_THREADS": str(args.threads),
        "RATE_LIMIT_PER_KEY": "100000000/minute",
        "RATE_LIMIT_PER_ACCOUNT": "100000000/minute",
        "MAX_STREAMS_PER_ACCOUNT": "100000",
        # Several workers share their rate limits in Redis (gunicorn.conf.py refuses memory:// with more than one).
        "RATELIMIT_STORAGE_URI": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "DATABASE_POOL_SIZE": str(args.threads),
    }
    report = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "levels": [],
        "standin": f"TTFB 50 ms, 128 kbit/s audio made at {speed}× real time",
        "gunicorn": f"{args.workers} gthread workers × {args.threads} threads",
        "rounds": args.rounds,
        "ramp_s": args.ramp,
    }
    # The stand-in: not the gateway's gunicorn.conf.py, with threads for every stream at once.
    standin_args = ("--config", os.devnull, "--workers", "2", "--worker-class", "gthread", "--threads", "256")
    # The floor and the gateway: the gateway's own gunicorn.conf.py, access logs off.
    app_args = ("--config", "gunicorn.conf.py", "--access-logfile", "/dev/null")
    paced = {**standin_env, "STANDIN_SPEED": str(speed)}
    with launch.gunicorn("bench.standin:app", paced, standin_args, "/v1/models") as (standin_url, _):
        app_env["UPSTREAM_URL"] = f"{standin_url}/v1"
        with contextlib.ExitStack() as stack:
            floor_url, floor_process = stack.enter_context(
                launch.gunicorn("bench.floor:app", app_env, app_args, "/ready")
            )
            books_url, books_process = stack.enter_context(
                launch.gunicorn("bench.floor:books", app_env, app_args, "/ready")
            )
            app_url, app_process = stack.enter_context(launch.gunicorn("wsgi:app", app_env, app_args, "/healthz"))
            paths = {
                "direct": (standin_url, headers, None),
                "floor": (floor_url, headers, floor_process),
                "books": (books_url, headers, books_process),
                "gateway": (app_url, headers, app_process),
            }
            if litellm.available() and not args.no_litellm:
                litellm_url, litellm_process, litellm_headers = stack.enter_context(
                    litellm.proxy(standin_url, args.workers)
                )
                paths["litellm"] = (litellm_url, litellm_headers, litellm_process)
                report["litellm"] = litellm.DESCRIPTION
            else:
                print("LiteLLM is not installed (make bench-litellm): its row is left out.", file=sys.stderr)
            report.update(measure(args, levels, large, paths))
    # Several speech servers, with the gateway's own worker count on each of two hosts: the limits are shared.
    report["upstreams"] = upstreams_table(args, headers, standin_env, app_env, app_args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, stem.with_suffix(".png"))
    print(text)
    print(f"written: {stem}.md, .json, .png", file=sys.stderr)
    return report


def _exit_on_sigterm(signum, frame):
    # As Ctrl+C would: the servers this run started are stopped on the way out, not left running.
    sys.exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
