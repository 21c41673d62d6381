"""Word timings through the gateway: asked for on /v1/audio/speech or on Kokoro-FastAPI's captioned
route, metered as speech, refunded as speech, and never ahead of the audio they describe."""

import base64
import json
import threading

import pytest
import requests

from app import captions
from app.speech import StreamAborted
from tests import factories
from tests.fake_upstream import FakeUpstream
from tests.servers import serve
from tests.test_paid_audio import in_chunks, pcm_of

SPEECH = "/v1/audio/speech"
CAPTIONED = "/dev/captioned_speech"
TEXT = "Dr. Smith paid $5.20 on 3/4. Then he left."
ASK = {"model": "kokoro", "input": TEXT, "voice": "af_sky", "response_format": "pcm", "return_timestamps": True}


@pytest.fixture
def upstream():
    return FakeUpstream(in_chunks(pcm_of(2.0), 4))


@pytest.fixture
def app(make_app, upstream):
    with serve(upstream) as upstream_url:
        yield make_app(UPSTREAM_URL=f"{upstream_url}/v1")


def sse_events(data: bytes) -> list[dict]:
    return [json.loads(block[len("data: ") :]) for block in data.decode().split("\n\n")[:-1]]


def assert_spans(words: list[dict], text: str = TEXT) -> None:
    assert [w["word"] for w in words] == text.split()
    assert all(text[w["char_start"] : w["char_end"]] == w["word"] for w in words)


def test_sse_sends_each_words_timings_with_the_audio_they_describe(client, customer, upstream):
    response = client.post(SPEECH, json={**ASK, "stream_format": "sse"}, headers=customer.headers)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(response.data)
    assert [e["type"] for e in events].count("speech.audio.delta") == 4
    audio, words = b"", []
    for event in events:
        if event["type"] == "speech.audio.timestamps":
            words += event["words"]
        elif event["type"] == "speech.audio.delta":
            audio += base64.b64decode(event["audio"])
            # Every timing so far describes audio that has arrived with it or before.
            assert all(w["start_time"] <= len(audio) / 48000 for w in words)
    assert audio == pcm_of(2.0)
    assert_spans(words)
    assert events[-1]["type"] == "speech.audio.done"
    # The gateway asked the captioned route; metered as any speech: one credit per character.
    assert upstream.received[-1]["path"] == CAPTIONED and upstream.received[-1]["return_timestamps"] is True
    assert factories.balance(client.application, customer.team_id) == 1000 - len(TEXT)
    [speech] = factories.speech_requests(client.application, customer.team_id)
    assert speech.state == "delivered" and speech.audio_ms == 2000


def test_without_sse_one_json_answer_in_kokoro_fastapis_captioned_shape(client, customer):
    response = client.post(SPEECH, json=ASK, headers=customer.headers)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    body = response.get_json()
    assert set(body) == {"audio", "audio_format", "timestamps"} and body["audio_format"] == "audio/pcm"
    assert base64.b64decode(body["audio"]) == pcm_of(2.0)
    assert_spans(body["timestamps"])
    assert response.headers["X-Credits-Charged"] == str(len(TEXT))
    assert factories.balance(client.application, customer.team_id) == 1000 - len(TEXT)


def test_kokoro_fastapis_own_route_and_body_work_unchanged(client, customer):
    streamed = client.post(
        CAPTIONED, json={"input": TEXT, "voice": "af_sky", "response_format": "pcm"}, headers=customer.headers
    )
    assert streamed.status_code == 200 and streamed.headers["Content-Type"] == "application/json"
    lines = [json.loads(line) for line in streamed.data.decode().splitlines()]
    assert len(lines) == 4 and all(set(line) == {"audio", "audio_format", "timestamps"} for line in lines)
    assert b"".join(base64.b64decode(line["audio"]) for line in lines) == pcm_of(2.0)
    assert_spans([w for line in lines for w in line["timestamps"]])
    whole = client.post(
        CAPTIONED, json={"input": TEXT, "response_format": "pcm", "stream": False}, headers=customer.headers
    )
    assert base64.b64decode(whole.get_json()["audio"]) == pcm_of(2.0)
    assert factories.balance(client.application, customer.team_id) == 1000 - 2 * len(TEXT)


