"""scripts/totalsegmentator_names.toml: TotalSegmentator's classes as TG-263 names (scripts/totalseg_names.py)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from gateway.inference.manifest import Label
from tests.conftest import load_script

#: The tasks a radiotherapy site runs, all in TotalSegmentator 2.18.0's class_map.
RT_TASKS = ("total", "body", "lung_vessels", "heartchambers_highres", "head_glands_cavities",
            "headneck_bones_vessels", "head_muscles", "headneck_muscles")


@pytest.fixture(scope="module")
def names() -> ModuleType:
    return load_script("totalseg_names")


def _table(tmp_path: Path, classes: str, tasks: str) -> Path:
    path = tmp_path / "names.toml"
    path.write_text(f"[classes]\n{classes}\n{tasks}\n")
    return path


ONE_TASK = '[tasks.t]\ntask_ids = [1]\npart_names = ["t"]\nparts = [[{}]]\n'


def _problems(names: ModuleType, tmp_path: Path, classes: dict[str, str]) -> list[str]:
    entries = "\n".join(f"{name} = {{ {fields} }}" for name, fields in classes.items())
    task = ONE_TASK.format(", ".join(f'"{name}"' for name in classes))
    return names.check_table(_table(tmp_path, entries, task), installed=False)


class TestTable:
    def test_has_no_problems(self, names: ModuleType) -> None:
        """The committed table keeps every rule (without TotalSegmentator installed too)."""
        assert names.check_table(installed=False) == []

    def test_covers_the_radiotherapy_tasks(self, names: ModuleType) -> None:
        assert set(RT_TASKS) <= set(names.covered_tasks())
        assert len(names.names_for("total", source="snapshot")) == 117

    def test_keeps_sides_apart(self, names: ModuleType) -> None:
        """The 16-character cut lost these sides or merged them; the table keeps them."""
        total = names.names_for("total", source="snapshot")
        assert total["adrenal_gland_right"].tg263 == "Glnd_Adrenal_R"
        assert total["adrenal_gland_left"].tg263 == "Glnd_Adrenal_L"
        assert total["lung_middle_lobe_right"].tg263 == "Lung_RML"
        assert total["lung_upper_lobe_left"].side == "left"
        assert total["common_carotid_artery_left"].tg263 == "A_Carotid_L"
        assert total["vertebrae_T1"].tg263 == "VB_T01"  # TG-263 pads the thoracic levels
        assert total["rib_right_12"].tg263 == "Rib12_R"

    def test_every_entry_is_a_valid_manifest_label(self, names: ModuleType) -> None:
        """The gateway's own Label model accepts every name, colour, type and side."""
        for task in names.covered_tasks():
            for value, entry in enumerate(names.names_for(task, source="snapshot").values(), start=1):
                Label(value=value, name=entry.tg263, colour=list(entry.colour),
                      interpreted_type=entry.interpreted_type, side=entry.side)

    def test_total_is_its_five_parts_in_order(self, names: ModuleType) -> None:
        parts = names.parts_for("total", source="snapshot")
        assert [(p.task_id, len(p.labels)) for p in parts] == [(291, 24), (292, 26), (293, 18), (294, 23), (295, 26)]
        assert parts[0].name == "class_map_part_organs" and parts[0].labels[1] == "spleen"
        combined = names.labels_for("total", source="snapshot")
        assert list(combined.values()) == [name for part in parts for name in part.labels.values()]
        assert combined[8] == "adrenal_gland_right" and combined[117] == "costal_cartilages"


