"""Encapsulated pixel data without free text: comment and application marker segments removed from every frame.

JPEG (ISO/IEC 10918-1), JPEG-LS (ISO/IEC 14495-1) and JPEG 2000 (ISO/IEC 15444-1) frames (PS3.5 A.4) may carry
comment (COM) and application (APPn) marker segments, or, in a JP2 file, 'xml ', 'uuid' and 'uinf' boxes. Vendors
write EXIF, ICC profiles, free text, even patient names there, where no attribute allow-list looks.
:func:`strip_pixel_data` re-writes each frame marker by marker: the segments decoding needs are copied byte for byte,
entropy-coded data is copied untouched (from SOS to the next marker: 0xFF00 stuffing and RSTn stay inside it), and
nothing after the end-of-image or end-of-codestream marker is kept. Decoded pixel values are therefore unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

__all__ = ["MARKER_SYNTAXES", "strip_frame", "strip_pixel_data"]

#: Transfer syntaxes whose frames are JPEG, JPEG-LS or JPEG 2000 (HTJ2K included) streams (PS3.5 A.4.1-A.4.6).
MARKER_SYNTAXES = frozenset(str(uid) for uid in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes,
                                                  *JPEG2000TransferSyntaxes))

# JPEG and JPEG-LS markers (second byte after 0xFF).
_SOI, _EOI, _SOS, _COM = 0xD8, 0xD9, 0xDA, 0xFE
_APP0, _APP8, _APP14, _APP15 = 0xE0, 0xE8, 0xEE, 0xEF
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-RST7: no length field
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})  # SOF0-SOF15 (not DHT, JPG, DAC), JPEG-LS SOF55
_ENTROPY = -1  # pseudo marker of entropy-coded data
#: The end of entropy-coded data: 0xFF followed by a marker byte. Not 0xFF00 (JPEG stuffing), 0xFF00-0xFF7F
#: (JPEG-LS bit stuffing), RSTn, or 0xFFFF (a fill byte: the match is then on the last 0xFF of the run).
_SCAN_END = re.compile(rb"\xff[\x80-\xcf\xd8-\xfe]")
#: Application segments a colour decoder reads, cut to their fixed fields (no text fits there):
#: marker -> (identifier, bytes of payload kept, zero bytes appended). JFIF loses its thumbnail (its size is set
#: to 0 x 0); Adobe keeps version, flags and colour transform; JPEG-LS 'mrfx' keeps its colour transform.
_COLOUR_APPS = {_APP0: (b"JFIF\x00", 12, 2), _APP14: (b"Adobe", 12, 0), _APP8: (b"mrfx", 5, 0)}

# JPEG 2000 codestream markers and JP2 boxes.
_SOC, _SOT, _SOD, _EOC = b"\xff\x4f", b"\xff\x90", b"\xff\x93", b"\xff\xd9"
_J2K_COM, _TLM = b"\xff\x64", b"\xff\x55"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: Boxes a JP2 decoder needs: signature, file type, header (image size, colour, palette), codestream.
_JP2_BOXES = frozenset({b"jP  ", b"ftyp", b"jp2h", b"jp2c"})
_BASIC_OFFSET_LIMIT = 2**32


def strip_pixel_data(pixel_data: bytes, number_of_frames: int) -> bytes:
    """Encapsulated *pixel_data* rebuilt with every frame stripped by :func:`strip_frame`.

    Parameters
    ----------
    pixel_data : bytes
        The value of Pixel Data (7FE0,0010) in an encapsulated transfer syntax of :data:`MARKER_SYNTAXES`.
    number_of_frames : int
        Number of Frames (0028,0008), 1 when absent.

    Returns
    -------
    bytes
        The new value: one fragment per frame, odd-length frames padded to even length, and a Basic Offset
        Table (PS3.5 A.4) unless the offsets would not fit in it.

    Raises
    ------
    ValueError
        If the value is not encapsulated, or a frame is not a JPEG, JPEG-LS or JPEG 2000 stream.
    """
    frames = []
    for index, frame in enumerate(generate_frames(pixel_data, number_of_frames=number_of_frames), start=1):
        try:
            frames.append(strip_frame(frame))
        except ValueError as exc:
            raise ValueError(f"frame {index} of {number_of_frames}: {exc}") from exc
    offsets_fit = sum(len(frame) + 9 for frame in frames[:-1]) < _BASIC_OFFSET_LIMIT
    return encapsulate(frames, has_bot=offsets_fit)


def strip_frame(frame: bytes) -> bytes:
    """*frame* without comment or application data, and without anything after its end marker.

    JPEG and JPEG-LS: every APPn and COM segment is dropped, before the first scan and between scans; a frame of
    more than one component keeps only the fixed fields of JFIF, Adobe and JPEG-LS 'mrfx' segments, which set its
    colour transform. JPEG 2000: COM segments go from the main and tile-part headers (tile-part lengths are
    corrected, and TLM dropped if they change); a JP2 file keeps only its 'jP  ', 'ftyp', 'jp2h' and 'jp2c' boxes.

    Raises
    ------
    ValueError
        If *frame* is none of these streams, or its marker segments are malformed.
    """
    if frame.startswith(b"\xff\xd8"):
        return _strip_jpeg(frame)
    if frame.startswith(_SOC + b"\xff\x51"):  # SIZ follows SOC
        return _strip_codestream(frame)
    if frame.startswith(_JP2_SIGNATURE):
        return _strip_jp2(frame)
    raise ValueError("not a JPEG, JPEG-LS or JPEG 2000 stream")


def _strip_jpeg(frame: bytes) -> bytes:
    pieces = _jpeg_pieces(frame)
    frame_header = next((segment for marker, segment in pieces if marker in _SOF), b"")
    colour = len(frame_header) > 9 and frame_header[9] > 1  # Nf, the number of components
    return b"".join(_kept_jpeg_segment(marker, segment, colour) for marker, segment in pieces)


def _jpeg_pieces(frame: bytes) -> list[tuple[int, bytes]]:
    """``(marker, bytes)`` from SOI to EOI (or the end of a truncated stream); entropy-coded data as ``_ENTROPY``."""
    pieces, pos = [(_SOI, frame[:2])], 2
    while pos + 1 < len(frame):
        if frame[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        while pos + 2 < len(frame) and frame[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = frame[pos + 1]
        if marker == _EOI:
            pieces.append((_EOI, frame[pos:pos + 2]))
            break
        end = pos + 2 if marker in _STANDALONE else pos + 2 + _segment_length(frame, pos)
        pieces.append((marker, frame[pos:end]))
        pos = end
        if marker == _SOS:
            found = _SCAN_END.search(frame, pos)
            stop = len(frame) if found is None else found.start()
            pieces.append((_ENTROPY, frame[pos:stop]))
            pos = stop
    return pieces


def _segment_length(stream: bytes, pos: int) -> int:
    """The length field of the marker segment at *pos* (it counts itself), checked against the stream."""
    length = int.from_bytes(stream[pos + 2:pos + 4], "big")
    if length < 2 or pos + 2 + length > len(stream):
        raise ValueError(f"marker segment at byte {pos} runs past the end of the stream")
    return length


def _kept_jpeg_segment(marker: int, segment: bytes, colour: bool) -> bytes:
    if marker == _COM:
        return b""
    if not _APP0 <= marker <= _APP15:
        return segment
    identifier, kept, zeros = _COLOUR_APPS.get(marker, (b"", 0, 0))
    payload = segment[4:]
    if not colour or not identifier or not payload.startswith(identifier) or len(payload) < kept:
        return b""
    return segment[:2] + (2 + kept + zeros).to_bytes(2, "big") + payload[:kept] + bytes(zeros)


def _strip_codestream(stream: bytes) -> bytes:
    main, pos = _codestream_segments(stream, 2, _SOT)
    parts, resized = [], False
    while stream.startswith(_SOT, pos):
        part, pos, was_resized = _tile_part(stream, pos)
        parts.append(part)
        resized = resized or was_resized
    if not stream.startswith(_EOC, pos):
        raise ValueError(f"no JPEG 2000 tile-part or end of codestream at byte {pos}")
    if resized:  # TLM lists tile-part lengths; it is optional, so drop it rather than recompute it
        main = [segment for segment in main if not segment.startswith(_TLM)]
    return b"".join([_SOC, *main, *parts, _EOC])


def _codestream_segments(stream: bytes, pos: int, stop: bytes) -> tuple[list[bytes], int]:
    """The marker segments from *pos* to the marker *stop*, COM segments left out, and the position of *stop*."""
    kept = []
    while not stream.startswith(stop, pos):
        if pos >= len(stream) or stream[pos] != 0xFF:
            raise ValueError(f"no JPEG 2000 marker at byte {pos}")
        end = pos + 2 + _segment_length(stream, pos)
        if not stream.startswith(_J2K_COM, pos):
            kept.append(stream[pos:end])
        pos = end
    return kept, pos


def _tile_part(stream: bytes, pos: int) -> tuple[bytes, int, bool]:
    """The tile-part at *pos* without COM segments, where the next one starts, and whether its length changed."""
    if stream[pos + 2:pos + 4] != b"\x00\x0a":
        raise ValueError(f"malformed SOT marker segment at byte {pos}")
    psot = int.from_bytes(stream[pos + 6:pos + 10], "big")
    header, sod = _codestream_segments(stream, pos + 12, _SOD)
    end = pos + psot if psot else stream.find(_EOC, sod)  # Psot 0: the last tile-part, up to EOC
    if end < sod or end > len(stream):
        raise ValueError(f"tile-part at byte {pos} has an impossible length {psot}")
    body = stream[sod:end]  # SOD and the packets, untouched (they cannot hold a marker)
    length = 12 + sum(map(len, header)) + len(body)
    sot = stream[pos:pos + 6] + (length if psot else 0).to_bytes(4, "big") + stream[pos + 10:pos + 12]
    return b"".join([sot, *header, body]), end, psot not in (0, length)


def _strip_jp2(data: bytes) -> bytes:
    return b"".join(_kept_box(box_type, content, data[start:end])
                    for box_type, content, start, end in _boxes(data))


def _boxes(data: bytes) -> Iterable[tuple[bytes, bytes, int, int]]:
    """``(type, content, start, end)`` of each top-level box (ISO/IEC 15444-1 I.4); trailing padding ignored."""
    pos = 0
    while pos + 8 <= len(data):
        size, box_type, header = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8], 8
        if size == 1:  # XLBox: the length follows as 8 bytes
            size, header = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        end = len(data) if size == 0 else pos + size
        if end < pos + header or end > len(data):
            raise ValueError(f"JP2 box at byte {pos} runs past the end of the file")
        yield box_type, data[pos + header:end], pos, end
        pos = end


def _kept_box(box_type: bytes, content: bytes, box: bytes) -> bytes:
    if box_type == b"jp2c":
        codestream = _strip_codestream(content)
        return (8 + len(codestream)).to_bytes(4, "big") + box_type + codestream
    return box if box_type in _JP2_BOXES else b""
