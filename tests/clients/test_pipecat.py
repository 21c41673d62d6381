"""pipecat's OpenAITTSService (pipecat-ai/pipecat, src/pipecat/services/openai/tts.py).

`AsyncOpenAI.audio.speech.with_streaming_response.create(input, model="gpt-4o-mini-tts",
voice=<"alloy" by default>, response_format="pcm")`, `instructions` and `speed` only when
set; the body is read with `iter_bytes(chunk_size)` as 24 kHz 16-bit mono frames.
"""

import asyncio

from openai import AsyncOpenAI

from tests.clients.audio import seconds_of
from tests.clients.conftest import charged_once

TEXT = "Sure, I can help you with that."


async def pipecat_says(base_url: str, key: str) -> bytes:
    client = AsyncOpenAI(base_url=base_url, api_key=key)
    create_params = {"input": TEXT, "model": "gpt-4o-mini-tts", "voice": "alloy", "response_format": "pcm"}
    frames = bytearray()
    async with client.audio.speech.with_streaming_response.create(**create_params) as r:
        assert r.status_code == 200
        async for chunk in r.iter_bytes(1024):
            frames.extend(chunk)
    await client.close()
    return bytes(frames)


def test_raw_pcm_frames(gateway, customer):
    app, base_url = gateway
    audio = asyncio.run(pipecat_says(base_url, customer.secret))
    assert seconds_of(audio, "pcm") > 1.0
    charged_once(app, customer, TEXT)
