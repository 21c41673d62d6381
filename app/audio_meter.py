"""How much audio a stream has delivered, counted from its bytes as they are relayed.

A speech request that breaks off mid-stream is refunded only for what was not
delivered (app/metering.py), so the gateway counts the playable audio in the bytes
it has handed to the client: exactly for `pcm` and `wav`, and from complete frames
for the compressed formats (MP3 and ADTS AAC frame headers, Ogg Opus granule
positions, FLAC frame headers checked by their CRC-8). A meter that cannot make
sense of a stream says so (`understood` is False); the caller then treats the
stream as fully delivered, which never refunds audio that went out.
"""

from __future__ import annotations

import struct

PCM_RATE = 24000  # Kokoro's raw PCM: 24 kHz, signed 16-bit, mono.
_UNSEEN = object()


class Meter:
    """Counts the seconds of audio in the bytes fed to it."""

    understood = True

    def __init__(self):
        self.samples = 0
        self.rate = 0

    def feed(self, chunk: bytes) -> None:
        # Once a stream is known not to be this format, its bytes are no longer looked at.
        if self.understood:
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        raise NotImplementedError

    @property
    def seconds(self) -> float:
        return self.samples / self.rate if self.rate else 0.0


class PcmMeter(Meter):
    def __init__(self, rate: int = PCM_RATE, sample_bytes: int = 2):
        super().__init__()
        self.rate = rate
        self._bytes = 0
        self._sample_bytes = sample_bytes

    def _feed(self, chunk: bytes) -> None:
        self._bytes += len(chunk)
        self.samples = self._bytes // self._sample_bytes


class WavMeter(Meter):
    """RIFF chunks up to `data`, then the data bytes at the byte rate of `fmt `."""

    def __init__(self):
        super().__init__()
        self._head = bytearray()
        self._fmt = 0  # bytes per frame (block align), once `fmt ` is read
        self._frame_bytes = 0  # the same, once the data chunk has begun
        self._data = 0

    def _feed(self, chunk: bytes) -> None:
        if not self._frame_bytes:
            self._head += chunk
            chunk = self._parse_head()
        self._data += len(chunk)
        if self._frame_bytes:
            self.samples = self._data // self._frame_bytes

    def _parse_head(self) -> bytes:
        """Reads the chunks before the audio; returns the audio bytes the head holds, once its data chunk has begun."""
        head = self._head
        if len(head) >= 4 and head[:4] != b"RIFF":
            self.understood = False
            return b""
        position = 12
        while position + 8 <= len(head):
            chunk_id, size = head[position : position + 4], struct.unpack_from("<I", head, position + 4)[0]
            body = position + 8
            if chunk_id == b"fmt " and body + 16 <= len(head):
                # The sample rate, and the block align: bytes per frame, every channel's container included.
                self.rate, _, self._fmt = struct.unpack_from("<IIH", head, body + 4)
            elif chunk_id == b"fmt ":
                return b""
            if chunk_id == b"data":
                if not self._fmt:
                    self.understood = False
                    return b""
                self._frame_bytes = self._fmt
                return head[body:]
            position = body + size + (size & 1)
        return b""


_MP3_BITRATES = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),  # MPEG-1 Layer III
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),  # MPEG-2 and 2.5 Layer III
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_frame(header: bytes) -> tuple[int, int, int] | None:
    """(frame bytes, samples, sample rate) of an MPEG Layer III frame header, or None."""
    if header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    bitrate_index, rate_index, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    bitrate = _MP3_BITRATES[1 if mpeg1 else 2][bitrate_index] * 1000
    rate = _MP3_RATES[version][rate_index]
    samples = 1152 if mpeg1 else 576
    return samples // 8 * bitrate // rate + padding, samples, rate