@pytest.mark.parametrize("route", [SPEECH, CAPTIONED])
def test_the_speech_server_is_asked_for_streamed_lines_however_the_client_asked(client, customer, upstream, route):
    """Word timings are relayed from Kokoro-FastAPI's captioned lines, as they come: a client's `"stream": false`
    (one answer, for the client) is the gateway's business, and never reaches the server."""
    response = client.post(route, json={**ASK, "stream": False}, headers=customer.headers)
    assert response.status_code == 200
    asked = upstream.received[-1]
    assert asked["path"] == "/dev/captioned_speech" and (asked["stream"], asked["return_timestamps"]) == (True, True)


@pytest.mark.parametrize(
    ("asked", "words"), [({}, True), ({"return_timestamps": True}, True), ({"return_timestamps": False}, False)]
)
def test_the_captioned_route_sends_words_unless_told_not_to(client, customer, asked, words):
    body = {"input": TEXT, "voice": "af_sky", "response_format": "pcm", **asked}
    streamed = client.post(CAPTIONED, json=body, headers=customer.headers)
    lines = [json.loads(line) for line in streamed.data.decode().splitlines()]
    assert b"".join(base64.b64decode(line["audio"]) for line in lines) == pcm_of(2.0)
    whole = client.post(CAPTIONED, json={**body, "stream": False}, headers=customer.headers).get_json()
    assert base64.b64decode(whole["audio"]) == pcm_of(2.0)
    if words:
        assert_spans([w for line in lines for w in line["timestamps"]])
        assert_spans(whole["timestamps"])
    else:
        assert all(line["timestamps"] is None for line in lines) and whole["timestamps"] is None


def test_subtitles_on_the_captioned_route_need_the_whole_answer(client, customer, upstream):
    body = {"input": TEXT, "voice": "af_sky", "subtitles": "srt"}
    response = client.post(CAPTIONED, json=body, headers=customer.headers)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["message"], error["param"]) == ("'subtitles' needs \"stream\": false on this route.", "subtitles")
    assert upstream.received == [] and factories.balance(client.application, customer.team_id) == 1000
    whole = client.post(CAPTIONED, json={**body, "stream": False}, headers=customer.headers).get_json()
    assert whole["subtitles"] == captions.subtitles(whole["timestamps"], "srt")


def test_sse_subtitles_come_last_made_of_every_word_sent(client, customer):
    response = client.post(SPEECH, json={**ASK, "stream_format": "sse", "subtitles": "vtt"}, headers=customer.headers)
    events = sse_events(response.data)
    words = [w for e in events if e["type"] == "speech.audio.timestamps" for w in e["words"]]
    assert sum(e["type"] == "speech.audio.timestamps" for e in events) > 1
    assert events[-2] == {"type": "speech.audio.subtitles", "format": "vtt", "text": captions.subtitles(words, "vtt")}
    assert_spans(words)
    assert events[-1]["type"] == "speech.audio.done"


def test_the_captioned_route_needs_a_key_like_every_metered_route(client, customer):
    response = client.post(CAPTIONED, json={"input": TEXT})
    assert response.status_code == 401 and "detail" in response.get_json()
    assert factories.speech_requests(client.application, customer.team_id) == []


def test_words_in_front_of_kokoro_fastapi_are_found_in_the_input(make_app, customer):
    upstream = FakeUpstream(in_chunks(pcm_of(1.0), 3), captions="kokoro-fastapi")
    with serve(upstream) as upstream_url:
        client = make_app(UPSTREAM_URL=f"{upstream_url}/v1").test_client()
        body = client.post(SPEECH, json=ASK, headers=customer.headers).get_json()
    assert_spans(body["timestamps"])


class _Repeating(FakeUpstream):
    """Kokoro-FastAPI's streamed captions as its users report them: a line with null timestamps
    (remsky/Kokoro-FastAPI #331) and words sent again in the next line (#139)."""

    def _captioned(self, body):
        def line(audio, words):
            return json.dumps(
                {"audio": base64.b64encode(audio).decode(), "audio_format": "audio/pcm", "timestamps": words}
            )

        first = [
            {"word": "Then", "start_time": 0.0, "end_time": 0.2},
            {"word": "he", "start_time": 0.2, "end_time": 0.3},
        ]
        again = [*first, {"word": "left.", "start_time": 0.3, "end_time": 0.6}]
        audio = pcm_of(0.6)
        return self._send(
            [
                f"{line(audio[:9600], None)}\n{line(audio[9600:19200], first)}\n".encode(),
                f"{line(audio[19200:], again)}\n".encode(),
            ]
        )


