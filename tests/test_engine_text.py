"""The embedded engine never breaks off mid-stream for any text the gateway accepts.

A break after audio has gone out is the one failure a client could use to keep audio
that the books refund, so every text is checked before its first byte: either it
streams to its end, or it is refused before any audio (and refunded in full).
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ApiError
from app.speech import read_order
from engine.server import create_app

pytestmark = pytest.mark.engine

HARD_TEXTS = {
    "emoji": "Great job 😀🎉👍🏽 everyone.",
    "emoji only": "😀🎉👨\u200d👩\u200d👧",
    "cjk": "你好世界。日本語のテキストです。",
    "digits": "1234567890 and 3.14159.",
    "currency": "$12.50, €3, £7 and ¥100. ₹ too.",
    "a 400-character word": "a" * 400,
    "only punctuation": "?!.,;:--...",
    "mixed scripts": "Hello мир שלום 世界 مرحبا. Fin.",
    "private use last": "A fine sentence. \ue000\uf8ff",
    "noncharacters": "Before. \ufffe\uffff. After.",
    "arabic digits": "Numbers: ٠١٢٣.",
    "line breaks": "One line.\nAnother,\tindented.\r\n",
}


def stream_to_the_end(engine, text: str) -> tuple[int, int]:
    """(status, audio bytes) of a PCM synthesis; raises if the stream breaks off after it began."""
    response = engine.post("/v1/audio/speech", json={"input": text, "voice": "af_heart", "response_format": "pcm"})
    body = b"".join(response.response)
    return response.status_code, len(body)


@pytest.fixture(scope="module")
def engine(synthesizer):
    return create_app(synthesizer).test_client()


@pytest.mark.parametrize("name", HARD_TEXTS)
def test_hard_texts_stream_to_the_end(engine, name):
    status, size = stream_to_the_end(engine, HARD_TEXTS[name])
    assert status == 200 and size > 0


def test_text_with_nothing_to_say_is_refused_before_any_audio(engine):
    response = engine.post("/v1/audio/speech", json={"input": "\ue000\uf8ff", "response_format": "pcm"})
    assert response.status_code == 422 and response.get_json()["detail"][0]["msg"] == "Input text produces no speech"


def test_a_lone_surrogate_sent_straight_to_the_engine_is_refused_before_any_audio(engine):
    raw = b'{"input": "Hello there. And a last sentence \\ud800.", "response_format": "pcm"}'
    response = engine.post("/v1/audio/speech", data=raw, content_type="application/json")
    # The pieces it can say are spoken; the one it cannot is skipped before the stream starts.
    assert response.status_code == 200 and len(b"".join(response.response)) > 0


def accepted_by_the_gateway(text: str) -> bool:
    try:
        read_order({"input": text}, 4096)
    except ApiError:
        return False
    return True


texts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from("😀你好٣€.!? \n"),
    min_size=1,
    max_size=40,
).filter(accepted_by_the_gateway)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_any_text_the_gateway_accepts_streams_to_the_end_or_is_refused_before_audio(engine, text):
    status, size = stream_to_the_end(engine, text)
    assert status in (200, 422), (status, text)
    assert size > 0
