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


@pytest.mark.parametrize(("garbage", "understood"), [(1 << 14, True), ((1 << 14) + 1, False)])
def test_audio_after_up_to_16_kib_of_garbage_is_still_counted(garbage, understood):
    meter = audio_meter.for_format("aac")
    for chunk in (adts_frame(), bytes(garbage), adts_frame()):
        meter.feed(chunk)
    assert (meter.understood, meter.samples) == ((True, 2 * 1024) if understood else (False, 1024))


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


# Every header each format allows, built from its specification, each counted to the sample.
# (The expected lengths and tables below are the specifications' own, not the meter's code.)

MP3_KBPS = {
    "MPEG-1": (None, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    "MPEG-2": (None, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
MP3_VERSIONS = {
    0b11: ("MPEG-1", (44100, 48000, 32000)),
    0b10: ("MPEG-2", (22050, 24000, 16000)),
    0b00: ("MPEG-2", (11025, 12000, 8000)),
}


def mp3_header(version=0b10, layer=0b01, bitrate=8, rate=1, padding=0) -> bytes:
    return bytes([0xFF, 0xE0 | version << 3 | layer << 1 | 1, bitrate << 4 | rate << 2 | padding << 1, 0xC4])


def mp3_frame_of(version, bitrate, rate, padding=0) -> tuple[bytes, int, int]:
    """A Layer III frame (its body free of 0xFF), its samples and its sample rate."""
    table, rates = MP3_VERSIONS[version]
    samples = 1152 if table == "MPEG-1" else 576
    # ISO 11172-3 / 13818-3: 144 (MPEG-1) or 72 (MPEG-2, 2.5) × bit rate ÷ sample rate, plus the padding slot.
    length = (144 if table == "MPEG-1" else 72) * MP3_KBPS[table][bitrate] * 1000 // rates[rate] + padding
    header = mp3_header(version, bitrate=bitrate, rate=rate, padding=padding)
    return header + bytes([0x55]) * (length - 4), samples, rates[rate]


@pytest.mark.parametrize("version", sorted(MP3_VERSIONS))
@pytest.mark.parametrize("rate", [0, 1, 2])
def test_every_mp3_bit_rate_sample_rate_and_padding_is_counted_to_the_sample(version, rate):
    frames = [mp3_frame_of(version, bitrate, rate, padding) for bitrate in range(1, 15) for padding in (0, 1)]
    data = b"".join(frame for frame, _, _ in frames)
    for chunk in (1, 97, len(data)):
        meter = metered(data, "mp3", chunk)
        assert meter.understood and meter.rate == frames[0][2]
        assert meter.samples == sum(samples for _, samples, _ in frames)
        # Every frame but the last byte of the last: one frame short.
        assert metered(data[:-1], "mp3", chunk).samples == meter.samples - frames[-1][1]


@pytest.mark.parametrize(
    "not_a_frame",
    [
        mp3_header(version=0b01),  # reserved version
        mp3_header(layer=0b00),  # reserved layer
        mp3_header(layer=0b10),  # Layer II
        mp3_header(layer=0b11),  # Layer I
        mp3_header(bitrate=0),  # "free" bit rate: no length to go by
        mp3_header(bitrate=15),  # forbidden
        mp3_header(rate=3),  # reserved sample rate
        bytes([0xFF, 0x1A, 0x84, 0xC4]),  # sync bits missing from the second byte
        bytes([0xFE, 0xF3, 0x84, 0xC4]),  # sync bits missing from the first
    ],
    ids=["version", "layer 0", "layer II", "layer I", "free", "bad bit rate", "bad rate", "sync 2", "sync 1"],
)
def test_a_header_the_specification_forbids_is_not_a_frame(not_a_frame):
    frame, samples, _ = mp3_frame_of(0b10, 8, 1)
    data = frame * 3 + not_a_frame + bytes(400) + frame * 2
    for chunk in (1, 4096):
        assert metered(data, "mp3", chunk).samples == 5 * samples


def test_an_id3_tag_holding_frame_like_bytes_is_skipped_even_a_byte_at_a_time():
    # A cover picture inside the tag may hold anything, MP3 frame headers included; a footer adds 10 bytes.
    frame, samples, _ = mp3_frame_of(0b10, 8, 1)
    body = frame * 2
    size = len(body) + 10
    syncsafe = bytes([size >> 21 & 0x7F, size >> 14 & 0x7F, size >> 7 & 0x7F, size & 0x7F])
    for footer in (False, True):
        tag = (
            b"ID3\x04\x00"
            + bytes([0x10 if footer else 0])
            + syncsafe
            + body
            + bytes(10)
            + (b"3DI" + bytes(7) if footer else b"")
        )
        data = tag + frame * 3
        for chunk in (1, 9, 10, 11, len(data)):
            assert metered(data, "mp3", chunk).samples == 3 * samples, (footer, chunk)


def test_a_block_in_a_run_of_one_header_that_only_looks_like_it_is_not_a_frame():
    # Frames whose last bytes are their own header's bytes 3, 2, 1 (read backwards): then a block of
    # the same length that starts with the sync byte and nothing else of the header.
    frame, samples, _ = mp3_frame_of(0b10, 8, 1)
    frame = frame[:-3] + frame[3:0:-1]
    impostor = b"\xff" + bytes(len(frame) - 1)
    data = frame * 4 + impostor + frame * 3
    assert metered(data, "mp3", len(data)).samples == metered(data, "mp3", 1).samples == 7 * samples


def id3_tag(body: bytes, flags: int = 0) -> bytes:
    """An ID3v2.4 tag: its header, `body` and, when flags has 0x10, the 10-byte footer its size leaves out."""
    size = len(body)
    syncsafe = bytes([size >> 21 & 0x7F, size >> 14 & 0x7F, size >> 7 & 0x7F, size & 0x7F])
    footer = b"3DI\x04\x00" + bytes([flags]) + syncsafe if flags & 0x10 else b""
    return b"ID3\x04\x00" + bytes([flags]) + syncsafe + body + footer


@pytest.mark.parametrize(
    "flags", [0x00, 0x10, 0x0F, 0x1F, 0xE0], ids=["none", "footer", "undefined", "footer+undefined", "others"]
)
def test_an_id3_tag_ends_where_its_size_and_footer_flag_say_whatever_it_holds(flags):
    # A body of nothing but MPEG-1 frame headers (1152 samples at 32 kHz): any of it left unskipped is counted.
    frame, samples, rate = mp3_frame_of(0b10, 8, 1)
    body = mp3_header(0b11, bitrate=1, rate=2) * 75
    data = id3_tag(body, flags) + frame * 3
    for chunk in (1, 10, 11, 97, len(data)):
        meter = metered(data, "mp3", chunk)
        assert (meter.samples, meter.rate) == (3 * samples, rate), (flags, chunk)


def test_an_id3_tag_of_more_than_two_megabytes_is_skipped_whole():
    # A large cover picture: the size's first byte counts 2 MiB a unit.
    frame, samples, _ = mp3_frame_of(0b10, 8, 1)
    data = id3_tag(bytes(5 << 20)) + frame * 3
    meter = metered(data, "mp3", 1 << 16)
    assert meter.understood and meter.samples == 3 * samples


def test_16_kib_of_junk_after_a_tag_and_its_footer_is_passed_over_but_not_one_byte_more():
    frame, samples, _ = mp3_frame_of(0b10, 8, 1)
    for junk, understood in ((1 << 14, True), ((1 << 14) + 1, False)):
        meter = audio_meter.for_format("mp3")
        meter.feed(id3_tag(bytes(100), flags=0x10) + bytes([0x55]) * junk)
        meter.feed(frame * 3)
        assert meter.understood is understood and meter.samples == 3 * samples * understood, junk


def test_only_the_leading_id3_tag_is_skipped_what_looks_like_one_later_hides_no_frames():
    # Once audio has begun, "ID3" is junk: a size that claims the frames after it takes none of them.
    frame, samples, _ = mp3_frame_of(0b10, 8, 1)
    fake = b"ID3\x04\x00\x00" + bytes([0, 0, 0x7F, 0x7F])
    data = id3_tag(bytes(20)) + frame * 2 + fake + frame * 40
    for chunk in (1, 3, len(frame), len(data)):
        assert metered(data, "mp3", chunk).samples == 42 * samples, chunk


ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def adts(rate_index=6, length=207, blocks=0, second=0xF1) -> bytes:
    """An ADTS frame of `length` bytes (header included) carrying `blocks` + 1 raw data blocks of 1024 samples."""
    header = bytes(
        [
            0xFF,
            second,
            (1 << 6) | (rate_index << 2),
            (1 << 6) | (length >> 11),
            (length >> 3) & 0xFF,
            ((length & 7) << 5) | 0x1F,
            0xFC | blocks,
        ]
    )
    return header + bytes([0x55]) * (length - 7)


@pytest.mark.parametrize("rate_index", range(13))
def test_every_adts_sample_rate_length_and_block_count_is_counted(rate_index):
    # Lengths that set each of the 13 bits of the length field; 7 is a header with no payload.
    lengths = (7, 8, 15, 255, 256, 1031, 2047, 2048, 4096, 8191)
    frames = [
        adts(rate_index, length, blocks, second)
        for length in lengths
        for blocks in range(4)
        for second in (0xF0, 0xF1, 0xF8, 0xF9)
    ]
    data = b"".join(frames)
    expected = sum(1024 * (blocks + 1) for _ in lengths for blocks in range(4) for _ in range(4))
    for chunk in (13, 8191, len(data)):
        meter = metered(data, "aac", chunk)
        assert meter.understood and meter.rate == ADTS_RATES[rate_index] and meter.samples == expected


@pytest.mark.parametrize(
    "not_a_frame",
    [
        adts(rate_index=13),
        adts(rate_index=15),
        adts(length=6)[:7] + bytes(200),
        adts(second=0xF2),
        adts(second=0xF4),
        adts(second=0xE1),
    ],
    ids=["rate 13", "rate 15", "shorter than its header", "layer 1", "layer 2", "sync"],
)
def test_an_adts_header_the_specification_forbids_is_not_a_frame(not_a_frame):
    assert metered(adts() * 3 + not_a_frame + adts() * 2, "aac", 4096).samples == 5 * 1024


def test_an_adts_frame_as_short_as_its_header_counts_once_it_is_in():
    # 7 bytes: a header with no payload. Last in what has arrived, it is whole, so it is audio.
    data = adts() * 2 + adts(length=7)
    for chunk in (1, 7, len(data)):
        assert metered(data, "aac", chunk).samples == 3 * 1024, chunk
    assert metered(data[:-1], "aac", 1).samples == 2 * 1024


def riff(*chunks: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + sum(map(len, chunks))) + b"WAVE" + b"".join(chunks)


def chunk(chunk_id: bytes, body: bytes, size: int | None = None) -> bytes:
    """A RIFF chunk: id, size, body and the pad byte that keeps the next one at an even offset."""
    return chunk_id + struct.pack("<I", len(body) if size is None else size) + body + b"\0" * (len(body) & 1)


def fmt(channels=1, rate=24000, bits=16, extra=b"") -> bytes:
    block = channels * ((bits + 7) // 8)
    return chunk(b"fmt ", struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits) + extra)


@pytest.mark.parametrize("channels", [1, 2, 6])
@pytest.mark.parametrize("bits", [8, 12, 16, 20, 24, 32])
@pytest.mark.parametrize("rate", [8000, 24000, 96000, 192000])
def test_every_wav_layout_is_counted_to_the_frame(channels, bits, rate):
    # 12- and 20-bit samples each fill 2 and 3 bytes: the block align says so.
    frame_bytes = channels * ((bits + 7) // 8)
    audio = bytes([0x55]) * (frame_bytes * 1000 + frame_bytes - 1)  # the last frame one byte short
    # Chunks before and between, of odd sizes (each padded to an even offset), a fmt with an extension.
    data = riff(
        chunk(b"JUNK", b"abc"),
        fmt(channels, rate, bits, extra=b"\x00\x00"),
        chunk(b"LIST", b"INFOx"),
        chunk(b"data", b"")[:4] + struct.pack("<I", len(audio)) + audio,
    )
    for size in (1, 3, 44, 45, 4096, len(data)):
        meter = metered(data, "wav", size)
        assert meter.understood and meter.rate == rate and meter.samples == 1000, size
        assert meter.seconds == 1000 / rate


def test_wav_counts_each_frame_as_its_last_byte_arrives():
    head = riff(fmt(), chunk(b"data", b"", size=0xFFFFFFFF))  # a stream: the length is not known yet
    meter = audio_meter.for_format("wav")
    meter.feed(head)
    counts = []
    for _ in range(7):
        meter.feed(b"\x01")
        counts.append(meter.samples)
    assert counts == [0, 1, 1, 2, 2, 3, 3]


def test_a_wav_that_is_not_riff_is_not_understood_from_its_fourth_byte():
    meter = audio_meter.for_format("wav")
    meter.feed(b"RIF")
    assert meter.understood
    meter.feed(b"X")
    assert not meter.understood


def test_a_wav_whose_data_comes_before_its_format_is_not_understood():
    data = riff(chunk(b"data", b"\x01" * 100), fmt())
    assert not metered(data, "wav", 1).understood
    assert not metered(data, "wav", len(data)).understood
    # A format chunk that gives no bytes per frame (block align 0) says nothing to count by.
    no_frames = chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 24000, 48000, 0, 16))
    assert not metered(riff(no_frames, chunk(b"data", bytes(100))), "wav", 4096).understood
    # A format chunk named in another case is not one.
    assert not metered(riff(chunk(b"FMT ", fmt()[8:]), chunk(b"data", bytes(100))), "wav", 4096).understood


def test_a_wav_chunk_claiming_two_gigabytes_hides_everything_after_it():
    # A size is unsigned: 2 GiB of chunk, so the fmt and data behind it are inside it, not audio yet.
    data = riff(fmt(), chunk(b"JUNK", b"", size=0x80000000), chunk(b"data", bytes(100)))
    meter = metered(data, "wav", len(data))
    assert meter.understood and meter.samples == 0


def test_pcm_counts_whole_samples_only():
    meter = audio_meter.for_format("pcm")
    counts = []
    for _ in range(5):
        meter.feed(b"\x01")
        counts.append(meter.samples)
    assert counts == [0, 1, 1, 2, 2]
    assert meter.seconds == 2 / 24000


def ogg_page(body: bytes, granule: int, sequence: int = 0) -> bytes:
    """One Ogg page holding `body` as one packet (lacing values of 255 and the remainder)."""
    lacing = [255] * (len(body) // 255) + [len(body) % 255]
    return b"OggS" + struct.pack("<BBqIII", 0, 0, granule, 1, sequence, 0) + bytes([len(lacing)]) + bytes(lacing) + body


def opus_head(pre_skip: int) -> bytes:
    return b"OpusHead" + struct.pack("<BBHIhB", 1, 1, pre_skip, 48000, 0, 0)


@pytest.mark.parametrize("pre_skip", [0, 312, 3840, 65535])
def test_ogg_opus_counts_the_last_granule_position_less_the_pre_skip(pre_skip):
    pages = [ogg_page(opus_head(pre_skip), 0), ogg_page(b"OpusTags" + bytes(8), 0, 1)]
    pages += [
        ogg_page(bytes([0x55]) * size, granule, n + 2)
        for n, (size, granule) in enumerate([(600, 70000), (300, -1), (1000, 96000)])
    ]
    data = b"".join(pages)
    for size in (1, 27, 28, 700, len(data)):
        meter = metered(data, "opus", size)
        assert meter.understood and meter.rate == 48000
        # A page whose granule is -1 ends no packet: it leaves the count where it was.
        assert meter.samples == max(0, 96000 - pre_skip), size
        assert metered(data[:-1], "opus", size).samples == max(0, 70000 - pre_skip)


def test_an_ogg_page_that_has_not_fully_arrived_counts_nothing():
    head, page = ogg_page(opus_head(0), 0), ogg_page(bytes(1000), 48000, 1)
    for cut in (26, 27, 27 + 3, len(page) - 1):
        assert metered(head + page[:cut], "opus", 1).samples == 0, cut
    assert metered(head + page, "opus", 1).samples == 48000


def test_a_short_opus_head_still_gives_its_pre_skip_and_other_heads_none():
    head = b"OpusHead" + struct.pack("<BBH", 1, 1, 312)  # the 12 bytes that reach the pre-skip
    assert metered(ogg_page(head, 0) + ogg_page(bytes(10), 48000, 1), "opus", 1).samples == 48000 - 312
    for other in (b"OpusHeaX", b"opushead"):
        page = ogg_page(other + head[8:], 0)
        assert metered(page + ogg_page(bytes(10), 48000, 1), "opus", 1).samples == 48000


def test_an_ogg_stream_with_garbage_after_a_page_is_not_understood():
    data = ogg_page(opus_head(0), 0) + b"NotOggS" + bytes(40)
    assert not metered(data, "opus", 1).understood


def flac_crc8(data: bytes) -> int:
    """FLAC's header CRC (polynomial x^8 + x^2 + x + 1), as the remainder of a division in GF(2)."""
    value = int.from_bytes(data, "big") << 8
    for shift in range(value.bit_length() - 9, -1, -1):
        if value >> (shift + 8) & 1:
            value ^= 0x107 << shift
    return value


def utf8_coded(number: int) -> bytes:
    """FLAC's frame and sample numbers: UTF-8's scheme, extended to 36 bits in up to 7 bytes."""
    if number < 0x80:
        return bytes([number])
    length = next(n for n in range(2, 8) if number < 1 << (5 * n + 1 if n < 7 else 36))
    tail = [0x80 | (number >> 6 * i) & 0x3F for i in reversed(range(length - 1))]
    lead = (0xFF << (8 - length)) & 0xFF | number >> 6 * (length - 1)
    return bytes([lead & 0xFF]) + bytes(tail)


FLAC_BLOCKS = {
    1: 192,
    2: 576,
    3: 1152,
    4: 2304,
    5: 4608,
    8: 256,
    9: 512,
    10: 1024,
    11: 2048,
    12: 4096,
    13: 8192,
    14: 16384,
    15: 32768,
}
FLAC_RATES = {
    1: 88200,
    2: 176400,
    3: 192000,
    4: 8000,
    5: 16000,
    6: 22050,
    7: 24000,
    8: 32000,
    9: 44100,
    10: 48000,
    11: 96000,
}


def flac_frame(
    number: int,
    block: int,
    *,
    size_code=None,
    rate_code=9,
    channels=1,
    sample_size=4,
    variable=False,
    extra_rate=b"",
    coded_number=None,
) -> bytes:
    """A frame header (CRC-8 included) and a body with no 0xFF in it; `block` samples."""
    if size_code is None:
        size_code = next((code for code, size in FLAC_BLOCKS.items() if size == block), 6 if block <= 256 else 7)
    header = bytes([0xFF, 0xF9 if variable else 0xF8, size_code << 4 | rate_code, channels << 4 | sample_size << 1])
    header += utf8_coded(number) if coded_number is None else coded_number
    if size_code == 6:
        header += bytes([block - 1])
    elif size_code == 7:
        header += (block - 1).to_bytes(2, "big")
    header += extra_rate
    return with_crc(header)


def with_crc(header: bytes, crc=None) -> bytes:
    return header + bytes([flac_crc8(header) if crc is None else crc]) + bytes([0x55]) * 40


def streaminfo(rate: int, last=True) -> bytes:
    body = bytes(10) + (rate << 4 | 0b0001).to_bytes(3, "big") + bytes(21)
    return bytes([0x80 * last]) + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize("variable", [False, True], ids=["fixed blocks", "variable blocks"])
def test_every_flac_block_size_code_is_counted_to_the_sample(variable):
    blocks = [*FLAC_BLOCKS.values(), 1, 100, 256, 257, 4000, 65536]
    frames, first = [], 0
    for number, block in enumerate(blocks):
        frames.append(flac_frame(first if variable else number, block, variable=variable))
        first += block
    data = b"fLaC" + streaminfo(44100) + b"".join(frames) + bytes(16)
    for size in (1, 17, 4096, len(data)):
        meter = metered(data, "flac", size)
        assert meter.understood and meter.rate == 44100 and meter.samples == sum(blocks), size


def test_flac_frame_numbers_of_every_length_are_read():
    # Fixed blocks carry a frame number (up to 31 bits, 6 bytes); variable ones a sample number (36 bits, 7).
    for variable, numbers in (
        (False, (0, 127, 128, 2047, 2048, 65535, 65536, 1 << 21, 1 << 26, (1 << 31) - 1)),
        (True, (0, 1 << 30, (1 << 36) - 1)),
    ):
        for start in numbers:
            data = (
                b"fLaC"
                + streaminfo(44100)
                + b"".join(flac_frame(start + n if not variable else start, 4096, variable=variable) for n in range(3))
                + bytes(16)
            )
            assert metered(data, "flac", 7).samples == 3 * 4096, (variable, start)


def test_a_flac_frame_number_out_of_sequence_is_not_a_frame():
    frames = [flac_frame(0, 4096), flac_frame(1, 4096), flac_frame(5, 4096), flac_frame(2, 4096)]
    assert metered(b"fLaC" + streaminfo(44100) + b"".join(frames) + bytes(16), "flac", 4096).samples == 3 * 4096


def flac_header(frame: bytes) -> bytes:
    """The header of a frame built by flac_frame (its CRC and body left off)."""
    return frame[:-41]


FORBIDDEN_FLAC_HEADERS = {
    # Each with a CRC-8 that matches, so that only the forbidden field can reject it.
    "blocking bits 0xFA": with_crc(b"\xff\xfa" + flac_header(flac_frame(2, 4096))[2:]),
    "reserved bit": with_crc(flac_header(flac_frame(2, 4096))[:3] + b"\x19" + b"\x02"),
    "block size code 0": flac_frame(2, 4096, size_code=0),
    "sample rate code 15": flac_frame(2, 4096, rate_code=15),
    "channel assignment 11": flac_frame(2, 4096, channels=11),
    "channel assignment 15": flac_frame(2, 4096, channels=15),
    "number starting with a continuation byte": flac_frame(2, 4096, variable=True, coded_number=b"\x82"),
    "number continued by a non-continuation byte": flac_frame(2, 4096, variable=True, coded_number=b"\xc0\x02"),
    "number continued by a byte of 11xxxxxx": flac_frame(2, 4096, variable=True, coded_number=b"\xc0\xc2"),
    "number of 8 bytes": flac_frame(2, 4096, variable=True, coded_number=b"\xff" + b"\x80" * 7),
    "CRC-8 that does not match": with_crc(
        flac_header(flac_frame(2, 4096)), crc=flac_crc8(flac_header(flac_frame(2, 4096))) ^ 1
    ),
    "stray sync byte": b"\xff",
}


@pytest.mark.parametrize("broken", FORBIDDEN_FLAC_HEADERS.values(), ids=FORBIDDEN_FLAC_HEADERS.keys())
def test_a_flac_header_the_specification_forbids_is_not_a_frame(broken):
    for variable in (False, True):
        frames = [flac_frame(n * (4096 if variable else 1), 4096, variable=variable) for n in range(4)]
        data = b"fLaC" + streaminfo(44100) + b"".join(frames[:2]) + broken + b"".join(frames[2:]) + bytes(16)
        assert metered(data, "flac", 4096).samples == metered(data, "flac", 1).samples == 4 * 4096, variable


def test_every_flac_channel_assignment_and_sample_size_is_a_frame():
    frames = [
        flac_frame(number, 4096, channels=channels, sample_size=size)
        for number, (channels, size) in enumerate((c, s) for c in range(11) for s in (0, 1, 2, 4, 5, 6, 7))
    ]
    data = b"fLaC" + streaminfo(44100) + b"".join(frames) + bytes(16)
    assert metered(data, "flac", 333).samples == len(frames) * 4096


@pytest.mark.parametrize("rate_code", range(15))
def test_flac_takes_the_sample_rate_from_streaminfo_or_else_from_the_frames(rate_code):
    extra = {12: b"\x30", 13: b"\x2b\x11", 14: b"\x04\x4c"}.get(rate_code, b"")
    frames = b"".join(flac_frame(n, 1152, rate_code=rate_code, extra_rate=extra) for n in range(3)) + bytes(16)
    # STREAMINFO says 192 kHz: it wins. Says 0 (not given): a frame's rate code, where it names one.
    assert metered(b"fLaC" + streaminfo(192000) + frames, "flac", 100).rate == 192000
    meter = metered(b"fLaC" + streaminfo(0) + frames, "flac", 100)
    assert meter.samples == 3 * 1152 and meter.rate == FLAC_RATES.get(rate_code, 0)
    # No STREAMINFO at all (one padding block is the whole metadata): the frames' rate code too, and with
    # no rate anywhere no seconds.
    padding = bytes([0x80 | 1]) + (8).to_bytes(3, "big") + bytes(8)
    meter = metered(b"fLaC" + padding + frames, "flac", 100)
    rate = FLAC_RATES.get(rate_code, 0)
    assert meter.samples == 3 * 1152 and meter.rate == rate
    assert meter.seconds == (3 * 1152 / rate if rate else 0.0)


@pytest.mark.parametrize("rate", [8000, 44100, 96000, 192000, 655350, (1 << 20) - 1])
def test_flac_metadata_blocks_before_the_audio_are_skipped_whatever_their_sizes(rate):
    padding = bytes([1]) + (300).to_bytes(3, "big") + bytes(300)
    # An application block holding a whole valid frame (192 samples): metadata, not audio.
    inside = b"kpay" + flac_frame(0, 192, variable=True)
    application = bytes([2]) + len(inside).to_bytes(3, "big") + inside
    picture = bytes([6]) + (70000).to_bytes(3, "big") + bytes(70000)  # more than 16 bits of size
    empty = bytes([1]) + bytes(3)
    # STREAMINFO's size, not its kind: a padding block of 34 zero bytes gives no sample rate.
    as_long_as_streaminfo = bytes([1]) + (34).to_bytes(3, "big") + bytes(34)
    last = bytes([0x80 | 1]) + (3).to_bytes(3, "big") + b"\xff\xf8\x89"
    data = b"fLaC" + streaminfo(rate, last=False) + padding + application + picture + empty + as_long_as_streaminfo
    data += last
    data += b"".join(flac_frame(n, 4096) for n in range(5)) + bytes(16)
    for size in (1, 4, 5, 38, 4096, len(data)):
        meter = metered(data, "flac", size)
        assert meter.understood and meter.rate == rate and meter.samples == 5 * 4096, size


def test_the_last_flac_metadata_block_is_metadata_until_its_last_byte_is_in():
    # It ends with a whole frame header (variable blocks, so no frame number to rule it out).
    fake_header = flac_frame(0, 192, variable=True)[:-40]
    body = b"kpay" + bytes([0x55]) * 30 + fake_header
    last = bytes([0x80 | 2]) + len(body).to_bytes(3, "big") + body
    data = b"fLaC" + streaminfo(44100, last=False) + last + b"".join(flac_frame(n, 4096) for n in range(3)) + bytes(16)
    for size in (1, 2, 5, 7, 38, len(data)):
        assert metered(data, "flac", size).samples == 3 * 4096, size


def test_a_flac_frame_header_is_read_once_even_when_its_own_bytes_begin_another():
    # A header whose block size byte is 0xFF and whose CRC-8 is a sync code's second byte (0xF8 or 0xF9),
    # then a first subframe (FIXED, order 4) whose bytes would complete a header begun by those two.
    header = next(
        header
        for channels in range(11)
        for sample_size in (0, 1, 2, 4, 5, 6, 7)
        for rate_code in range(1, 12)
        if flac_crc8(header := bytes([0xFF, 0xF8, 6 << 4 | rate_code, channels << 4 | sample_size << 1, 0, 0xFF]))
        in (0xF8, 0xF9)
    )
    crc = flac_crc8(header)
    begun = bytes([0xFF, crc, 1 << 4 | 9, 0x08, 1])
    first = header + bytes([crc]) + begun[2:] + bytes([flac_crc8(begun)]) + bytes([0x55]) * 40
    data = b"fLaC" + streaminfo(44100) + first + b"".join(flac_frame(n, 4096) for n in range(1, 3)) + bytes(16)
    for size in (1, 16, len(data)):
        assert metered(data, "flac", size).samples == 256 + 2 * 4096, size


def test_a_flac_stream_counts_a_frame_once_its_header_is_in():
    frames = [flac_frame(n, 4096) for n in range(3)]
    head = b"fLaC" + streaminfo(44100)
    meter = audio_meter.for_format("flac")
    meter.feed(head + frames[0] + frames[1][:15])
    assert meter.samples == 4096
    meter.feed(frames[1][15:16])  # the second header's 16th byte: it can be read
    assert meter.samples == 2 * 4096
    meter.feed(frames[1][16:] + frames[2][:15])
    assert meter.samples == 2 * 4096
    meter.feed(frames[2][15:])
    assert meter.samples == 3 * 4096


def test_a_flac_that_is_not_flac_is_not_understood_from_its_fourth_byte():
    meter = audio_meter.for_format("flac")
    meter.feed(b"fLa")
    assert meter.understood
    meter.feed(b"X")
    assert not meter.understood and meter.samples == 0


def test_ogg_pages_without_an_opus_head_count_their_granule_as_it_is():
    pages = ogg_page(b"OpusTags", 0) + ogg_page(bytes(100), 1, 1)
    assert metered(pages, "opus", 1).samples == 1
    assert metered(pages + ogg_page(bytes(100), 48000, 2), "opus", 1).samples == 48000


def test_an_ogg_page_going_back_to_granule_zero_takes_nothing_back():
    pages = ogg_page(opus_head(312), 0) + ogg_page(bytes(100), 48312, 1) + ogg_page(bytes(100), 0, 2)
    assert metered(pages, "opus", 1).samples == 48000


def test_an_ogg_page_with_no_packet_data_counts_as_soon_as_it_is_whole():
    # No segments at all, or one of length 0: the page ends with its header or its lacing table.
    no_segments = b"OggS" + struct.pack("<BBqIII", 0, 4, 96000, 1, 3, 0) + b"\x00"
    for last in (no_segments, ogg_page(b"", 96000, 3)):
        data = ogg_page(opus_head(0), 0) + ogg_page(bytes(100), 48000, 1) + last
        assert metered(data, "opus", 1).samples == metered(data, "opus", len(data)).samples == 96000
        assert metered(data[:-1], "opus", 1).samples == 48000


def test_a_variable_block_flac_header_split_between_chunks_is_counted_once():
    frames = [flac_frame(n * 4096, 4096, variable=True) for n in range(4)]
    data = b"fLaC" + streaminfo(44100) + b"".join(frames) + bytes(16)
    start = len(b"fLaC" + streaminfo(44100))
    # Each chunk ends a few bytes into the next frame's header.
    cuts = [start + len(frames[0]) * n + 5 for n in range(1, 4)]
    meter = audio_meter.for_format("flac")
    for begin, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        meter.feed(data[begin:end])
    assert meter.samples == 4 * 4096


def test_a_wav_header_of_absurd_sizes_never_counts_negative_audio():
    # A block align of 65535 bytes and a rate of 4,294,967,295 Hz: nonsense, but no negative seconds.
    absurd = chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 0xFFFFFFFF, 0, 0xFFFF, 16))
    meter = metered(riff(absurd, chunk(b"data", bytes(200_000))), "wav", 4096)
    assert meter.samples == 200_000 // 0xFFFF and meter.seconds >= 0


def test_a_format_with_no_meter_of_its_own_is_not_understood_and_counts_nothing():
    # A format the API learns before the meter does streams as fully delivered once audio went out (the
    # module says why), never as an error.
    meter = audio_meter.for_format("webm")
    meter.feed(b"\x1aE\xdf\xa3" + bytes(4096))
    assert meter.understood is False and meter.seconds == 0.0