def test_each_word_is_passed_on_once_whatever_the_server_repeats(make_app, customer):
    with serve(_Repeating(captions="kokoro-fastapi")) as upstream_url:
        client = make_app(UPSTREAM_URL=f"{upstream_url}/v1").test_client()
        body = client.post(SPEECH, json={**ASK, "input": "Then he left."}, headers=customer.headers).get_json()
    assert [(w["word"], w["char_start"], w["char_end"]) for w in body["timestamps"]] == [
        ("Then", 0, 4),
        ("he", 5, 7),
        ("left.", 8, 13),
    ]
    assert base64.b64decode(body["audio"]) == pcm_of(0.6)


def test_an_upstream_that_cannot_give_timings_is_a_400_before_any_charge(make_app, customer):
    upstream = FakeUpstream(in_chunks(pcm_of(1.0), 3), captions=None)
    with serve(upstream) as upstream_url:
        client = make_app(UPSTREAM_URL=f"{upstream_url}/v1").test_client()
        response = client.post(SPEECH, json=ASK, headers=customer.headers)
        assert response.status_code == 400
        error = response.get_json()["error"]
        assert (error["code"], error["param"]) == ("timestamps_unsupported", "return_timestamps")
        assert error["message"] == (
            "The speech server behind this API cannot give word timings. Nothing was charged. Ask for the audio "
            "alone: POST /v1/audio/speech without 'return_timestamps' and 'subtitles'."
        )
        assert upstream.received == []
        assert factories.balance(client.application, customer.team_id) == 1000
        # Plain speech still works in front of it.
        assert (
            client.post(SPEECH, json={**ASK, "return_timestamps": False}, headers=customer.headers).status_code == 200
        )


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("return_timestamps", "yes", "'return_timestamps' must be true or false."),
        ("subtitles", "ass", "'subtitles' must be 'srt' or 'vtt'."),
    ],
)
def test_bad_caption_fields_are_400_and_charge_nothing(client, customer, upstream, field, value, message):
    response = client.post(SPEECH, json={**ASK, field: value}, headers=customer.headers)
    assert response.status_code == 400 and response.get_json()["detail"] == message
    assert upstream.received == [] and factories.balance(client.application, customer.team_id) == 1000


def test_a_break_mid_stream_refunds_as_speech_and_sends_no_timing_for_audio_not_sent(make_app, customer):
    upstream = FakeUpstream(in_chunks(pcm_of(2.0), 10), break_after=5)
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1", SPEECH_CHARS_PER_SECOND=1.0)
        with serve(app) as url:
            text = " ".join(f"w{i}" for i in range(40)) + "."
            response = requests.post(
                f"{url}{SPEECH}",
                json={**ASK, "input": text, "stream_format": "sse"},
                headers=customer.headers,
                timeout=10,
            )
    events = sse_events(response.content)
    assert events[-1]["type"] == "error"
    delivered = sum(len(base64.b64decode(e["audio"])) for e in events if e["type"] == "speech.audio.delta")
    words = [w for e in events if e["type"] == "speech.audio.timestamps" for w in e["words"]]
    assert delivered == 5 * len(pcm_of(2.0)) // 10
    # Five of ten chunks went out, and only the words those chunks hold (four of forty per chunk).
    assert [w["word"] for w in words] == text.split()[:20]
    assert all(w["end_time"] <= delivered / 48000 for w in words)
    [speech] = factories.speech_requests(app, customer.team_id)
    # As any speech: 1 s delivered at 1 character a second keeps 1 credit.
    assert speech.state == "refunded" and speech.audio_ms == 1000
    assert factories.balance(app, customer.team_id) == 1000 - 1
    factories.assert_books_balance(app, customer.team_id)


def test_a_break_before_a_json_answer_is_refunded_in_full(make_app, customer):
    upstream = FakeUpstream(in_chunks(pcm_of(2.0), 10), break_after=5)
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        response = app.test_client().post(SPEECH, json=ASK, headers=customer.headers)
    assert response.status_code == 502 and "refunded" in response.get_json()["detail"]
    [speech] = factories.speech_requests(app, customer.team_id)
    assert speech.state == "refunded" and speech.credits_refunded == len(TEXT)
    assert factories.balance(app, customer.team_id) == 1000
    factories.assert_books_balance(app, customer.team_id)


