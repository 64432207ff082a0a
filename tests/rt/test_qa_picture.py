"""The QA picture is drawn in the radiological convention for every way a volume's axes run: a marker on the
patient's left appears on the viewer's right, the head at the top; judged from the PNG's pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gateway.inference.volume import Volume
from gateway.rt.qa_picture import qa_picture
from tests.synthetic import stored_along

SHAPE = (20, 30, 40)  # slices (feet -> head), rows (anterior -> posterior), columns (right -> left): 1 mm voxels
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _hfs() -> tuple[Volume, dict[str, np.ndarray]]:
    """A head-first supine axial stack, LPS affine; a body box with a marker on the patient's left, near the head,
    towards the front."""
    affine = np.array([[0.0, 0, 1, -20], [0, 1, 0, -15], [1, 0, 0, -10], [0, 0, 0, 1]])  # (k, i, j) -> (x, y, z)
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[2:18, 5:25, 5:35] = 0
    body = hu > -500
    marker = np.zeros(SHAPE, dtype=bool)
    marker[9:18, 6:15, 19:35] = True  # left (high columns), superior (high slices), anterior (low rows)
    volume = Volume(hu, affine, tuple(str(n) for n in range(SHAPE[0])), "1.2.3", "HFS")
    return volume, {"Body": body, "Marker": marker}


def _pixels(volume: Volume, masks: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(qa_picture(volume, masks, {"Body": BLUE, "Marker": RED}))))


def _red(panel: np.ndarray) -> tuple[float, float]:
    rows, columns = np.nonzero(np.all(panel == RED, axis=2))
    return float(rows.mean()) / panel.shape[0], float(columns.mean()) / panel.shape[1]


def test_the_marker_on_the_left_is_on_the_viewers_right_and_the_head_is_up() -> None:
    picture = _pixels(*_hfs())
    axial, coronal, sagittal = picture[:, :40], picture[:, 40:80], picture[:, 80:110]
    row, column = _red(axial)
    assert column > 0.6 and row < 0.5  # the patient's left on the viewer's right, anterior up
    row, column = _red(coronal[5:25])  # 20 rows, centred in the 30-row sheet
    assert column > 0.6 and row < 0.4  # head up
    row, column = _red(sagittal[5:25])
    assert column < 0.5 and row < 0.4  # anterior on the left, head up


@pytest.mark.parametrize("flips", [(0,), (1, 2), (0, 1, 2), (2,)], ids=["FFS", "HFP", "FFP", "mirrored"])
def test_every_patient_position_gives_the_same_picture(flips: tuple[int, ...]) -> None:
    volume, masks = _hfs()
    assert np.array_equal(_pixels(*stored_along(volume, masks, flips)), _pixels(volume, masks))
