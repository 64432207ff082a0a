"""Site templates: files read and checked against the route's models (every problem a start-up error), structures
selected, renamed, ordered and derived (unions), and what a real node writes with one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from gateway.errors import ConfigError
from gateway.inference.manifest import Label, load_model_package
from gateway.rt.plausibility import Outcome, check_structures
from gateway.rt.templates import apply_template, load_template, template_problems
from tests.conftest import REPO, NodeProcess, write_config
from tests.pipeline.test_e2e import send
from tests.synthetic import couch_phantom, write_volume_series

DEFAULT = load_model_package(REPO / "models" / "default").manifest
TEMPLATE = """
description = "Thorax, lungs together"

[[structures]]
name = "Lungs"
labels = ["Lung_L", "Lung_R"]
colour = [0, 128, 255]
volume_ml = [100, 9000]

[[structures]]
name = "BODY"
labels = ["External"]
interpreted_type = "EXTERNAL"

[[structures]]
name = "Lung_L"
labels = ["Lung_L"]
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(text)
    return folder


def test_a_template_selects_renames_orders_and_derives(tmp_path: Path) -> None:
    template = load_template(_write(tmp_path, "thorax", TEMPLATE), "thorax")
    assert template_problems("thorax", template, DEFAULT) == []
    volume, truth = couch_phantom(shape=(30, 96, 96), spacing=(4.0, 4.0, 4.0))
    templated = apply_template(template, DEFAULT, truth)
    assert [label.name for label in templated.manifest.labels] == ["Lungs", "BODY", "Lung_L"]
    assert [label.value for label in templated.manifest.labels] == [1, 2, 3]
    np.testing.assert_array_equal(templated.masks["Lungs"], truth["Lung_L"] | truth["Lung_R"])
    assert templated.masks["BODY"] is not truth["External"]  # a copy: the template never changes the model's masks
    np.testing.assert_array_equal(templated.masks["BODY"], truth["External"])
    lungs, body, left = templated.manifest.labels
    assert (lungs.colour, lungs.volume_ml, lungs.side, lungs.contiguous) == ([0, 128, 255], (100, 9000), None, False)
    assert (body.interpreted_type, body.volume_ml) == ("EXTERNAL", DEFAULT.labels[0].volume_ml)
    assert (left.side, left.volume_ml, left.exclusive_with) == ("left", DEFAULT.labels[1].volume_ml, [])
    assert templated.sources == {"BODY": "External", "Lung_L": "Lung_L"}
    # Contour QA runs on the template's structures: the union has no volume range of its own lungs' size.
    findings = check_structures(volume, templated.masks, templated.manifest)
    assert {(f.structure, f.check) for f in findings} >= {("Lungs", "volume"), ("BODY", "volume"),
                                                          ("Lung_L", "laterality")}
    assert all(f.outcome is not Outcome.FAIL for f in findings if f.check == "laterality")


def test_every_problem_of_a_template_is_listed(tmp_path: Path) -> None:
    bad = TEMPLATE.replace('labels = ["External"]', 'labels = ["External", "Heart"]').replace(
        'name = "Lung_L"\nlabels', 'name = "Lungs"\nlabels') + '\n[[structures]]\nname = "Liv"\nlabels = ["Liver"]\n'
    template = load_template(_write(tmp_path, "bad", bad), "bad")
    assert template_problems("bad", template, DEFAULT) == [
        "template 'bad': structure 'BODY' names 'Heart', not a label of the model",
        "template 'bad': structure 'Liv' names 'Liver', not a label of the model",
        "template 'bad': structure name 'Lungs' is used more than once"]
    _write(tmp_path, "long", '[[structures]]\nname = "A_name_far_too_long"\nlabels = ["External"]\n')
    with pytest.raises(ConfigError) as long:
        load_template(tmp_path, "long")
    assert long.value.problems[0].startswith("template 'long': structures.0.name:")
    with pytest.raises(ConfigError, match="cannot read"):
        load_template(tmp_path, "absent")
    _write(tmp_path, "broken", "[[structures]\n")
    with pytest.raises(ConfigError, match="not TOML"):
        load_template(tmp_path, "broken")