@pytest.mark.parametrize("kind", ["srt", "vtt"])
def test_subtitles_come_in_the_same_answer_billed_once(client, customer, kind):
    response = client.post(SPEECH, json={**ASK, "subtitles": kind}, headers=customer.headers)
    body = response.get_json()
    assert body["subtitles"] == captions.subtitles(body["timestamps"], kind)
    text = body["subtitles"]
    assert text.startswith("WEBVTT\n\n" if kind == "vtt" else "1\n00:00:00")
    assert "Dr. Smith paid $5.20 on 3/4." in text.replace("\n", " ")
    assert factories.balance(client.application, customer.team_id) == 1000 - len(TEXT)


@pytest.mark.parametrize(
    "word,ends",
    [
        ("left.", True),
        ("3/4.", True),
        ("Why?", True),
        ("Yes.", True),
        ("No.", True),
        ("Dr.", False),
        ("Mrs.", False),
        ("a.m.", False),
        ("U.S.", False),
        ('"Dr.', False),  # quotes and brackets before a title are not part of it
        ("(Mr.", False),
        ("XCo.", True),  # only those: a word that merely ends like a title is not one
        ("Hm..", False),  # a full stop inside
        ("MAX", False),
    ],
)
def test_a_cue_ends_at_a_sentences_end_not_at_an_abbreviation(word, ends):
    assert captions.ends_sentence(word) is ends


def test_a_short_cue_stays_up_a_second_but_never_over_the_next():
    words = [
        {"word": "Yes.", "start_time": 0.0, "end_time": 0.3},
        {"word": "No.", "start_time": 0.6, "end_time": 0.8},
        {"word": "Maybe.", "start_time": 3.0, "end_time": 3.4},
    ]
    assert [(cue.start, cue.end) for cue in captions.cues(words)] == [(0.0, 0.6), (0.6, 1.6), (3.0, 4.0)]


def test_subtitle_cues_keep_to_two_short_lines_and_a_few_seconds():
    words = [
        {"word": f"word{i:02d}", "start_time": i * 0.4, "end_time": i * 0.4 + 0.3, "char_start": 0, "char_end": 0}
        for i in range(60)
    ]
    cues = captions.cues(words)
    assert len(cues) > 4
    for cue in cues:
        lines = cue.text.split("\n")
        assert len(lines) <= 2 and all(len(line) <= captions.MAX_LINE for line in lines)
        assert cue.end - cue.start <= captions.MAX_CUE_SECONDS
    assert [w for cue in cues for w in cue.text.split()] == [w["word"] for w in words]
    # Six words of six letters fill a line of 42; two lines make a cue of twelve words, 4.7 s long.
    srt = captions.subtitles(words, "srt")
    first = " ".join(f"word{i:02d}" for i in range(6)) + "\n" + " ".join(f"word{i:02d}" for i in range(6, 12))
    assert srt.startswith(f"1\n00:00:00,000 --> 00:00:04,700\n{first}\n\n2\n00:00:04,800 --> ")
    vtt = captions.subtitles(words, "vtt")
    assert vtt.startswith(f"WEBVTT\n\n00:00:00.000 --> 00:00:04.700\n{first}\n\n00:00:04.800 --> ")


class _Lines(FakeUpstream):
    """A captioned route that sends the lines it is given, each as a chunk."""

    def __init__(self, *lines: bytes):
        super().__init__(captions="ours")
        self.lines = list(lines)

    def _captioned(self, body):
        return self._send(self.lines)


def caption_line(audio: bytes, words) -> bytes:
    return (
        json.dumps(
            {"audio": base64.b64encode(audio).decode(), "audio_format": "audio/pcm", "timestamps": words}
        ).encode()
        + b"\n"
    )


def ask_of(make_app, upstream, customer, **fields):
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        response = app.test_client().post(SPEECH, json={**ASK, **fields}, headers=customer.headers)
        [speech] = factories.speech_requests(app, customer.team_id)
        return app, response, speech


@pytest.mark.parametrize(
    "odd",
    [
        {"word": "Dr.", "start_time": 10**400, "end_time": 1},  # too large for a float
        {"word": "Dr.", "start_time": 1.7e306, "end_time": 1.8e306},  # a float, but no time in any audio
        {"word": "", "start_time": 0.1, "end_time": 0.2},  # not a word
        {"word": 5, "start_time": 0.1, "end_time": 0.2},
        "Dr.",  # not a timed word at all
    ],
)
def test_a_timing_no_audio_could_have_is_left_out_and_the_request_settles(make_app, customer, odd):
    upstream = _Lines(caption_line(pcm_of(0.5), [odd, {"word": "Smith", "start_time": 0.2, "end_time": 0.4}]))
    app, response, speech = ask_of(make_app, upstream, customer, subtitles="srt")
    assert response.status_code == 200
    assert [w["word"] for w in response.get_json()["timestamps"]] == ["Smith"]
    assert speech.state == "delivered"


