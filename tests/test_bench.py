"""A short smoke run of the benchmark (the numbers themselves are read by people, not asserted)."""

import json

import pytest

from tests.conftest import PG_URL


def test_the_benchmark_runs_and_writes_its_table_json_and_plot(postgres_only, tmp_path):
    from bench import run

    bench_url = PG_URL.rsplit("/", 1)[0] + "/kokoro_bench"
    report = run.main(["--smoke", "--database-url", bench_url, "--out", str(tmp_path)])
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["direct"]["failed"] == level["floor"]["failed"] == level["gateway"]["failed"] == 0
        assert level["gateway"]["requests"] == level["floor"]["requests"] == level["direct"]["requests"] == 8
        assert level["gateway"]["mb"] == level["floor"]["mb"] == level["direct"]["mb"] > 0
        # The gateway says where its time went; the floor's CPU is measured to compare against.
        assert level["server_timing"]["upstream_p50"] > 0 and level["server_timing"]["gateway_p50"] > 0
        assert level["floor"]["cpu_ms_per_request"] > 0
    one, two = report["upstreams"]
    assert (one["upstreams"], two["upstreams"]) == (1, 2) and one["failed"] == two["failed"] == 0
    assert report["large_body"]["status"] == 200 and report["large_body"]["bytes"] == 5_000_000
    assert report["balance_rps"] > 0
    [table] = tmp_path.glob("bench-*.md")
    assert "gateway/direct" in table.read_text() and "| floor |" in table.read_text()
    assert json.loads(next(tmp_path.glob("bench-*.json")).read_text())["levels"]
    assert next(tmp_path.glob("bench-*.png")).stat().st_size > 10_000


@pytest.mark.engine
def test_the_engine_benchmark_runs_both_engines_and_writes_its_table(tmp_path):
    from bench import engine

    report = engine.main(["--smoke", "--out", str(tmp_path)])
    for variant in ("before", "now"):
        assert report[variant]["one_sentence_first"] > 0 and set(report[variant]["levels"]) == {1, 2}
        assert report[variant]["interleaved"]["busy_p50"] > 0
    [table] = tmp_path.glob("engine-*.md")
    assert "| first byte, one sentence of 94 characters |" in table.read_text()
