"""Does this audio decode as what was asked for? FFmpeg (PyAV) reads each container."""

import io

import av
import numpy as np

# The container FFmpeg is told to read, and the codecs it may find inside.
CONTAINERS = {
    "mp3": ("mp3", {"mp3", "mp3float"}),
    "opus": ("ogg", {"opus", "libopus"}),
    "aac": ("aac", {"aac"}),
    "flac": ("flac", {"flac"}),
    "wav": ("wav", {"pcm_s16le"}),
}


def seconds_of(data: bytes, response_format: str) -> float:
    """The audio's length; AssertionError unless it decodes as `response_format`.

    `pcm` is raw 24 kHz signed 16-bit little-endian mono: whole samples, not silence.
    """
    if response_format == "pcm":
        assert len(data) % 2 == 0
        samples = np.frombuffer(data, dtype="<i2")
        assert np.abs(samples.astype(np.int32)).max() > 100, "silence"
        return len(samples) / 24000
    container, codecs = CONTAINERS[response_format]
    with av.open(io.BytesIO(data), format=container) as media:
        stream = media.streams.audio[0]
        assert stream.codec_context.name in codecs, stream.codec_context.name
        samples = sum(frame.samples for frame in media.decode(stream))
        return samples / stream.codec_context.sample_rate