NOT_CAPTIONED = "The speech server sent a line that is not captioned audio."


@pytest.mark.parametrize(
    "broken,said",
    [
        (b"[" * 200_000 + b"\n", NOT_CAPTIONED),
        (b'{"audio": 5}\n', NOT_CAPTIONED),
        (b"\xff\xfe not json\n", NOT_CAPTIONED),
        (b'{"audio": "", "timestamps": "Dr."}\n', "The speech server sent timestamps that are not a list."),
    ],
)
def test_a_line_that_is_not_captioned_audio_is_a_break_refunded_in_full(make_app, customer, broken, said):
    upstream = _Lines(caption_line(pcm_of(0.2), []), broken)
    app, response, speech = ask_of(make_app, upstream, customer)
    # The client and the books say what was wrong, not only that the stream ended.
    assert response.status_code == 502
    assert response.get_json()["error"]["message"] == f"{said} The undelivered part was refunded."
    assert response.get_json()["error"]["code"] == "upstream_error"
    assert speech.state == "refunded" and speech.error == said and factories.balance(app, customer.team_id) == 1000
    factories.assert_books_balance(app, customer.team_id)


@pytest.mark.parametrize("stream_format", [None, "sse"])
def test_captions_without_any_audio_are_refunded_in_full(make_app, customer, stream_format):
    upstream = _Lines(caption_line(b"", [{"word": "Dr.", "start_time": 0.0, "end_time": 0.1}]))
    app, response, speech = ask_of(make_app, upstream, customer, stream_format=stream_format)
    said = "The speech server sent no audio. The charge was refunded."
    if stream_format == "sse":
        assert sse_events(response.data)[-1] == {
            "type": "error",
            "error": {"message": said, "type": "server_error", "param": None, "code": "upstream_error"},
        }
    else:
        assert response.status_code == 502 and response.get_json()["detail"] == said
    assert speech.state == "refunded" and factories.balance(app, customer.team_id) == 1000
    assert speech.credits_refunded == speech.credits and speech.error == "The speech server sent no audio."
    # What the stream did is on the row, for the operator: the server answered 200, nothing went out.
    assert (speech.upstream_status, speech.bytes_sent, speech.audio_ms) == (200, 0, 0)
    assert speech.first_byte_ms is not None and speech.duration_ms is not None
    factories.assert_books_balance(app, customer.team_id)


def test_a_server_without_the_route_is_a_400_refunded_and_stays_in_service(make_app, customer):
    """Its document said nothing (unreachable at that moment): the route's 404 decides, refunded."""
    upstream = FakeUpstream(in_chunks(pcm_of(1.0), 3), captions=None)
    with serve(upstream) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        with app.app_context():
            from app import services

            services.upstream().has_captions = lambda: None
        client = app.test_client()
        refused = client.post(SPEECH, json=ASK, headers=customer.headers)
        assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "timestamps_unsupported"
        assert refused.get_json()["detail"] == (
            "The speech server behind this API cannot give word timings. The charge was refunded. "
            "Ask for the audio alone: POST /v1/audio/speech without 'return_timestamps' and 'subtitles'."
        )
        assert factories.balance(app, customer.team_id) == 1000
        # The server is not taken out: plain speech goes on at once.
        assert (
            client.post(SPEECH, json={**ASK, "return_timestamps": False}, headers=customer.headers).status_code == 200
        )


def test_a_word_is_found_in_the_input_only_as_a_whole_word_near_where_the_last_one_was():
    words = captions.Words("Route 1 ends gone")
    found = words.take(
        [
            {"word": "Route", "start_time": 0.0, "end_time": 0.3},
            {"word": "one", "start_time": 0.3, "end_time": 0.5},
            {"word": "ends", "start_time": 0.5, "end_time": 0.7},
            {"word": "gone", "start_time": 0.7, "end_time": 0.9},
        ]
    )
    assert [(w["char_start"], w["char_end"]) for w in found] == [(0, 5), (None, None), (8, 12), (13, 17)]


def test_the_same_word_twice_at_one_time_is_two_words_when_its_places_differ():
    words = captions.Words("Wait — — go")
    dashes = [{"word": "—", "start_time": 0.4, "end_time": 0.4, "char_start": at, "char_end": at + 1} for at in (5, 7)]
    assert [w["char_start"] for w in words.take(dashes)] == [5, 7]
    assert words.take(dashes) == []


