"""A walk over a received data set's element headers: the few values the receiver needs, and whether it is whole.

The receiver identifies each instance before answering it (:func:`gateway.receiving.storage_scp.identify`).
Reading the data set with pydicom builds an object per element and copies every value, the pixel data
included; this walk reads only the headers (PS3.5 7.1), returns the raw values of the top-level elements
asked for, and refuses a data set whose elements do not fit it: a value running past the end, an item or
delimiter out of place, a sequence without its delimiter. Values of defined length are skipped unread, as
pydicom leaves them unread until used; values of undefined length (sequences, encapsulated pixel data)
are followed item by item to their delimiter. Little endian only, as the node negotiates.
"""

from __future__ import annotations

import struct

__all__ = ["MalformedDataSetError", "top_level_values"]

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD  # PS3.5 7.5
_DELIMITER_GROUP = 0xFFFE
#: Explicit VRs with a reserved field and a 32-bit length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
#: Explicit VRs that may have an undefined length (PS3.5 7.1.2; encapsulated pixel data is OB or OW).
_UNDEFINED_VRS = frozenset({b"SQ", b"OB", b"OW", b"UN"})
_MAX_DEPTH = 32  # sequences nested deeper than any IOD defines
_HEAD = struct.Struct("<HHI")  # tag and 32-bit length: implicit VR, items and delimiters
_EXPLICIT = struct.Struct("<HH2sH")  # tag, VR and 16-bit length
_LONG_LENGTH = struct.Struct("<I")


class MalformedDataSetError(ValueError):
    """The data set's elements do not fit it (no value is quoted: the reason only)."""


def top_level_values(data: bytes | memoryview, implicit: bool, wanted: frozenset[int]) -> tuple[dict[int, bytes], int]:
    """The raw values of the *wanted* top-level tags present in *data*, and how many top-level elements it has.

    Values of undefined length (sequences, encapsulated pixel data) are walked, not returned.

    As pydicom does, fewer than 8 bytes after the last element are ignored (padding some senders add).

    Raises
    ------
    MalformedDataSetError
        When an element does not fit the data set.
    """
    walk = _Walk(memoryview(data), wanted)
    walk.data_set(0, implicit, depth=0)
    return walk.found, walk.count


class _Walk:
    def __init__(self, data: memoryview, wanted: frozenset[int]) -> None:
        self.data, self.end, self.wanted = data, len(data), wanted
        self.found: dict[int, bytes] = {}
        self.count = 0

    def data_set(self, offset: int, implicit: bool, depth: int) -> int:
        """Walk the elements from *offset*: to the end (*depth* 0) or to an Item Delimitation; return where it ends."""
        while True:
            if self.end - offset < 8:
                if depth == 0:
                    return self.end
                raise MalformedDataSetError("item without its delimiter")
            tag, vr, length, value = self._header(offset, implicit)
            if tag == _ITEM_END and depth > 0:
                return value
            if tag >> 16 == _DELIMITER_GROUP:
                raise MalformedDataSetError("item or delimiter outside a sequence")
            if length == _UNDEFINED:
                if vr is not None and vr not in _UNDEFINED_VRS:
                    raise MalformedDataSetError("undefined length on a value that cannot have one")
                offset = self._items(value, implicit or vr == b"UN", depth + 1)  # UN: implicit inside
            elif value + length > self.end:
                raise MalformedDataSetError("value runs past the end of the data set")
            else:
                offset = value + length
                if depth == 0 and tag in self.wanted:
                    self.found[tag] = bytes(self.data[value:offset])
            if depth == 0:
                self.count += 1

    def _items(self, offset: int, implicit: bool, depth: int) -> int:
        """Walk the items of a value of undefined length to its Sequence Delimitation; return where it ends."""
        if depth > _MAX_DEPTH:
            raise MalformedDataSetError("sequences nested too deep")
        while True:
            if self.end - offset < 8:
                raise MalformedDataSetError("sequence without its delimiter")
            group, element, length = _HEAD.unpack_from(self.data, offset)
            tag, offset = group << 16 | element, offset + 8
            if tag == _SEQUENCE_END:
                return offset
            if tag != _ITEM:
                raise MalformedDataSetError("sequence holding something other than items")
            if length == _UNDEFINED:
                offset = self.data_set(offset, implicit, depth)
            elif offset + length > self.end:
                raise MalformedDataSetError("item runs past the end of the data set")
            else:
                offset += length

    def _header(self, offset: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Tag, VR (None where the encoding has none), value length and value offset of the element at *offset*."""
        group, element, length = _HEAD.unpack_from(self.data, offset)
        tag = group << 16 | element
        if implicit or group == _DELIMITER_GROUP:  # items and delimiters carry no VR in either encoding
            return tag, None, length, offset + 8
        _, _, vr, short_length = _EXPLICIT.unpack_from(self.data, offset)
        if vr not in _LONG_VRS:
            return tag, vr, short_length, offset + 8
        if self.end - offset < 12:
            raise MalformedDataSetError("element header cut off")
        return tag, vr, _LONG_LENGTH.unpack_from(self.data, offset + 8)[0], offset + 12
