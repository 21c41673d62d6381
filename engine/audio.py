"""Streaming audio encoders: feed float32 samples sentence by sentence, get bytes back at once.

MP3 and Opus stream as they are encoded; WAV and PCM are written directly. FLAC
keeps its length in the header, which is rewritten when the encoder closes, and
decoders such as libsndfile refuse a FLAC stream without it: FLAC is therefore
sent whole when the text is done.
"""

import io
import struct

import numpy as np
import soundfile

SAMPLE_RATE = 24000
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
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


class Encoder:
    """`feed(samples)` and `close()` return the encoded bytes ready so far."""

    def __init__(self, response_format: str, sample_rate: int = SAMPLE_RATE):
        self.format = response_format
        self._started = False
        self._sink = None
        self._file = None
        if response_format in SOUNDFILE_FORMATS:
            container, subtype = SOUNDFILE_FORMATS[response_format]
            self._sink = io.BytesIO() if response_format == "flac" else _StreamSink()
            self._file = soundfile.SoundFile(
                self._sink, mode="w", samplerate=sample_rate, channels=1, format=container, subtype=subtype
            )

    def feed(self, samples: np.ndarray) -> bytes:
        if self._file is not None:
            self._file.write(samples)
            return self._take()
        prefix = b"" if self._started or self.format != "wav" else wav_header()
        self._started = True
        return prefix + to_int16(samples)

    def close(self) -> bytes:
        if self._file is None:
            return b"" if self._started or self.format != "wav" else wav_header()
        self._file.close()
        return self._sink.getvalue() if isinstance(self._sink, io.BytesIO) else self._sink.take()

    def _take(self) -> bytes:
        return b"" if isinstance(self._sink, io.BytesIO) else self._sink.take()