def test_webvtt_cue_text_is_escaped_as_its_markup_needs():
    words = [
        {"word": w, "start_time": i * 0.5, "end_time": i * 0.5 + 0.4} for i, w in enumerate("R&D <b> --> ok".split())
    ]
    assert captions.subtitles(words, "vtt").splitlines()[3] == "R&amp;D &lt;b&gt; --&gt; ok"


LINES = [
    caption_line(b"one", [{"word": "Dr.", "start_time": 0.0, "end_time": 0.2}]),
    caption_line(b"two", [{"word": "Smith", "start_time": 0.2, "end_time": 0.5}]),
    caption_line(b"three", []),
]


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda a, b, c: [a + b + c], id="every line in one read"),
        pytest.param(lambda a, b, c: [a + b"\n" + b, c], id="a blank line between"),
        pytest.param(lambda a, b, c: [a[:9], a[9:] + b[:3], b[3:] + c[:-1]], id="lines cut anywhere, the last unended"),
        pytest.param(lambda a, b, c: [bytes([byte]) for byte in a + b + c], id="a byte at a time"),
    ],
)
def test_captioned_lines_are_read_whole_however_the_network_cuts_them(cut):
    chunks = cut(*LINES)
    assert [(line.audio, line.words) for line in captions.lines(chunks)] == [
        (b"one", [{"word": "Dr.", "start_time": 0.0, "end_time": 0.2}]),
        (b"two", [{"word": "Smith", "start_time": 0.2, "end_time": 0.5}]),
        (b"three", []),
    ]


def test_a_line_may_be_as_long_as_the_limit_and_not_a_byte_longer(monkeypatch):
    monkeypatch.setattr(captions, "MAX_LINE_BYTES", 16)
    whole = b'{"audio":"AAAA"}'
    assert [line.audio for line in captions.lines([whole, b"\n"])] == [b"\x00\x00\x00"]
    with pytest.raises(
        captions.NotCaptions, match=r"^The speech server sent a line longer than any captioned audio\.$"
    ):
        list(captions.lines([whole + b" ", b"\n"]))


def test_audio_that_is_not_strict_base64_is_not_captioned_audio():
    with pytest.raises(captions.NotCaptions, match=r"^The speech server sent a line that is not captioned audio\.$"):
        list(captions.lines([b'{"audio": "AA!AA"}\n']))


@pytest.mark.parametrize(
    "start,end,passed",
    [
        ("0.5", 1.0, None),  # a string is not a time
        (0.12345, 0.98765, (0.123, 0.988)),  # to the millisecond
        (captions.MAX_SECONDS, captions.MAX_SECONDS, (captions.MAX_SECONDS, captions.MAX_SECONDS)),
        (captions.MAX_SECONDS + 0.001, captions.MAX_SECONDS + 0.002, None),
    ],
)
def test_a_words_times_are_passed_on_to_the_millisecond_when_audio_could_have_them(start, end, passed):
    taken = captions.Words("Smith").take([{"word": "Smith", "start_time": start, "end_time": end}])
    assert [(w["start_time"], w["end_time"]) for w in taken] == ([passed] if passed else [])


def spans(text: str, words: list[dict]) -> list[tuple]:
    timed = [{"start_time": i * 0.1, "end_time": i * 0.1 + 0.1, **word} for i, word in enumerate(words)]
    return [(w["char_start"], w["char_end"]) for w in captions.Words(text).take(timed)]


def test_the_servers_own_span_is_passed_on_when_it_points_at_the_word_even_inside_a_longer_one():
    """Kokoro-FastAPI can split "isn't" in two: as whole words neither piece is in the input, but the spans it
    gives point at them, at the very start and the very end of the input; a word after them is found."""
    words = [
        {"word": "is", "char_start": 0, "char_end": 2},
        {"word": "n't", "char_start": 2, "char_end": 5},
        {"word": "it", "char_start": 6, "char_end": 8},
    ]
    assert spans("isn't it", words) == [(0, 2), (2, 5), (6, 8)]
    words = [
        {"word": "It"},
        {"word": "is", "char_start": 3, "char_end": 5},
        {"word": "n't", "char_start": 5, "char_end": 8},
    ]
    assert spans("It isn't", words) == [(0, 2), (3, 5), (5, 8)]
    assert spans("It isn't so", [*words, {"word": "so"}]) == [(0, 2), (3, 5), (5, 8), (9, 11)]


