"""Label masks: up to :data:`MAX_LABELS` possibly overlapping structures on one grid, in bounded memory.

Two forms hold the same masks, and :class:`LabelMasks` keeps whichever is smaller:

* ``classes``: layers of class maps (``uint8``, or ``uint16`` above 255 labels), 0 where no label is. A voxel
  inside *k* labels holds them in its first *k* layers; a softmax decision is one layer, so 117 organs cost
  one byte a voxel, and an External around two lungs two layers.
* ``bits``: one bit per label, eight labels to a ``uint8`` word (bit ``(value - 1) % 8`` of word
  ``(value - 1) // 8``): for many labels overlapping everywhere, never more than ``ceil(labels / 8)`` bytes
  a voxel, and as much as the bit-planes of older releases for 8 labels (1 byte) or 9-32 (4 bytes at most).

Masks are added one label at a time, within the label's bounding box, so post-processing never touches
more of the grid than a structure covers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = ["MAX_LABELS", "Box", "LabelMasks", "MaskView", "decide", "decide_logits"]

#: The most labels one model or one route may have (DICOM allows more ROIs; treatment planning systems show
#: some hundreds; TotalSegmentator has 117 in one task).
MAX_LABELS = 256

#: A bounding box: one slice per grid axis.
Box = tuple[slice, ...]

Form = Literal["classes", "bits"]


class LabelMasks:
    """The masks of labels ``1..top`` on one grid; :meth:`add` builds them, :meth:`mask` reads one back."""

    def __init__(self, planes: Sequence[np.ndarray], form: Form, top: int) -> None:
        self._planes = list(planes)
        self.form: Form = form
        self.top = top

    @classmethod
    def empty(cls, shape: Sequence[int], top: int) -> LabelMasks:
        """No label anywhere yet, on a grid of *shape*, for label values up to *top*."""
        return cls([np.zeros(tuple(shape), dtype=_class_dtype(top))], "classes", top)

    @classmethod
    def from_classes(cls, classes: np.ndarray, top: int) -> LabelMasks:
        """One class map (0: none), such as a softmax decision; kept as it is, not copied."""
        return cls([classes], "classes", top)

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> LabelMasks:
        """An integer bit-field on the grid (bit ``value - 1`` set where the label is), as releases before this
        one stored masks (``uint8`` for up to 8 labels, ``uint32`` for up to 32)."""
        little = bits.astype(bits.dtype.newbyteorder("<"), copy=False)
        words = np.ascontiguousarray(np.moveaxis(little.view(np.uint8).reshape(*bits.shape, bits.dtype.itemsize),
                                                 -1, 0))
        return cls(list(words), "bits", 8 * bits.dtype.itemsize)

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid's shape."""
        return tuple(self._planes[0].shape)

    @property
    def planes(self) -> np.ndarray:
        """The layers or words, ``[planes, *grid]`` (a copy; for storing)."""
        return np.stack(self._planes)

    @property
    def nbytes(self) -> int:
        """Memory the masks take."""
        return sum(plane.nbytes for plane in self._planes)

    def add(self, value: int, mask: np.ndarray, box: Box | None = None) -> None:
        """Set label *value* where *mask* is (*mask* covers *box*, or the whole grid)."""
        if not 1 <= value <= self.top:
            raise ValueError(f"label value {value} outside 1..{self.top}")
        box = box or tuple(slice(None) for _ in self.shape)
        if self.form == "bits":
            word = self._planes[(value - 1) // 8][box]
            word |= mask.astype(np.uint8) << np.uint8((value - 1) % 8)
            return
        remaining = np.array(mask, dtype=bool)
        for layer in self._planes:
            view = layer[box]
            place = remaining & (view == 0)
            view[place] = value
            remaining &= ~place
            if not remaining.any():
                return
        if (len(self._planes) + 1) * self._planes[0].itemsize > math.ceil(self.top / 8):
            self._to_bits()
            self.add(value, remaining, box)
            return
        layer = np.zeros(self.shape, dtype=self._planes[0].dtype)
        layer[box][remaining] = value
        self._planes.append(layer)

    def region(self, value: int, box: Box) -> np.ndarray:
        """Label *value*'s mask within *box*."""
        if self.form == "bits":
            found: np.ndarray = (self._planes[(value - 1) // 8][box] & np.uint8(1 << (value - 1) % 8)) != 0
            return found
        found = self._planes[0][box] == value
        for layer in self._planes[1:]:
            found |= layer[box] == value
        return found

    def mask(self, value: int) -> np.ndarray:
        """Label *value*'s mask on the whole grid."""
        return self.region(value, tuple(slice(None) for _ in self.shape))

    def named(self, values: Mapping[str, int]) -> MaskView:
        """Each label's mask by name (*values*: name -> label value), made only when asked for."""
        return MaskView({name: functools.partial(self.mask, value) for name, value in values.items()})

    def boxes(self, values: Iterable[int]) -> dict[int, Box]:
        """The bounding box of each label of *values* that is somewhere (absent: empty)."""
        wanted = sorted(set(values))
        found: dict[int, Box] = {}
        if self.form == "classes":
            for layer in self._planes:
                for value, box in enumerate(ndimage.find_objects(layer, max_label=self.top), start=1):
                    if box is not None and value in wanted:
                        found[value] = box if value not in found else _union(found[value], box)
            return found
        for value in wanted:
            mask = self.mask(value)
            spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                     for axis in range(mask.ndim)]
            if spans[0].size:
                found[value] = tuple(slice(int(span[0]), int(span[-1]) + 1) for span in spans)
        return found

    def counts(self) -> dict[int, int]:
        """Voxels per label value, ``1..top``."""
        if self.form == "classes":
            total = np.zeros(self.top + 1, dtype=np.int64)
            for layer in self._planes:
                total += np.bincount(layer.ravel(), minlength=self.top + 1)[:self.top + 1]
            return {value: int(total[value]) for value in range(1, self.top + 1)}
        return {value: int(np.count_nonzero(self.mask(value))) for value in range(1, self.top + 1)}

    def map(self, function: Callable[[np.ndarray], np.ndarray]) -> LabelMasks:
        """The same masks with *function* applied to each plane (a resampling, a reorientation)."""
        return LabelMasks([function(plane) for plane in self._planes], self.form, self.top)

    def _to_bits(self) -> None:
        words = [np.zeros(self.shape, dtype=np.uint8) for _ in range(math.ceil(self.top / 8))]
        for layer in self._planes:
            for value, box in enumerate(ndimage.find_objects(layer, max_label=self.top), start=1):
                if box is not None:
                    words[(value - 1) // 8][box] |= (layer[box] == value).astype(np.uint8) << np.uint8((value - 1) % 8)
        self._planes, self.form = words, "bits"


class MaskView(Mapping[str, np.ndarray]):
    """Boolean masks by name, each made when it is asked for and not kept: a structure set of a hundred organs on
    a 512 x 512 x 300 CT never holds a hundred full-grid masks (some 8 GB) at once."""

    def __init__(self, makers: Mapping[str, Callable[[], np.ndarray]]) -> None:
        self._makers = dict(makers)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    def without(self, names: Iterable[str]) -> MaskView:
        """The same view less *names*."""
        left_out = set(names)
        return MaskView({name: make for name, make in self._makers.items() if name not in left_out})


def _class_dtype(top: int) -> type[np.unsignedinteger]:
    return np.uint8 if top <= 255 else np.uint16


def _union(first: Box, second: Box) -> Box:
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(first, second, strict=True))


def decide(scores: np.ndarray, kind: str, threshold: float) -> LabelMasks:
    """Probabilities ``[channels, *grid]`` decided. Softmax: the winning class (0 = background, labels 1..);
    sigmoid: channel c where it is at least *threshold*, as label c + 1."""
    if kind == "softmax":  # a running argmax, channel by channel: np.argmax over the first axis copies them all first
        return decide_logits(scores, len(scores), kind, threshold)
    masks = LabelMasks.empty(scores.shape[1:], len(scores))
    for channel, score in enumerate(scores):
        masks.add(channel + 1, score >= threshold)
    return masks


def decide_logits(channels: Iterable[np.ndarray], count: int, kind: str, threshold: float) -> LabelMasks:
    """:func:`decide` on the *count* channels of logits, one channel at a time (each a whole CT of floats):
    softmax keeps a running best logit and class beside the decision, never every channel."""
    decided: LabelMasks | None = None
    if kind == "softmax":  # the first largest logit wins, as argmax; softmax does not change the order
        best: np.ndarray | None = None
        winner: np.ndarray | None = None
        for index, logit in enumerate(channels):
            if best is None or winner is None:
                best, winner = logit.copy(), np.zeros(logit.shape, dtype=_class_dtype(count - 1))
                continue
            winner[logit > best] = index
            np.maximum(best, logit, out=best)
        assert winner is not None  # a manifest has one channel at least
        return LabelMasks.from_classes(winner, count - 1)
    cut = math.log(threshold / (1 - threshold))  # sigmoid(x) >= threshold
    for index, logit in enumerate(channels):
        if decided is None:
            decided = LabelMasks.empty(logit.shape, count)
        decided.add(index + 1, logit >= cut)
    assert decided is not None
    return decided
