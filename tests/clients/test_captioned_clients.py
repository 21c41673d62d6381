"""Word timings read by real clients, in front of both upstreams.

- openai-python, unchanged: `audio.speech.create(…, stream_format="sse")` with the field it does
  not know passed as `extra_body` (how its README says to send one), its response's text read
  as server-sent events; the extra `speech.audio.timestamps` events sit beside OpenAI's own.
- Kokoro-FastAPI's captioned client (its examples/assorted_checks/test_dialogue/caption_dialogue.py):
  `POST {host}/dev/captioned_speech` with `"stream": false, "return_timestamps": true`, then
  `audio` decoded from base64 and `timestamps` read as `word`, `start_time`, `end_time`. Also
  its streamed form (the route's default): one JSON object per line.
"""

import base64
import json

import requests
from openai import OpenAI

from tests.clients.audio import seconds_of
from tests.clients.conftest import charged_once

TEXT = "Captions, from the model itself. Every word is timed, even 3.5 percent."


def in_order(words: list[dict], seconds: float) -> None:
    starts = [w["start_time"] for w in words]
    assert starts == sorted(starts) and all(w["start_time"] <= w["end_time"] <= seconds + 0.05 for w in words)


def test_openai_python_reads_timing_events_beside_the_audio(gateway, customer):
    app, base_url = gateway
    client = OpenAI(base_url=base_url, api_key=customer.secret)
    response = client.audio.speech.create(
        model="kokoro",
        voice="af_heart",
        input=TEXT,
        response_format="pcm",
        stream_format="sse",
        extra_body={"return_timestamps": True},
    )
    events = [json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    words = [w for e in events if e["type"] == "speech.audio.timestamps" for w in e["words"]]
    seconds = seconds_of(audio, "pcm")
    assert seconds > 1.0 and events[-1]["type"] == "speech.audio.done"
    in_order(words, seconds)
    # Each word points at the text it was sent as.
    assert [TEXT[w["char_start"] : w["char_end"]] for w in words if w["char_start"] is not None] == [
        w["word"] for w in words if w["char_start"] is not None
    ]
    assert {w["word"].strip(",.") for w in words} >= {"Captions", "model", "timed"}
    charged_once(app, customer, TEXT)


def test_kokoro_fastapis_caption_client_gets_audio_and_timestamps(gateway, customer):
    app, base_url = gateway
    host = base_url.removesuffix("/v1")
    response = requests.post(
        f"{host}/dev/captioned_speech",
        json={
            "model": "kokoro",
            "input": TEXT,
            "voice": "af_heart",
            "response_format": "mp3",
            "stream": False,
            "return_timestamps": True,
        },
        headers={"Authorization": f"Bearer {customer.secret}"},
        timeout=60,
    )
    response.raise_for_status()
    answer = json.loads(response.content)
    seconds = seconds_of(base64.b64decode(answer["audio"].encode("utf-8")), "mp3")
    assert seconds > 1.0 and answer["audio_format"] == "audio/mpeg"
    in_order(answer["timestamps"], seconds)
    charged_once(app, customer, TEXT)


def test_kokoro_fastapis_streamed_captions_line_by_line(gateway, customer):
    app, base_url = gateway
    host = base_url.removesuffix("/v1")
    with requests.post(
        f"{host}/dev/captioned_speech",
        json={"model": "kokoro", "input": TEXT, "voice": "af_heart", "response_format": "pcm"},
        headers={"Authorization": f"Bearer {customer.secret}"},
        stream=True,
        timeout=60,
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    audio = b"".join(base64.b64decode(line["audio"]) for line in lines)
    in_order([w for line in lines for w in line["timestamps"]], seconds_of(audio, "pcm"))
    charged_once(app, customer, TEXT)