@pytest.mark.parametrize(
    "span",
    [
        {"char_start": -3, "char_end": 8},  # Python would read it from the end; no client does
        {"char_start": 5},  # half a span
        {"char_start": 5, "char_end": 8.0},  # not whole numbers
        {"char_start": True, "char_end": 8},
        {"char_start": 5, "char_end": 9},  # past the input
    ],
)
def test_a_span_that_is_not_the_words_place_in_the_input_is_not_passed_on(span):
    assert spans("It isn't", [{"word": "It"}, {"word": "n't", **span}]) == [(0, 2), (None, None)]


def test_a_word_is_found_as_a_whole_word_whatever_characters_it_begins_or_ends_with():
    assert spans("Smith's car", [{"word": "Smith"}, {"word": "'s"}, {"word": "car"}]) == [(0, 5), (5, 7), (8, 11)]
    assert spans("$5 now", [{"word": "$"}, {"word": "5"}, {"word": "now"}]) == [(0, 1), (1, 2), (3, 6)]
    assert spans("I am", [{"word": "I"}, {"word": "am"}]) == [(0, 1), (2, 4)]
    assert spans("gone go", [{"word": "go"}]) == [(5, 7)]


def test_a_word_is_looked_for_only_within_64_characters_past_the_last_one_found():
    near = "x" * 62 + " far"  # "far" ends at 66: within 64 characters and its own length of 0
    assert spans(near, [{"word": "far"}]) == [(63, 66)]
    assert spans("x" * 65 + " far", [{"word": "far"}]) == [(None, None)]


def test_a_word_longer_than_a_line_keeps_its_own_line_unbroken():
    link = "https://example.com/" + "a" * 40
    words = [{"word": w, "start_time": i * 0.3, "end_time": i * 0.3 + 0.2} for i, w in enumerate(["See", link, "now"])]
    assert [cue.text for cue in captions.cues(words)] == [f"See\n{link}", "now"]


@pytest.mark.parametrize(
    "late,cues",
    [
        (0.0, [(0.0, 6.0, "one two")]),  # exactly MAX_CUE_SECONDS of speech is one cue
        (100.0, [(100.0, 106.0, "one two")]),  # the same, later in the audio
    ],
)
def test_a_cue_holds_at_most_six_seconds_of_speech_counted_from_its_own_first_word(late, cues):
    words = [
        {"word": "one", "start_time": late, "end_time": late + 0.5},
        {"word": "two", "start_time": late + 5.5, "end_time": late + 6.0},
    ]
    assert [tuple(cue) for cue in captions.cues(words)] == cues
    words[1]["end_time"] += 0.001
    assert [cue.text for cue in captions.cues(words)] == ["one", "two"]


def test_the_last_cue_but_one_stays_up_a_second_but_never_over_the_last():
    words = [{"word": "Yes.", "start_time": 0.0, "end_time": 0.3}, {"word": "No.", "start_time": 0.6, "end_time": 0.8}]
    assert [(cue.start, cue.end) for cue in captions.cues(words)] == [(0.0, 0.6), (0.6, 1.6)]


def test_subtitle_clocks_count_hours_minutes_and_seconds():
    words = [{"word": "Late.", "start_time": 3754.0, "end_time": 3754.5}]
    assert captions.subtitles(words, "srt") == "1\n01:02:34,000 --> 01:02:35,000\nLate.\n"
    assert captions.subtitles(words, "vtt") == "WEBVTT\n\n01:02:34.000 --> 01:02:35.000\nLate.\n"


def test_webvtt_cue_text_keeps_quotes_as_written():
    words = [{"word": w, "start_time": i * 0.5, "end_time": i * 0.5 + 0.4} for i, w in enumerate(['"Hi"', "it's"])]
    assert captions.subtitles(words, "vtt").splitlines()[3] == '"Hi" it\'s'


