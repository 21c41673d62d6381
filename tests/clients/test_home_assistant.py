"""Home Assistant's OpenAI TTS (home-assistant/core, homeassistant/components/openai_conversation/tts.py).

`AsyncOpenAI.audio.speech.with_streaming_response.create(model=<the subentry's model,
gpt-4o-mini-tts by default>, voice=<marin by default>, input, instructions=str(prompt),
speed, response_format=<mp3, opus, aac, flac, wav or pcm>)`, the body read with
`iter_bytes()`. `instructions` is always sent: "None" when no prompt is set.
"""

import asyncio

import pytest
from openai import AsyncOpenAI

from tests.clients.audio import seconds_of
from tests.clients.conftest import charged_once

TEXT = "The front door is open."


async def home_assistant_says(base_url: str, key: str, response_format: str, voice: str = "marin") -> bytes:
    client = AsyncOpenAI(base_url=base_url, api_key=key)
    async with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice=voice,
        input=TEXT,
        instructions=str(None),
        speed=1.0,
        response_format=response_format,
    ) as response:
        response_data = bytearray()
        async for chunk in response.iter_bytes():
            response_data.extend(chunk)
    await client.close()
    return bytes(response_data)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_home_assistant_offers(gateway, customer, response_format):
    app, base_url = gateway
    audio = asyncio.run(home_assistant_says(base_url, customer.secret, response_format))
    assert seconds_of(audio, response_format) > 0.5
    charged_once(app, customer, TEXT)
