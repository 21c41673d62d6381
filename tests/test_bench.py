"""A short smoke run of the benchmark (the numbers themselves are read by people, not asserted)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PG_URL


def test_the_benchmark_runs_and_writes_its_table_json_and_plot(postgres_only, tmp_path):
    from bench import run

    bench_url = PG_URL.rsplit("/", 1)[0] + "/kokoro_bench"
    # LiteLLM, when installed (make bench-litellm), is left out: its start alone takes longer than this run.
    report = run.main(["--smoke", "--no-litellm", "--database-url", bench_url, "--out", str(tmp_path)])
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    assert report["paths"] == ["direct", "floor", "books", "gateway"]
    for level in report["levels"]:
        for path in report["paths"]:
            assert level[path]["failed"] == 0 and level[path]["requests"] == 8
            assert level[path]["mb"] == level["direct"]["mb"] > 0
        # The gateway says where its time went; the floors' CPU is measured to compare against.
        assert level["server_timing"]["upstream_p50"] > 0 and level["server_timing"]["gateway_p50"] > 0
        assert level["floor"]["cpu_ms_per_request"] > 0 and level["books"]["cpu_ms_per_request"] > 0
        assert set(level["targets_met"]) == {"added_p50", "added_p99", "cpu"}
    one, two = report["upstreams"]
    assert (one["upstreams"], two["upstreams"]) == (1, 2) and one["failed"] == two["failed"] == 0
    # Two hosts of two workers each kept every stand-in to its limit.
    assert one["hosts"] == two["hosts"] == 2 and one["workers"] == two["workers"] == 2
    assert one["most"] == [one["max_streams"]] and max(two["most"]) <= two["max_streams"]
    assert report["large_body"]["status"] == 200 and report["large_body"]["bytes"] == 5_000_000
    assert report["balance_rps"] > 0
    [table] = tmp_path.glob("bench-*.md")
    text = table.read_text()
    assert "gateway/direct" in text and "| floor |" in text and "| books |" in text
    assert json.loads(next(tmp_path.glob("bench-*.json")).read_text())["levels"]
    assert next(tmp_path.glob("bench-*.png")).stat().st_size > 10_000


def test_a_benchmark_stopped_with_sigterm_stops_every_server_it_started(postgres_only, tmp_path):
    # A database of its own: the smoke run above may be emptying and filling kokoro_bench at the same time.
    bench_url = PG_URL.rsplit("/", 1)[0] + "/kokoro_bench_stopped"
    command = [sys.executable, "-m", "bench.run", "--smoke", "--no-litellm", "--database-url", bench_url]
    run = subprocess.Popen([*command, "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # Until the stand-in, both floors and the gateway run: four gunicorn masters of two workers each.
        while len(servers := _descendants(run.pid)) < 4 * 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(servers) >= 12, servers
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) != 0
    finally:
        run.kill()
    time.sleep(1)
    assert [pid for pid in servers if _alive(pid)] == []


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.engine
def test_the_engine_benchmark_runs_both_engines_and_writes_its_table(tmp_path):
    from bench import engine

    report = engine.main(["--smoke", "--out", str(tmp_path)])
    for variant in ("before", "now"):
        assert report[variant]["one_sentence_first"] > 0 and set(report[variant]["levels"]) == {1, 2}
        assert report[variant]["interleaved"]["busy_p50"] > 0
    [table] = tmp_path.glob("engine-*.md")
    assert "| first byte, one sentence of 94 characters |" in table.read_text()
