"""Array axes and patient directions: which way each axis of a volume runs, and turning one convention into another.

A model says in its manifest which patient direction each axis of its input increases toward
(``"SPL"``, ``"RAS"`` ...); the predictor reads the CT's own from its affine and reorders and flips
the array to match, then undoes that on the result.
"""

from __future__ import annotations

import numpy as np

from gateway.errors import InferenceError

__all__ = ["axis_transform", "orientation_code", "oriented", "unoriented"]

_LETTERS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}  # LPS axes


def orientation_code(affine: np.ndarray) -> str:
    """For each array axis, the patient direction (L/R, P/A, S/I) its index increases toward."""
    code = ""
    for axis in range(3):
        column = affine[:3, axis]
        dominant = int(np.argmax(np.abs(column)))
        code += _LETTERS[(dominant, 1 if column[dominant] > 0 else -1)]
    if sorted(code.translate(str.maketrans("RAI", "LPS"))) != ["L", "P", "S"]:
        raise InferenceError(f"oblique volume: two axes point the same way ({code})")
    return code


def axis_transform(source: str, target: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """``(order, flips)`` so that ``flip(transpose(a, order), flips)`` turns *source* axes into *target*.

    ``order[t]`` is the source axis that becomes target axis ``t``; ``flips[t]`` says it is reversed.
    """
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    order, flips = [], []
    for letter in target:
        if letter in source:
            order.append(source.index(letter))
            flips.append(False)
        else:
            order.append(source.index(opposite[letter]))
            flips.append(True)
    return (order[0], order[1], order[2]), (flips[0], flips[1], flips[2])


def oriented(array: np.ndarray, order: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    out = np.transpose(array, order)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return out


def unoriented(array: np.ndarray, order: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis)
    return np.ascontiguousarray(np.transpose(array, np.argsort(order)))