def test_words_sent_before_their_audio_or_after_the_last_of_it_all_go_out_once_with_the_audio_alone(make_app, customer):
    """Lines of words without audio wait for the next audio, however many come; words after the last audio go
    out at the end with no audio of their own; a server that names no audio type is taken at the order's."""

    def bare_line(audio: bytes, words: list) -> bytes:
        return json.dumps({"audio": base64.b64encode(audio).decode(), "timestamps": words}).encode() + b"\n"

    said = [{"word": w, "start_time": i * 0.1, "end_time": i * 0.1 + 0.1} for i, w in enumerate(TEXT.split()[:4])]
    audio = pcm_of(0.5)
    upstream = _Lines(
        bare_line(b"", said[:1]), bare_line(b"", said[1:2]), bare_line(audio, said[2:3]), bare_line(b"", said[3:])
    )
    app, response, speech = ask_of(make_app, upstream, customer)
    body = response.get_json()
    assert [w["word"] for w in body["timestamps"]] == ["Dr.", "Smith", "paid", "$5.20"]
    assert base64.b64decode(body["audio"]) == audio and body["audio_format"] == "audio/pcm"
    assert speech.state == "delivered"


@pytest.mark.parametrize(("named", "answered"), [("audio/x-kokoro", "audio/x-kokoro"), ("audio/\x00", "audio/pcm")])
def test_the_answer_names_the_audio_as_the_server_did_when_it_named_it_in_plain_text(
    make_app, customer, named, answered
):
    line = json.dumps({"audio": base64.b64encode(pcm_of(0.2)).decode(), "audio_format": named, "timestamps": []})
    app, response, speech = ask_of(make_app, _Lines(line.encode() + b"\n"), customer)
    assert response.get_json()["audio_format"] == answered


@pytest.mark.parametrize(("response_format", "named"), [("mp3", "audio/mpeg"), ("wav", "audio/wav")])
def test_audio_the_server_names_no_type_for_is_named_by_the_orders_mime_type(
    make_app, customer, response_format, named
):
    line = json.dumps({"audio": base64.b64encode(b"ID3" + bytes(64)).decode(), "timestamps": []})
    app, response, speech = ask_of(make_app, _Lines(line.encode() + b"\n"), customer, response_format=response_format)
    assert response.status_code == 200 and response.get_json()["audio_format"] == named


def test_streamed_lines_without_audio_end_in_an_error_that_names_the_request_for_the_log(make_app, customer):
    said = [{"word": "Dr.", "start_time": 0.0, "end_time": 0.1}]
    with serve(_Lines(caption_line(b"", said))) as upstream_url:
        app = make_app(UPSTREAM_URL=f"{upstream_url}/v1")
        # No line has audio: the stream ends before its first piece, as the status goes out.
        with pytest.raises(StreamAborted) as aborted:
            app.test_client().post(CAPTIONED, json=ASK, headers=customer.headers, buffered=False)
    [row] = factories.speech_requests(app, customer.team_id)
    assert row.state == "refunded" and row.credits_refunded == row.credits
    assert str(aborted.value) == f"speech request {row.id}: The speech server sent no audio. The charge was refunded."


def test_lines_from_a_server_that_sends_a_content_length_still_reach_the_client_as_they_come(gateway):
    """A captioned answer is relayed as it is read, however the server frames it. One that gives its length up
    front (no chunked encoding) is read in blocks of STREAM_CHUNK_BYTES: here the first line is one block, and the
    server holds its second line back until the client has the first."""
    said = [{"word": "Dr.", "start_time": 0.0, "end_time": 0.1}]
    lines = [caption_line(pcm_of(0.2), said), caption_line(pcm_of(0.2), [])]
    gate, catalog = threading.Event(), FakeUpstream(captions="ours")

    def upstream(environ, start_response):
        if environ["PATH_INFO"] != "/dev/captioned_speech":
            return catalog(environ, start_response)
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(sum(map(len, lines))))])

        def send():
            yield lines[0]
            gate.wait(timeout=10)
            yield lines[1]

        return send()

    app, url = gateway(upstream, STREAM_CHUNK_BYTES=len(lines[0]))
    customer = factories.customer(app, balance=1000)
    with requests.post(f"{url}{CAPTIONED}", json=ASK, headers=customer.headers, stream=True, timeout=5) as response:
        relayed = response.iter_lines()
        assert base64.b64decode(json.loads(next(relayed))["audio"]) == pcm_of(0.2)
        gate.set()
        assert [base64.b64decode(json.loads(line)["audio"]) for line in relayed] == [pcm_of(0.2)]


def test_a_span_of_a_kind_no_server_sends_is_left_out_and_the_word_found():
    words = captions.Words("Dr. Smith")
    taken = words.take([{"word": "Smith", "start_time": 0.1, "end_time": 0.2, "char_start": [4], "char_end": 9}])
    assert [(w["char_start"], w["char_end"]) for w in taken] == [(4, 9)]
