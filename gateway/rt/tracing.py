"""Boundaries of a binary plane: marching squares at 0.5, vectorised, for masks only.

On a binary mask every boundary vertex is the midpoint between two edge-adjacent pixels that differ,
so the whole trace is integer arithmetic on doubled coordinates. Each cell with mixed corners gives
one segment (two at a saddle, where diagonal foreground pixels stay apart, as scikit-image's
``find_contours(mask, 0.5)`` does by default), directed with the foreground on its right; the segments
are then linked into closed loops by pointer jumping (:func:`_cycles`), with no per-point Python loop.
An outer boundary and a hole come out with opposite orientation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["boundaries"]


def boundaries(plane: np.ndarray) -> list[np.ndarray]:
    """Every closed boundary of the boolean *plane* as ``(N, 2)`` (row, column) points at pixel-edge midpoints,
    the first point not repeated; foreground on the right of the direction of travel (rows down, columns
    right), so outer boundaries run clockwise as seen on screen and holes anticlockwise."""
    padded = np.pad(plane.astype(bool), 1)  # every loop closes inside the padded grid
    starts, ends = _segments(padded)
    if not len(starts):
        return []
    loops = []
    for members in _cycles(_links(starts, ends)):
        loops.append(starts[members] / 2.0 - 1.0)  # doubled coordinates -> pixels; undo the padding
    return loops


#: The corners of a cell in doubled coordinates (row, column) relative to its top-left pixel: a b / d c.
_A, _B, _C, _D = (0, 0), (0, 2), (2, 2), (2, 0)
#: The midpoint of each side of a cell, doubled: top, right, bottom, left.
_T, _R, _BOTTOM, _L = (0, 1), (1, 2), (2, 1), (1, 0)


def _segments(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The directed segments of all cells: start and end points, doubled coordinates, ``(N, 2)`` int each."""
    a, b, c, d = padded[:-1, :-1], padded[:-1, 1:], padded[1:, 1:], padded[1:, :-1]
    mixed = np.nonzero((a | b | c | d) & ~(a & b & c & d))
    a, b, c, d = a[mixed], b[mixed], c[mixed], d[mixed]
    cells = 2 * np.column_stack(mixed)
    top, right, bottom, left = a != b, b != c, c != d, d != a
    saddle = top & right & bottom & left
    # one foreground corner on the foreground side of each cell's segment (any will do outside saddles)
    corner = np.where(a[:, None], _A, np.where(b[:, None], _B, np.where(c[:, None], _C, _D)))
    pieces = []
    for first, second, first_side, second_side in ((top, right, _T, _R), (top, bottom, _T, _BOTTOM),
                                                   (top, left, _T, _L), (right, bottom, _R, _BOTTOM),
                                                   (right, left, _R, _L), (bottom, left, _BOTTOM, _L)):
        chosen = first & second & ~saddle
        pieces.append((cells[chosen], first_side, second_side, corner[chosen]))
    # saddles: each foreground corner cut off on its own (a and c, or b and d)
    ac, bd = saddle & a, saddle & b
    pieces += [(cells[ac], _L, _T, np.broadcast_to(_A, (int(ac.sum()), 2))),
               (cells[ac], _R, _BOTTOM, np.broadcast_to(_C, (int(ac.sum()), 2))),
               (cells[bd], _T, _R, np.broadcast_to(_B, (int(bd.sum()), 2))),
               (cells[bd], _BOTTOM, _L, np.broadcast_to(_D, (int(bd.sum()), 2)))]
    origin = np.concatenate([p[0] for p in pieces])
    starts = origin + np.concatenate([np.broadcast_to(p[1], p[0].shape) for p in pieces])
    ends = origin + np.concatenate([np.broadcast_to(p[2], p[0].shape) for p in pieces])
    inside = origin + np.concatenate([p[3] for p in pieces])
    direction, towards = ends - starts, inside - starts
    # foreground on the right with rows down and columns right: (row, column) cross product below zero
    swap = direction[:, 0] * towards[:, 1] - direction[:, 1] * towards[:, 0] > 0
    starts[swap], ends[swap] = ends[swap], starts[swap].copy()
    return starts, ends


def _links(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each segment, the segment that starts where it ends (each point starts one and ends one)."""
    width = int(max(starts[:, 1].max(), ends[:, 1].max())) + 1
    start_keys, end_keys = starts[:, 0] * width + starts[:, 1], ends[:, 0] * width + ends[:, 1]
    order = np.argsort(start_keys, kind="stable")
    following: np.ndarray = order[np.searchsorted(start_keys[order], end_keys)]
    return following


def _cycles(following: np.ndarray) -> list[np.ndarray]:
    """The loops of the permutation *following*, each as its members in order of travel from its lowest index.

    Pointer jumping: after k rounds every member knows the lowest index within 2**k steps ahead (its loop's
    name), and its distance to the loop's last member before that lowest one (its place in the loop).
    """
    count = len(following)
    head = np.arange(count)
    jump = following.copy()
    for _ in range(max(1, int(count).bit_length())):
        head = np.minimum(head, head[jump])
        jump = jump[jump]
    # break each loop before its head, then rank every member by its distance to the break
    successor = np.where(following == head, np.arange(count), following)
    remaining = (successor != np.arange(count)).astype(np.int64)
    jump = successor.copy()
    for _ in range(max(1, int(count).bit_length())):
        remaining = remaining + remaining[jump]
        jump = jump[jump]
    order = np.lexsort((-remaining, head))
    bounds = np.flatnonzero(np.diff(head[order])) + 1
    return np.split(order, bounds)