class _FrameMeter(Meter):
    """Walks frames whose headers give their length; resynchronises on garbage."""

    header_size = 4

    def __init__(self):
        super().__init__()
        self._buffer = bytearray()
        self._skip = 0
        self._lost = 0
        self._known: dict[bytes, tuple[int, int, int] | None] = {}

    def frame(self, header: bytes) -> tuple[int, int, int] | None:
        raise NotImplementedError

    def prefix(self) -> bool:
        """Consume a leading tag; False while more bytes are needed to tell."""
        return True

    def _feed(self, chunk: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(chunk))
            chunk, self._skip = chunk[dropped:], self._skip - dropped
        self._buffer += chunk
        if not self.prefix():
            return
        buffer, position = self._buffer, 0
        known, last = self._known, None
        while position + self.header_size <= len(buffer):
            header = bytes(buffer[position : position + self.header_size])
            # A constant-bitrate stream repeats a handful of headers: each is parsed once.
            found = known.get(header, _UNSEEN)
            if found is _UNSEEN:
                found = self.frame(header)
                if len(known) < 64:
                    known[header] = found
            if found is None:
                # On to the next byte that could start a header.
                following = buffer.find(b"\xff", position + 1)
                step = (following if following >= 0 else len(buffer)) - position
                self._lost += step
                position += step
                continue
            length, samples, rate = found
            if position + length > len(buffer):
                break
            # A constant-bitrate stream repeats one header: when the last frame had it too and every
            # whole frame left in the buffer starts with it, they are counted at once, not one by one.
            frames = (len(buffer) - position) // length
            if header == last and frames > 1 and self._repeats(buffer, position, length, frames, header):
                self.samples += samples * frames
                position += length * frames
            else:
                self.samples += samples
                position += length
            self.rate = rate
            self._lost = 0
            last = header
        del buffer[:position]
        if self._lost > 1 << 14:
            # Nothing recognisable in 16 KiB: not this format.
            self.understood = False
            buffer.clear()

    def _repeats(self, buffer: bytearray, position: int, length: int, frames: int, header: bytes) -> bool:
        """Whether the `frames` frames of `length` bytes from `position` all start with `header`."""
        end = position + length * frames
        return all(
            buffer[position + offset : end : length] == header[offset : offset + 1] * frames
            for offset in range(self.header_size)
        )


class Mp3Meter(_FrameMeter):
    def __init__(self):
        super().__init__()
        self._tag_checked = False

    def prefix(self) -> bool:
        if self._tag_checked:
            return True
        if len(self._buffer) < 10:
            return False
        self._tag_checked = True
        if self._buffer[:3] == b"ID3":
            size = 0
            for byte in self._buffer[6:10]:
                size = (size << 7) | (byte & 0x7F)
            size += 10 + (10 if self._buffer[5] & 0x10 else 0)
            dropped = min(size, len(self._buffer))
            del self._buffer[:dropped]
            self._skip = size - dropped
        return True

    def frame(self, header):
        return _mp3_frame(header)


_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


class AdtsMeter(_FrameMeter):
    header_size = 7

    def frame(self, header):
        if header[0] != 0xFF or header[1] & 0xF6 != 0xF0:
            return None
        rate_index = (header[2] >> 2) & 0xF
        length = ((header[3] & 3) << 11) | (header[4] << 3) | (header[5] >> 5)
        if rate_index >= len(_AAC_RATES) or length < 7:
            return None
        return length, 1024 * ((header[6] & 3) + 1), _AAC_RATES[rate_index]


class OggOpusMeter(Meter):
    """Ogg pages: the granule position of the last complete page, in 48 kHz samples, less pre-skip."""

    def __init__(self):
        super().__init__()
        self.rate = 48000
        self._buffer = bytearray()
        self._pre_skip = 0
        self._granule = 0

    def _feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        buffer = self._buffer
        while len(buffer) >= 27:
            if buffer[:4] != b"OggS":
                self.understood = False
                buffer.clear()
                return
            segments = buffer[26]
            if len(buffer) < 27 + segments:
                return
            size = 27 + segments + sum(buffer[27 : 27 + segments])
            if len(buffer) < size:
                return
            body = buffer[27 + segments : size]
            if body[:8] == b"OpusHead" and len(body) >= 12:
                self._pre_skip = struct.unpack_from("<H", body, 10)[0]
            granule = struct.unpack_from("<q", buffer, 6)[0]
            if granule > 0:
                self._granule = granule
            del buffer[:size]
            self.samples = max(0, self._granule - self._pre_skip)