class TestInstalled:
    def test_snapshot_matches_installed_totalsegmentator(self, names: ModuleType) -> None:
        pytest.importorskip("totalsegmentator.map_to_binary")
        assert names.check_table(installed=True) == []
        for task in names.covered_tasks():
            assert names.parts_for(task, source="installed") == names.parts_for(task, source="snapshot")
            assert names.labels_for(task, source="installed") == names.labels_for(task, source="snapshot")

    def test_absent_package(self, names: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without TotalSegmentator: "auto" reads the pinned maps, "installed" says what is missing."""
        monkeypatch.setattr(names, "_installed", lambda: None)
        assert names.parts_for("headneck_muscles")[1].task_id == 779
        with pytest.raises(names.TableError, match="totalsegmentator is not installed"):
            names.parts_for("total", source="installed")
        assert names.check_table(installed=True) == [
            "totalsegmentator is not installed: the pinned class maps were not compared"]

    def test_unknown_task(self, names: ModuleType) -> None:
        with pytest.raises(names.TableError, match="covers no task 'liver_vessels'"):
            names.names_for("liver_vessels", source="snapshot")


class TestRules:
    def test_sides(self, names: ModuleType) -> None:
        assert names.name_side("Lung_LUL") == "left" and names.name_side("Lung_RML") == "right"
        assert names.name_side("Kidney_R") == "right" and names.name_side("Musc_Constrict_S") is None
        assert names.class_side("rib_left_3") == "left" and names.class_side("heart") is None

    @pytest.mark.parametrize(("classes", "problem"), [
        ({"adrenal_gland_right": 'tg263 = "Glnd_Adrenal_Right", colour = [1, 2, 3]'},
         "adrenal_gland_right: 'Glnd_Adrenal_Right' has 18 characters, TG-263 allows 1-16"),
        ({"heart": 'tg263 = "Heart muscle", colour = [1, 2, 3]'},
         "heart: 'Heart muscle' has characters other than A-Z a-z 0-9 _ ^ -"),
        ({"kidney_left": 'tg263 = "Kidney_R", colour = [1, 2, 3]'},
         "kidney_left: 'Kidney_R' should end in _L (the class is left)"),
        ({"lung_middle_lobe_right": 'tg263 = "Lung_Middle", colour = [1, 2, 3]'},
         "lung_middle_lobe_right: 'Lung_Middle' should end in _R (the class is right)"),
        ({"heart": 'tg263 = "Heart_L", colour = [1, 2, 3]'},
         "heart: 'Heart_L' should not end in _L or _R (the class is not sided)"),
        ({"lung_upper_lobe_left": 'tg263 = "Lung_RUL", colour = [1, 2, 3]'},
         "lung_upper_lobe_left: 'Lung_RUL' should end in _L (the class is left)"),
        ({"liver": 'tg263 = "Liver", colour = [1, 2, 256]'},
         "liver: colour must be three integers 0-255, not [1, 2, 256]"),
        ({"liver": 'tg263 = "Liver", colour = [1, 2, 3], interpreted_type = "OAR"'},
         "liver: interpreted_type 'OAR' is not an RT ROI Interpreted Type (PS3.3 C.8.8.8)"),
        ({"liver": 'tg263 = "Liver", colour = [1, 2, 3], colour_name = "brown"'},
         "liver: unknown keys ['colour_name']"),
    ])
    def test_each_rule(self, names: ModuleType, tmp_path: Path, classes: dict[str, str], problem: str) -> None:
        problems = _problems(names, tmp_path, classes)
        assert any(p.startswith(problem) for p in problems), problems

    def test_collisions_in_a_task(self, names: ModuleType, tmp_path: Path) -> None:
        problems = _problems(names, tmp_path, {"liver": 'tg263 = "Liver", colour = [1, 2, 3]',
                                               "liver_copy": 'tg263 = "Liver", colour = [1, 2, 3]'})
        assert "liver_copy and liver both map to 'Liver'" in problems
        assert "[tasks.t]: liver and liver_copy share the tg263 'Liver'" in problems
        assert "[tasks.t]: liver and liver_copy share the colour (1, 2, 3)" in problems

    def test_missing_and_unused_entries(self, names: ModuleType, tmp_path: Path) -> None:
        path = _table(tmp_path, 'liver = { tg263 = "Liver", colour = [1, 2, 3] }\n'
                                'spleen = { tg263 = "Spleen", colour = [4, 5, 6] }',
                      ONE_TASK.format('"liver", "stomach"'))
        assert names.check_table(path, installed=False) == ["[tasks.t]: no entry for stomach",
                                                            "entries for classes of no covered task: spleen"]
        with pytest.raises(names.TableError, match="no entry for 't' class"):
            names.names_for("t", source="snapshot", path=path)
