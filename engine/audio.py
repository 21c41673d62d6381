"""Streaming audio encoders: feed float32 samples sentence by sentence, get bytes back at once.

MP3, Opus and AAC (ADTS frames, encoded by FFmpeg through PyAV) stream as they are
encoded; WAV and PCM are written directly. FLAC keeps its length in the header, which
is rewritten when the encoder closes, and decoders such as libsndfile refuse a FLAC
stream without it: FLAC is therefore sent whole when the text is done.
"""

import fractions
import io
import struct

import av
import numpy as np
import soundfile

SAMPLE_RATE = 24000
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# libsndfile container and codec for the compressed formats.
SOUNDFILE_FORMATS = {"mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"), "flac": ("FLAC", "PCM_16")}
# A streamed WAV cannot know its length; the sizes say "as long as the stream lasts".
UNKNOWN_SIZE = 0xFFFFFFFF


def to_int16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    byte_rate = sample_rate * 2
    return (
        b"RIFF"
        + struct.pack("<I", UNKNOWN_SIZE)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, byte_rate, 2, 16)
        + b"data"
        + struct.pack("<I", UNKNOWN_SIZE - 36)
    )


class _StreamSink:
    """A file for libsndfile whose bytes are handed out as soon as they are written.

    An encoder that seeks back into bytes already handed out (MP3's LAME tag at
    close) cannot change them; such writes are dropped.
    """

    def __init__(self):
        self._pending = bytearray()
        self._sent = 0
        self._position = 0

    def write(self, data) -> int:
        data = bytes(data)
        written = len(data)
        if self._position < self._sent:
            skipped = min(written, self._sent - self._position)
            data = data[skipped:]
            self._position += skipped
        offset = self._position - self._sent
        self._pending[offset : offset + len(data)] = data
        self._position += len(data)
        return written

    def seek(self, offset: int, whence: int = 0) -> int:
        end = self._sent + len(self._pending)
        self._position = {0: offset, 1: self._position + offset, 2: end + offset}[whence]
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        data = bytes(self._pending)
        self._sent += len(data)
        self._pending.clear()
        return data


def _frame(samples: np.ndarray, sample_rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(samples, dtype="float32").reshape(1, -1), format="flt", layout="mono"
    )
    frame.sample_rate = sample_rate
    return frame


def time_stretch(samples: np.ndarray, tempo: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`samples` played `tempo` times as fast at the same pitch (FFmpeg's atempo filter, 0.5–2.0)."""
    if tempo == 1.0 or not len(samples):
        return samples
    graph = av.filter.Graph()
    source = graph.add_abuffer(
        sample_rate=sample_rate, format="flt", layout="mono", time_base=fractions.Fraction(1, sample_rate)
    )
    stretch = graph.add("atempo", f"{tempo:.6f}")
    sink = graph.add("abuffersink")
    source.link_to(stretch)
    stretch.link_to(sink)
    graph.configure()
    frame = _frame(samples, sample_rate)
    frame.pts = 0
    graph.push(frame)
    graph.push(None)
    pieces = []
    while True:
        try:
            pieces.append(graph.pull().to_ndarray().reshape(-1))
        except (av.error.EOFError, av.error.BlockingIOError):
            break
    return np.concatenate(pieces) if pieces else samples[:0]


class _AdtsEncoder:
    """AAC-LC in ADTS frames, which a player can start on without a header: streamable."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self._sink = _StreamSink()
        self._container = av.open(self._sink, mode="w", format="adts")
        self._stream = self._container.add_stream("aac", rate=sample_rate, layout="mono")

    def feed(self, samples: np.ndarray) -> bytes:
        for packet in self._stream.encode(_frame(samples, self.sample_rate)):
            self._container.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


class Encoder:
    """`feed(samples)` and `close()` return the encoded bytes ready so far."""

    def __init__(self, response_format: str, sample_rate: int = SAMPLE_RATE):
        self.format = response_format
        self._started = False
        self._sink = None
        self._file = None
        self._adts = _AdtsEncoder(sample_rate) if response_format == "aac" else None
        if response_format in SOUNDFILE_FORMATS:
            container, subtype = SOUNDFILE_FORMATS[response_format]
            self._sink = io.BytesIO() if response_format == "flac" else _StreamSink()
            self._file = soundfile.SoundFile(
                self._sink, mode="w", samplerate=sample_rate, channels=1, format=container, subtype=subtype
            )

    def feed(self, samples: np.ndarray) -> bytes:
        if self._adts is not None:
            return self._adts.feed(samples)
        if self._file is not None:
            self._file.write(samples)
            return self._take()
        prefix = b"" if self._started or self.format != "wav" else wav_header()
        self._started = True
        return prefix + to_int16(samples)

    def close(self) -> bytes:
        if self._adts is not None:
            return self._adts.close()
        if self._file is None:
            return b"" if self._started or self.format != "wav" else wav_header()
        self._file.close()
        return self._sink.getvalue() if isinstance(self._sink, io.BytesIO) else self._sink.take()

    def _take(self) -> bytes:
        return b"" if isinstance(self._sink, io.BytesIO) else self._sink.take()
