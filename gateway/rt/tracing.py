"""Boundaries of a binary plane: marching squares at 0.5, vectorised, for masks only.

On a binary mask every boundary vertex is the midpoint between two edge-adjacent pixels that differ,
so the whole trace is integer arithmetic on doubled coordinates. Each cell with mixed corners gives
one segment (two at a saddle, where diagonal foreground pixels stay apart, as scikit-image's
``find_contours(mask, 0.5)`` does by default), directed with the foreground on its right, looked up
in a table of the 16 corner patterns (:data:`_CASES`); the segments are then linked into closed loops,
by pointer jumping (:func:`_jump`, no per-point Python loop) unless there are only a few of them.
An outer boundary and a hole come out with opposite orientation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["boundaries"]

#: Below this many segments the loops are followed one segment at a time (fewer numpy calls than jumping).
_WALK_LIMIT = 256


def boundaries(plane: np.ndarray) -> list[np.ndarray]:
    """Every closed boundary of the boolean *plane* as ``(N, 2)`` (row, column) points at pixel-edge midpoints,
    the first point not repeated; foreground on the right of the direction of travel (rows down, columns
    right), so outer boundaries run clockwise as seen on screen and holes anticlockwise."""
    padded = np.zeros((plane.shape[0] + 2, plane.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = plane  # every loop closes inside the padded grid
    starts, ends = _segments(padded)
    if not len(starts):
        return []
    following = _links(starts, ends)
    cycles = _walk(following) if len(following) < _WALK_LIMIT else _jump(following)
    points = starts / 2.0 - 1.0  # doubled coordinates -> pixels; undo the padding
    return [points[members] for members in cycles]


#: The corners of a cell in doubled coordinates (row, column) relative to its top-left pixel: a b / d c.
_CORNERS = ((0, 0), (0, 2), (2, 2), (2, 0))
#: The midpoint of each side of a cell, doubled: top (a-b), right (b-c), bottom (c-d), left (d-a).
_SIDES = ((0, 1), (1, 2), (2, 1), (1, 0))
#: Each corner's bit in a cell's pattern: the top row's pair above the bottom row's, left above right.
_BITS = (8, 4, 1, 2)
#: The patterns with foreground on one diagonal only: a and c, b and d.
_SADDLES = (8 | 1, 4 | 2)


def _oriented(first: int, second: int, corner: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The segment between two sides' midpoints, directed with *corner* (foreground) on its right."""
    start, end, inside = np.array(_SIDES[first]), np.array(_SIDES[second]), np.array(_CORNERS[corner])
    direction, towards = end - start, inside - start
    if direction[0] * towards[1] - direction[1] * towards[0] > 0:  # (row, column) cross product: on the left
        start, end = end, start
    return (int(start[0]), int(start[1])), (int(end[0]), int(end[1]))


def _cases() -> np.ndarray:
    """``(16, 2, 2, 2)``: per corner pattern (:data:`_BITS`) up to two segments' start and end.

    A pattern with one segment repeats it; a saddle (a and c, or b and d) cuts each foreground corner off
    on its own. All-background and all-foreground patterns have none and are never looked up.
    """
    table = np.zeros((16, 2, 2, 2), dtype=np.int64)
    for code in range(1, 15):
        on = [bool(code & bit) for bit in _BITS]
        if code in _SADDLES:  # corner k lies between sides k-1 and k
            cut = [corner for corner in range(4) if on[corner]]
            segments = [_oriented((corner - 1) % 4, corner, corner) for corner in cut]
        else:
            sides = [side for side in range(4) if on[side] != on[(side + 1) % 4]]
            segments = [_oriented(sides[0], sides[1], on.index(True))] * 2
        table[code] = segments
    return table


_CASES = _cases()


def _segments(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The directed segments of all cells (raster order, a saddle's second segments last): start and end
    points, doubled coordinates, ``(N, 2)`` int each."""
    pairs = padded[:, :-1] << 1 | padded[:, 1:]  # each row's horizontal neighbours: left 2, right 1
    code = pairs[:-1] << 2 | pairs[1:]
    rows, cols = np.nonzero(code - 1 < 14)  # neither 0 (all background) nor 15 (all foreground; uint8 wraps)
    codes = code[rows, cols]
    second = np.flatnonzero((codes == _SADDLES[0]) | (codes == _SADDLES[1]))
    rows, cols = np.concatenate([rows, rows[second]]), np.concatenate([cols, cols[second]])
    which = np.zeros(len(rows), dtype=np.intp)
    which[len(codes):] = 1
    case = _CASES[np.concatenate([codes, codes[second]]), which]
    origin = 2 * np.column_stack((rows, cols))
    return origin + case[:, 0], origin + case[:, 1]


def _links(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each segment, the segment that starts where it ends (each point starts one and ends one)."""
    width = int(max(starts[:, 1].max(), ends[:, 1].max())) + 1
    start_keys, end_keys = starts[:, 0] * width + starts[:, 1], ends[:, 0] * width + ends[:, 1]
    order = np.argsort(start_keys, kind="stable")
    following: np.ndarray = order[np.searchsorted(start_keys[order], end_keys)]
    return following


def _walk(following: np.ndarray) -> list[np.ndarray]:
    """The loops of the permutation *following*, each from its lowest index in order of travel, by lowest index."""
    after = following.tolist()
    seen = [False] * len(after)
    cycles = []
    for head in range(len(after)):
        if seen[head]:
            continue
        members, at = [], head
        while not seen[at]:
            seen[at] = True
            members.append(at)
            at = after[at]
        cycles.append(np.array(members))
    return cycles


def _jump(following: np.ndarray) -> list[np.ndarray]:
    """What :func:`_walk` returns, by pointer jumping: after k rounds every member knows the lowest index within
    2**k steps ahead (its loop's name), and its distance to the loop's last member before that lowest one (its
    place in the loop)."""
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