_FLAC_RATES = (0, 88200, 176400, 192000, 8000, 16000, 22050, 24000, 32000, 44100, 48000, 96000)


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _utf8_number(data: bytes, position: int) -> tuple[int | None, int]:
    """FLAC's frame or sample number, coded like UTF-8 (up to 7 bytes); (None, _) if malformed."""
    first = data[position]
    length = 0
    while first & (0x80 >> length):  # ends by the 8th bit: 0x80 >> 8 is 0
        length += 1
    if length == 1 or length > 7:
        return None, position
    if length == 0:
        return first, position + 1
    value = first & (0x7F >> length)
    for byte in data[position + 1 : position + length]:
        if byte & 0xC0 != 0x80:
            return None, position
        value = (value << 6) | (byte & 0x3F)
    return value, position + length


class FlacMeter(Meter):
    """STREAMINFO for the sample rate, then each frame header (CRC-8 checked) for its block size."""

    def __init__(self):
        super().__init__()
        self._buffer = bytearray()
        self._in_frames = False
        self._next_frame = None

    def _feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if not self._in_frames and not self._metadata():
            return
        self._frames()

    def _metadata(self) -> bool:
        buffer = self._buffer
        if len(buffer) >= 4 and buffer[:4] != b"fLaC":
            self.understood = False
            buffer.clear()
            return False
        position = 4
        while position + 4 <= len(buffer):
            last, kind = buffer[position] & 0x80, buffer[position] & 0x7F
            size = int.from_bytes(buffer[position + 1 : position + 4], "big")
            if position + 4 + size > len(buffer):
                return False
            if kind == 0 and size == 34:  # STREAMINFO
                self.rate = int.from_bytes(buffer[position + 14 : position + 17], "big") >> 4
            position += 4 + size
            if last:
                del buffer[:position]
                self._in_frames = True
                return True
        return False

    def _frames(self) -> None:
        buffer, position = self._buffer, 0
        while True:
            following = buffer.find(b"\xff", position)
            if following < 0:
                # No header can start in what is left: none of it is kept.
                position = len(buffer)
                break
            position = following
            if len(buffer) - position < 16:
                break  # a header may start here: its bytes are kept until it can be read whole
            header = self._header(bytes(buffer[position : position + 16]))
            if header is None:
                position += 1
                continue
            length, block = header
            self.samples += block
            position += length
        del buffer[:position]

    def _header(self, data: bytes) -> tuple[int, int] | None:
        """(header length, block size) of a valid frame header at the start of `data`, or None."""
        if data[1] not in (0xF8, 0xF9) or data[3] & 1:
            return None
        size_code, rate_code = data[2] >> 4, data[2] & 0xF
        if size_code == 0 or rate_code == 15 or (data[3] >> 4) > 10:
            return None
        number, position = _utf8_number(data, 4)
        if number is None:
            return None
        # Fixed-size blocks carry the frame number: it must be the next one, which rules out
        # a false header inside audio data.
        if data[1] == 0xF8 and self._next_frame is not None and number != self._next_frame:
            return None
        if size_code == 1:
            block = 192
        elif size_code <= 5:
            block = 576 << (size_code - 2)
        elif size_code == 6:
            block, position = data[position] + 1, position + 1
        elif size_code == 7:
            block, position = int.from_bytes(data[position : position + 2], "big") + 1, position + 2
        else:
            block = 256 << (size_code - 8)
        position += {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
        if _crc8(data[:position]) != data[position]:  # the longest header, CRC included, is 16 bytes
            return None
        if rate_code and rate_code < len(_FLAC_RATES) and not self.rate:
            self.rate = _FLAC_RATES[rate_code]
        if data[1] == 0xF8:
            self._next_frame = number + 1
        return position + 1, block


class UnknownMeter(Meter):
    understood = False

    def _feed(self, chunk: bytes) -> None:
        pass


METERS = {
    "pcm": PcmMeter,
    "wav": WavMeter,
    "mp3": Mp3Meter,
    "aac": AdtsMeter,
    "opus": OggOpusMeter,
    "flac": FlacMeter,
}


def for_format(response_format: str) -> Meter:
    return METERS.get(response_format, UnknownMeter)()
