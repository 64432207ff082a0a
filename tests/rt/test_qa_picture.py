"""The QA picture is drawn in the radiological convention for every way a volume's axes run: a marker on the
patient's left appears on the viewer's right, the head at the top; a flagged structure gets its own panel, centred on
it, captioned only with names and codes; judged from the PNG's pixels."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from gateway.inference.labels import MaskView
from gateway.inference.volume import Volume
from gateway.routes import Route, StructureTemplate
from gateway.rt.plausibility import Finding, Outcome
from gateway.rt.qa_picture import flag_caption, qa_picture
from gateway.rt.results import structure_set_picture
from tests.synthetic import stored_along

SHAPE = (20, 30, 40)  # slices (feet -> head), rows (anterior -> posterior), columns (right -> left): 1 mm voxels
RED, BLUE = (255, 0, 0), (0, 0, 255)
OVERVIEW = (30, 110)  # axial 30 x 40, coronal 20 x 40 (centred), sagittal 30 x 30
SWAPPED = Finding("Marker", "laterality", Outcome.FAIL, -72.0, "laterality_swapped")
CUT = Finding("Marker", "truncation", Outcome.WARN, 1, "touches_scan_edge")


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


def _pixels(volume: Volume, masks: dict[str, np.ndarray], flags: tuple[Finding, ...] = ()) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(qa_picture(volume, masks, {"Body": BLUE, "Marker": RED}, flags))))


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


def _drawn(strip: np.ndarray) -> np.ndarray:
    """The columns of *strip* that are not black background."""
    columns = np.flatnonzero(strip.any(axis=(0, 2)))
    return strip[:, columns[0]:columns[-1] + 1]


@pytest.mark.parametrize("flags", [(), (SWAPPED,), (CUT,)], ids=["unflagged", "axial flag", "coronal flag"])
@pytest.mark.parametrize("flips", [(0,), (1, 2), (0, 1, 2), (2,)], ids=["FFS", "HFP", "FFP", "mirrored"])
def test_every_patient_position_gives_the_same_picture(flips: tuple[int, ...], flags: tuple[Finding, ...]) -> None:
    volume, masks = _hfs()
    assert np.array_equal(_pixels(*stored_along(volume, masks, flips), flags), _pixels(volume, masks, flags))


def test_without_flags_the_picture_is_the_three_overview_panels() -> None:
    """Passed findings, and flags of structures not drawn, change nothing."""
    volume, masks = _hfs()
    unflagged = _pixels(volume, masks)
    assert unflagged.shape[:2] == OVERVIEW
    passed = (Finding("Marker", "volume", Outcome.PASS, 1.3), Finding("Absent", "volume", Outcome.FAIL, 0, "x"))
    assert np.array_equal(_pixels(volume, masks, passed), unflagged)


def test_a_flagged_structure_adds_a_captioned_panel_below_the_overview() -> None:
    volume, masks = _hfs()
    picture = _pixels(volume, masks, (SWAPPED,))
    rows, _ = OVERVIEW
    assert picture.shape[0] > rows + 30 and picture.shape[1] >= OVERVIEW[1]  # an axial panel (30 rows) + caption
    assert np.array_equal(picture[:rows, :OVERVIEW[1]], _pixels(volume, masks))  # the overview is unchanged
    caption = picture[rows + 30:]
    text = caption.any(axis=2)  # anything but the black background
    assert text.sum() > 50 and caption.max() > 200  # light text
    assert np.flatnonzero(text.any(axis=1)).size >= 5  # a line of text, several pixels high


def test_the_flagged_panel_is_centred_on_its_structure_with_its_outline_thickened() -> None:
    """The marker sits off-centre in the overview (patient's left, anterior) but in the middle of its panel."""
    volume, masks = _hfs()
    picture = _pixels(volume, masks, (SWAPPED,))
    width = picture.shape[1]
    panel = picture[30:60, (width - 40) // 2:(width - 40) // 2 + 40]  # axial: 30 x 40, centred in its cell
    row, column = _red(panel)
    assert abs(row - 0.5) < 0.1 and abs(column - 0.5) < 0.1
    red_rows = np.flatnonzero(np.all(panel == RED, axis=2)[:, 20])  # a vertical line through the middle
    assert red_rows[1] - red_rows[0] == 1  # the top edge is more than one pixel thick


def test_a_head_feet_flag_is_shown_on_a_coronal_panel_and_several_flags_share_one_panel() -> None:
    volume, masks = _hfs()
    one = _pixels(volume, masks, (CUT,))
    both = _pixels(volume, masks, (SWAPPED, CUT))
    assert _pixels(volume, masks, (SWAPPED,)).shape[0] - one.shape[0] == 30 - 20  # coronal: 20 rows, axial 30
    assert np.array_equal(_drawn(both[30:50]), _drawn(one[30:50]))  # the same panel: truncation decides the plane
    lines = both.shape[0] - one.shape[0]
    assert 5 < lines < 30  # one more caption line, not another panel


def test_the_caption_is_built_from_the_name_and_codes_only() -> None:
    assert flag_caption(SWAPPED) == "Marker  fail  laterality  laterality_swapped  -72"
    assert flag_caption(Finding("Lung_L", "overlap:Heart", Outcome.FAIL, 0.25, "overlaps_exclusive_structure")) == (
        "Lung_L  fail  overlap:Heart  overlaps_exclusive_structure  0.25")
    assert flag_caption(Finding("Lunge_\u00e9", "volume", Outcome.WARN, 12.5)) == "Lunge_?  warn  volume  -  12.5"


def test_the_structure_set_picture_captions_flags_with_the_roi_names_of_the_route() -> None:
    volume, masks = _hfs()
    structure_set = Dataset()
    structure_set.StructureSetROISequence = [Dataset(), Dataset()]
    structure_set.ROIContourSequence = [Dataset(), Dataset()]
    for number, (name, colour) in enumerate([("BODY", BLUE), ("Marker", RED)], start=1):
        structure_set.StructureSetROISequence[number - 1].ROINumber = number
        structure_set.StructureSetROISequence[number - 1].ROIName = name
        structure_set.ROIContourSequence[number - 1].ReferencedROINumber = number
        structure_set.ROIContourSequence[number - 1].ROIDisplayColor = list(colour)
    route = Route(name="ct", model="default", destinations=["tps"], structures={"Body": StructureTemplate(name="BODY")})
    body_cut = Finding("Body", "truncation", Outcome.WARN, 2, "touches_scan_edge")
    pictured = structure_set_picture(volume, masks, structure_set, route, [body_cut])
    renamed = Finding("BODY", "truncation", Outcome.WARN, 2, "touches_scan_edge")
    assert pictured == qa_picture(volume, {"BODY": masks["Body"], "Marker": masks["Marker"]},
                                  {"BODY": BLUE, "Marker": RED}, [renamed])
    assert structure_set_picture(volume, masks, structure_set, route) != pictured


def test_masks_made_when_read_are_each_read_twice_and_the_picture_is_the_same() -> None:
    """A structure set of a hundred organs passes its masks as a view that makes each one when read: the picture
    reads each twice (centre, then planes), one at a time, and draws exactly what the masks in memory give."""
    volume, masks = _hfs()
    reads: list[str] = []

    def make(name: str) -> np.ndarray:
        reads.append(name)
        return masks[name].copy()

    view = MaskView({name: functools.partial(make, name) for name in masks})
    colours = {"Body": BLUE, "Marker": RED}
    assert qa_picture(volume, view, colours, (SWAPPED,)) == qa_picture(volume, masks, colours, (SWAPPED,))
    assert sorted(reads) == ["Body", "Body", "Marker", "Marker"]
