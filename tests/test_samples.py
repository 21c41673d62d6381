"""The landing page's samples are made before a visitor asks (app/samples.py)."""

import pytest

from app import samples
from tests.fake_upstream import FakeUpstream
from tests.servers import serve

VOICES = ["af_heart", "am_michael", "bf_emma"]


@pytest.fixture
def upstream():
    stand_in = FakeUpstream()
    with serve(stand_in) as url:
        stand_in.url = f"{url}/v1"
        yield stand_in


def prepare(app):
    return app.test_cli_runner().invoke(args=["samples", "prepare"])


def test_samples_prepared_at_start_play_at_once_without_asking_the_speech_server(make_app, upstream, tmp_path):
    result = prepare(make_app(UPSTREAM_URL=upstream.url, SAMPLES_DIR=str(tmp_path / "samples"), SAMPLE_VOICES=VOICES))
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.output.splitlines()] == VOICES
    assert len(upstream.received) == 3
    # A gateway started afterwards (nothing listens at the stub address) plays every one.
    gateway = make_app(SAMPLES_DIR=str(tmp_path / "samples"), SAMPLE_VOICES=VOICES).test_client()
    for voice in VOICES:
        answer = gateway.get(f"/playground/samples/{voice}.mp3")
        assert answer.status_code == 200 and answer.data == b"ID3\x04audio-bytes", voice
    assert len(upstream.received) == 3


def test_preparing_again_makes_only_what_is_missing(make_app, upstream, tmp_path):
    app = make_app(UPSTREAM_URL=upstream.url, SAMPLES_DIR=str(tmp_path / "samples"), SAMPLE_VOICES=VOICES)
    prepare(app)
    again = prepare(app)
    assert again.exit_code == 0 and again.output.count("kept already") == 3
    assert len(upstream.received) == 3


def test_a_sample_made_on_a_click_is_kept_for_the_next_start(make_app, upstream, tmp_path):
    first = make_app(UPSTREAM_URL=upstream.url, SAMPLES_DIR=str(tmp_path / "samples")).test_client()
    assert first.get("/playground/samples/af_heart.mp3").status_code == 200
    assert prepare(
        make_app(UPSTREAM_URL=upstream.url, SAMPLES_DIR=str(tmp_path / "samples"), SAMPLE_VOICES=["af_heart"])
    ).output == ("af_heart: kept already\n")
    assert len(upstream.received) == 1


def test_a_changed_sentence_is_made_anew_not_served_from_the_old_recording(make_app, upstream, tmp_path, monkeypatch):
    app = make_app(UPSTREAM_URL=upstream.url, SAMPLES_DIR=str(tmp_path / "samples"), SAMPLE_VOICES=["af_heart"])
    prepare(app)
    monkeypatch.setattr(samples, "SAMPLE_TEXT", "Hi, I am {name}.")
    assert "af_heart: made" in prepare(app).output
    assert upstream.received[-1]["input"] == "Hi, I am Heart."


def test_preparing_while_the_speech_server_is_down_says_so_and_fails(make_app, tmp_path):
    result = prepare(make_app(SAMPLES_DIR=str(tmp_path / "samples"), SAMPLE_VOICES=["af_heart"]))
    assert result.exit_code == 1 and "cannot be reached" in result.output
    assert not (tmp_path / "samples").exists()
