"""Hand encoding of the few DICOM structures on hot paths (file meta, command sets), PS3.5 7.1.

pydicom's writer validates and converts every element; for the fixed, small structures
written per instance this costs more than the rest of the work. Each encoder here is
checked byte for byte against pydicom in the tests.
"""

from __future__ import annotations

import struct

from gateway import __version__

__all__ = ["explicit_element", "file_meta_bytes", "implicit_element", "padded"]

#: Our own root: a UUID-derived UID (PS3.5 B.2), fixed for this implementation.
IMPLEMENTATION_CLASS_UID = "2.25.58709146470483910377836882171605898852"
IMPLEMENTATION_VERSION_NAME = f"CONTOURGW_{__version__}"[:16]


def padded(text: str, pad: bytes) -> bytes:
    """ASCII value padded to even length (UI with NUL, text VRs with space)."""
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def explicit_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """Explicit VR Little Endian element (PS3.5 7.1.2); OB uses the 4-byte length form."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if vr == b"OB":
        return head + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def implicit_element(tag: int, value: bytes) -> bytes:
    """Implicit VR Little Endian element (PS3.5 7.1.3), as command sets are encoded."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = "") -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1)."""
    body = b"".join((
        explicit_element(0x00020001, b"OB", b"\x00\x01"),
        explicit_element(0x00020002, b"UI", padded(sop_class_uid, b"\0")),
        explicit_element(0x00020003, b"UI", padded(sop_instance_uid, b"\0")),
        explicit_element(0x00020010, b"UI", padded(transfer_syntax, b"\0")),
        explicit_element(0x00020012, b"UI", padded(IMPLEMENTATION_CLASS_UID, b"\0")),
        explicit_element(0x00020013, b"SH", padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        *([explicit_element(0x00020016, b"AE", padded(source_ae.strip(), b" "))] if source_ae.strip() else []),
    ))
    return b"\0" * 128 + b"DICM" + explicit_element(0x00020000, b"UL", struct.pack("<I", len(body))) + body