def _config(tmp_path: Path, template: str, templates_dir: Path) -> Path:
    route = {"name": "thorax", "match": {"Modality": "CT"}, "model": "default", "destinations": ["folder"],
             "template": template}
    path = write_config(tmp_path / "gateway.toml", tmp_path / "var", destinations=[{"name": "folder",
                                                                                    "type": "folder"}],
                        routes=[route])
    text = path.read_text().replace("[inference]\n", f'[inference]\ntemplates_dir = "{templates_dir}"\n', 1)
    path.write_text(text)
    return path


def test_a_template_naming_what_the_model_lacks_stops_the_node_at_start_up(tmp_path: Path) -> None:
    templates = _write(tmp_path / "templates", "thorax", TEMPLATE.replace('"Lung_R"]', '"Lung_Right"]'))
    config = _config(tmp_path, "thorax", templates)
    refused = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)], cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "routes[0].template 'thorax': structure 'Lungs' names 'Lung_Right', not a label of the model" in \
        refused.stderr
    missing = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config",
                              str(_config(tmp_path, "pelvis", templates))], cwd=REPO, capture_output=True, text=True,
                             timeout=120, check=False)
    assert missing.returncode == 2 and "routes[0].template 'pelvis': cannot read" in missing.stderr


@pytest.mark.timeout(180)
def test_the_node_writes_the_template_s_structures(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    templates = _write(tmp_path / "templates", "thorax", TEMPLATE)
    config = _config(tmp_path, "thorax", templates)
    node = node_factory(config_path=config, data_dir=tmp_path / "var")
    volume, _ = couch_phantom(shape=(30, 160, 160), spacing=(4.0, 2.6, 2.6))
    ct = write_volume_series(tmp_path / "ct", volume)
    send(node, ct.files)
    assert node.wait_for("job_done", timeout=120)["state"] == "sent"
    [exported] = (node.data_dir / "export" / "folder").glob("*.dcm")
    rtstruct = pydicom.dcmread(exported)
    assert [str(roi.ROIName) for roi in rtstruct.StructureSetROISequence] == ["Lungs", "BODY", "Lung_L"]
    colours = {item.ReferencedROINumber: list(item.ROIDisplayColor) for item in rtstruct.ROIContourSequence}
    assert colours[1] == [0, 128, 255]
    types = [str(item.RTROIInterpretedType) for item in rtstruct.RTROIObservationsSequence]
    assert types == ["ORGAN", "EXTERNAL", "ORGAN"]
    contours = {item.ReferencedROINumber: len(item.ContourSequence) for item in rtstruct.ROIContourSequence}
    assert contours[1] >= contours[3] > 0  # both lungs on at least as many slices as the left one


SHIPPED = {"thorax": ["total"], "abdomen": ["total"], "pelvis": ["total"],
           "head_and_neck": ["total", "head_glands_cavities", "headneck_bones_vessels"]}


@pytest.mark.parametrize(("name", "tasks"), SHIPPED.items())
def test_the_shipped_templates_fit_the_totalsegmentator_tasks_they_name(name: str, tasks: list[str]) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import totalseg_names

    entries = [entry for task in tasks for entry in totalseg_names.names_for(task).values()]
    labels = [Label.model_validate({"value": value, "name": entry.tg263, "colour": list(entry.colour)})
              for value, entry in enumerate(entries, start=1)]
    manifest = DEFAULT.model_copy(update={"labels": labels})
    template = load_template(REPO / "config" / "templates", name)
    assert template_problems(name, template, manifest) == []
    text = (REPO / "config" / "templates" / f"{name}.toml").read_text()
    assert f'template = "{name}"' in text  # the file says how a route uses it
    derived = [s.name for s in template.structures if len(s.labels) > 1]
    assert derived  # each shows a derived structure
