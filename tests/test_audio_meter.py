"""The audio meter counts the seconds in real encoded audio, fed in any chunking."""

import io
import struct

import numpy as np
import pytest
import soundfile

from app import audio_meter
from engine.audio import Encoder

RATE = 24000


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype("float32")


def encoded(response_format: str, seconds: float) -> bytes:
    """Audio as the embedded engine streams it, sentence by sentence."""
    encoder = Encoder(response_format)
    sentence = tone(seconds / 4)
    return b"".join(encoder.feed(sentence) for _ in range(4)) + encoder.close()


def metered(data: bytes, response_format: str, chunk: int) -> audio_meter.Meter:
    meter = audio_meter.for_format(response_format)
    for start in range(0, len(data), chunk):
        meter.feed(data[start : start + chunk])
    return meter


@pytest.mark.parametrize("response_format", ["pcm", "wav", "mp3", "opus", "flac"])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_the_whole_stream_measures_its_real_length(response_format, chunk):
    data = encoded(response_format, 6.0)
    meter = metered(data, response_format, chunk)
    assert meter.understood
    # Encoders pad to whole frames (MP3 also adds its decoder delay): a little over, never under.
    assert 6.0 <= meter.seconds < 6.0 + 0.2, meter.seconds
    if response_format in ("pcm", "wav"):
        assert meter.seconds == 6.0


@pytest.mark.parametrize("response_format", ["pcm", "wav", "mp3", "opus", "flac"])
def test_a_cut_stream_measures_about_what_was_cut(response_format):
    data = encoded(response_format, 8.0)
    for share in (0.1, 0.5, 0.9):
        meter = metered(data[: int(len(data) * share)], response_format, 1500)
        # Bytes are not time (headers, variable bitrate), but close enough to bill by. Ogg counts
        # whole pages (about a second each from libsndfile), and a partial page is not counted.
        slack = 1.05 if response_format == "opus" else 0.8
        assert -slack < meter.seconds - 8.0 * share < 0.8, (share, meter.seconds)


def test_the_sample_counts_decode_to_the_same_length_as_libsndfile():
    for response_format in ("wav", "flac"):
        data = encoded(response_format, 3.0)
        assert metered(data, response_format, 999).samples == soundfile.info(io.BytesIO(data)).frames


def test_an_opus_stream_measures_what_libsndfile_decodes_its_pre_skip_left_out():
    # Ogg Opus counts 48 kHz samples from the last page's granule position, less the encoder's pre-skip.
    for seconds, chunk in ((3.0, 999), (1.0, 27)):
        data = encoded("opus", seconds)
        info = soundfile.info(io.BytesIO(data))
        assert metered(data, "opus", chunk).seconds == info.frames / info.samplerate == seconds


def test_a_flac_stream_of_thousands_of_frames_is_counted_to_the_sample():
    # Past frame 127 a FLAC frame number takes two bytes, past 2047 three: an hour-long reading has ~20000.
    samples = np.zeros(4096 * 2100, dtype="float32")
    samples[::7] = 0.01
    file = io.BytesIO()
    soundfile.write(file, samples, RATE, format="FLAC", subtype="PCM_16")
    meter = metered(file.getvalue(), "flac", 5000)
    assert meter.understood and meter.samples == len(samples) == soundfile.info(io.BytesIO(file.getvalue())).frames


def adts_frame(rate_index: int = 6, payload: int = 200) -> bytes:
    """An ADTS header (AAC LC, mono, no CRC) and `payload` bytes."""
    length = 7 + payload
    header = bytes(
        [
            0xFF,
            0xF1,
            (1 << 6) | (rate_index << 2),
            (1 << 6) | (length >> 11),
            (length >> 3) & 0xFF,
            ((length & 7) << 5) | 0x1F,
            0xFC,
        ]
    )
    return header + bytes(payload)


def test_aac_counts_1024_samples_per_adts_frame():
    data = b"".join(adts_frame() for _ in range(235))
    meter = metered(data, "aac", 333)
    assert meter.understood and meter.rate == 24000 and meter.samples == 235 * 1024
    # A frame that has not fully arrived is not audio yet.
    assert metered(data[:-1], "aac", 333).samples == 234 * 1024


def test_an_id3_tag_is_skipped_even_when_it_arrives_in_pieces():
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 2, 0]) + bytes(256)
    data = tag + encoded("mp3", 2.0)
    assert 2.0 <= metered(data, "mp3", 5).seconds < 2.2


@pytest.mark.parametrize("response_format", ["wav", "mp3", "opus", "flac", "aac"])
def test_garbage_is_not_understood(response_format):
    meter = metered(bytes(range(256)) * 400, response_format, 4096)
    assert not meter.understood


def test_no_bytes_is_no_audio():
    for response_format in audio_meter.METERS:
        assert audio_meter.for_format(response_format).seconds == 0.0
    wav_header_only = encoded("wav", 0.0)[:44]
    assert metered(wav_header_only, "wav", 44).seconds == 0.0
    assert struct.unpack_from("<4s", wav_header_only)[0] == b"RIFF"


def mp3_frame(kbps_index: int) -> bytes:
    """An MPEG-2 Layer III frame at 24 kHz (576 samples): index 12 is 128 kbit/s (384 bytes), 8 is 64 (192)."""
    header = bytes([0xFF, 0xF3, kbps_index << 4 | 0x4, 0xC0])
    return header + bytes(576 // 8 * (128 if kbps_index == 12 else 64) * 1000 // 24000 - 4)


@pytest.mark.parametrize("chunk", [1, 383, 384, 1000, 1 << 16])
def test_runs_of_one_frame_header_and_changes_between_them_are_each_counted(chunk):
    fast, slow, garbage = mp3_frame(12), mp3_frame(8), b"\x00\x12\xfe"
    # Runs of one header, a change of bitrate inside a chunk, garbage between frames, a lone different frame.
    data = fast * 9 + slow * 3 + fast * 5 + garbage + fast * 4 + slow + fast * 7
    meter = metered(data, "mp3", chunk)
    assert meter.understood and meter.samples == 29 * 576
    # The last frame counts once it has fully arrived.
    assert metered(data[:-1], "mp3", chunk).samples == 28 * 576
    # A header that breaks a run halfway through a chunk is read, not skipped over with the run.
    broken = bytearray(fast * 10)
    broken[384 * 6 + 2] = 8 << 4 | 0x4  # frame 7 says 64 kbit/s: 192 bytes, then a 128 kbit/s header
    # (seven frames, the 192 bytes after the short one skipped as garbage, three frames)
    assert metered(bytes(broken), "mp3", 1 << 16).samples == metered(bytes(broken), "mp3", 1).samples == 10 * 576
