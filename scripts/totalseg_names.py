"""TotalSegmentator's class names as TG-263 structure names: the table's loader and its checks.

The table is ``scripts/totalsegmentator_names.toml`` (its header states the naming rules and where the names and
colours come from). ``scripts/import_totalsegmentator.py`` imports this module (``sys.path`` holds ``scripts/`` when a
script there runs) and calls:

* ``parts_for(task)``: the task's nnU-Net model(s), one ``Part`` each (dataset id, part name, label -> class name),
  in the order TotalSegmentator runs and overlays them;
* ``labels_for(task)``: the combined label map's label -> class name (``class_map[task]``);
* ``names_for(task)``: class name -> ``NameEntry`` (TG-263 name, colour, interpreted type), in combined label order;
* ``check_table()``: every problem with the table, as sentences (empty: none).

Where the class maps come from (``source``): ``"installed"`` reads the installed ``totalsegmentator`` package
(imported lazily, only ``map_to_binary`` and ``map_tasks_config``, which import nothing heavy); ``"snapshot"`` reads
the copy pinned in the table's ``[tasks]`` (TotalSegmentator 2.18.0); ``"auto"`` (the default) uses the installed
package when it imports and the snapshot when it does not. With ``"installed"`` and no package, ``TableError`` says so.
``check_table`` compares the snapshot with the installed package whenever the package imports.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from gateway.inference.manifest import INTERPRETED_TYPES  # noqa: E402

__all__ = ["TABLE", "NameEntry", "Part", "TableError", "check_table", "covered_tasks", "labels_for", "names_for",
           "parts_for"]

TABLE = Path(__file__).with_name("totalsegmentator_names.toml")
MAX_NAME = 16  # TG-263 (and the gateway's Label.name)
NAME = re.compile(r"[A-Za-z0-9_^-]+")  # TG-263's characters
#: TG-263's lung lobes carry their side inside the name: Lung_LUL, Lung_LLL, Lung_RUL, Lung_RML, Lung_RLL.
LOBE = re.compile(r"Lung_([LR])[UML]L")
DEFAULT_TYPE = "ORGAN"
#: Tasks whose default model is several nnU-Net models: the ``map_to_binary`` names of their part maps and of the
#: dataset id -> part name map, as ``totalsegmentator/nnunet.py::nnUNet_predict_image`` picks them.
MULTI_PART = {
    "total": ("class_map_5_parts", "map_taskid_to_partname_ct"),
    "total_v3": ("class_map_5_parts_total_v3", "map_taskid_to_partname_ct_v3"),
    "total_mr": ("class_map_parts_mr", "map_taskid_to_partname_mr"),
    "headneck_muscles": ("class_map_parts_headneck_muscles", "map_taskid_to_partname_headneck_muscles"),
}
_ENTRY_KEYS = {"tg263", "colour", "interpreted_type", "built", "note"}
_TASK_KEYS = {"task_ids", "part_names", "parts"}
Source = Literal["auto", "installed", "snapshot"]
Side = Literal["left", "right"]


class TableError(ValueError):
    """The table cannot be read, lacks a task or class, or the installed TotalSegmentator cannot be read."""


@dataclass(frozen=True)
class NameEntry:
    """How one TotalSegmentator class appears in a structure set."""

    class_name: str  # TotalSegmentator's
    tg263: str  # the ROI Name, <= 16 characters
    colour: tuple[int, int, int]  # ROI Display Color, RGB 0-255
    interpreted_type: str = DEFAULT_TYPE  # RT ROI Interpreted Type (PS3.3 C.8.8.8)
    built: bool = False  # True: TG-263 lists no such name; built by its rules
    note: str | None = None

    @property
    def side(self) -> Side | None:
        """The side TotalSegmentator's class name states (``Label.side`` in a manifest)."""
        return class_side(self.class_name)


@dataclass(frozen=True)
class Part:
    """One nnU-Net model of a task: ``Dataset<task_id>_...`` in TotalSegmentator's weights folder."""

    task_id: int
    name: str  # the part's key in map_to_binary, or the task's name for a one-model task
    labels: Mapping[int, str]  # the model's label -> class name, 1..N


@dataclass(frozen=True)
class _Table:
    classes: dict[str, NameEntry]
    tasks: dict[str, tuple[Part, ...]]


# --- naming rules -------------------------------------------------------------------------------------------------


def class_side(class_name: str) -> Side | None:
    """``left`` or ``right`` where a TotalSegmentator class name has the word, else None."""
    words = set(class_name.lower().split("_"))
    if "left" in words and "right" not in words:
        return "left"
    if "right" in words and "left" not in words:
        return "right"
    return None


def name_side(tg263: str) -> Side | None:
    """The side a TG-263 name states: a final ``_L``/``_R``, or a lung lobe's letter (Lung_LUL, Lung_RML)."""
    lobe = LOBE.fullmatch(tg263)
    letter = lobe.group(1) if lobe else tg263[-1] if tg263[-2:] in ("_L", "_R") else None
    return {"L": "left", "R": "right", None: None}[letter]


def name_problems(class_name: str, tg263: str) -> list[str]:
    """What breaks TG-263's rules in one mapping (empty: nothing)."""
    problems = []
    if not 1 <= len(tg263) <= MAX_NAME:
        problems.append(f"{class_name}: {tg263!r} has {len(tg263)} characters, TG-263 allows 1-{MAX_NAME}")
    if not NAME.fullmatch(tg263):
        problems.append(f"{class_name}: {tg263!r} has characters other than A-Z a-z 0-9 _ ^ -")
    said, named = class_side(class_name), name_side(tg263)
    if said != named:
        want = {"left": "end in _L", "right": "end in _R", None: "not end in _L or _R"}[said]
        problems.append(f"{class_name}: {tg263!r} should {want} (the class is {said or 'not sided'})")
    return problems


# --- the table ----------------------------------------------------------------------------------------------------


def _parse(data: dict[str, Any]) -> tuple[_Table, list[str]]:
    problems: list[str] = []
    classes: dict[str, NameEntry] = {}
    raw_classes = data.get("classes")
    if not isinstance(raw_classes, dict):
        return _Table({}, {}), ["no [classes] table"]
    for name, raw in raw_classes.items():
        if not isinstance(raw, dict):
            problems.append(f"{name}: not a table")
            continue
        if unknown := set(raw) - _ENTRY_KEYS:
            problems.append(f"{name}: unknown keys {sorted(unknown)}")
        tg263, colour = raw.get("tg263"), raw.get("colour")
        itype, built, note = raw.get("interpreted_type", DEFAULT_TYPE), raw.get("built", False), raw.get("note")
        if not isinstance(tg263, str):
            problems.append(f"{name}: tg263 must be a string")
            continue
        if not (isinstance(colour, list) and len(colour) == 3
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)):
            problems.append(f"{name}: colour must be three integers 0-255, not {colour!r}")
            continue
        if itype not in INTERPRETED_TYPES:
            problems.append(f"{name}: interpreted_type {itype!r} is not an RT ROI Interpreted Type (PS3.3 C.8.8.8)")
        if not isinstance(built, bool) or not (note is None or isinstance(note, str)):
            problems.append(f"{name}: built must be true/false and note a string")
        classes[name] = NameEntry(name, tg263, (colour[0], colour[1], colour[2]), str(itype), bool(built),
                                  note if isinstance(note, str) else None)
    tasks: dict[str, tuple[Part, ...]] = {}
    for task, raw in (data.get("tasks") or {}).items():
        ids, names, parts = (raw.get(key) for key in ("task_ids", "part_names", "parts"))
        if (set(raw) != _TASK_KEYS or not isinstance(ids, list) or not isinstance(names, list)
                or not isinstance(parts, list) or not len(ids) == len(names) == len(parts) >= 1
                or not all(isinstance(p, list) and p and all(isinstance(c, str) for c in p) for p in parts)):
            problems.append(f"[tasks.{task}] needs task_ids, part_names and parts (lists of class names), one per part")
            continue
        tasks[task] = tuple(Part(int(i), str(n), dict(enumerate(p, start=1)))
                            for i, n, p in zip(ids, names, parts, strict=True))
    return _Table(classes, tasks), problems


@cache
def _load(path: Path) -> tuple[_Table, tuple[str, ...]]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TableError(f"{path}: {exc}") from exc
    table, problems = _parse(data)
    return table, tuple(problems)


def _table(path: Path = TABLE) -> _Table:
    table, problems = _load(path)
    if problems:
        raise TableError(f"{path}: " + "; ".join(problems))
    return table


def covered_tasks(path: Path = TABLE) -> tuple[str, ...]:
    """The TotalSegmentator tasks the table names every class of."""
    return tuple(_table(path).tasks)


# --- TotalSegmentator's class maps --------------------------------------------------------------------------------


def _installed() -> tuple[ModuleType, dict[Any, Any]] | None:
    """``totalsegmentator.map_to_binary`` and ``TASK_CONFIGS``, or None where the package does not import."""
    try:
        from totalsegmentator import map_to_binary
        from totalsegmentator.map_tasks_config import TASK_CONFIGS
    except ImportError:
        return None
    return map_to_binary, TASK_CONFIGS


def installed_version() -> str | None:
    """The installed TotalSegmentator's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("TotalSegmentator")
    except PackageNotFoundError:
        return None


def _installed_parts(task: str) -> tuple[Part, ...]:
    found = _installed()
    if found is None:
        raise TableError("totalsegmentator is not installed (pip install TotalSegmentator==2.18.0, the nnunet extra);"
                         " source='snapshot' reads the class maps pinned in the table")
    m, configs = found
    if task not in m.class_map or task not in configs:
        raise TableError(f"TotalSegmentator {installed_version()} has no task {task!r}")
    config = configs[task]
    ids = config["sub_modes"]["default"]["task_id"] if "sub_modes" in config else config["task_id"]
    ids = ids if isinstance(ids, list) else [ids]
    if task in MULTI_PART:
        part_maps, id_to_part = (getattr(m, name) for name in MULTI_PART[task])
        return tuple(Part(i, id_to_part[i], dict(part_maps[id_to_part[i]])) for i in ids)
    if len(ids) != 1:
        raise TableError(f"TotalSegmentator task {task!r} has models {ids} but no part maps this module knows")
    return (Part(ids[0], task, dict(m.class_map[task])),)


def _pick(source: Source) -> Literal["installed", "snapshot"]:
    if source not in ("auto", "installed", "snapshot"):
        raise ValueError(f"source must be 'auto', 'installed' or 'snapshot', not {source!r}")
    if source == "auto":
        return "installed" if _installed() is not None else "snapshot"
    return source


def parts_for(task: str, *, source: Source = "auto", path: Path = TABLE) -> list[Part]:
    """The task's default model as nnU-Net models, in the order TotalSegmentator runs them.

    TotalSegmentator writes each part's labels into the combined map (``labels_for``) by class name, a later part's
    foreground over an earlier one's. The fast/fastest "total" models are one model over ``labels_for(task)``.
    """
    if _pick(source) == "installed":
        return list(_installed_parts(task))
    tasks = _table(path).tasks
    if task not in tasks:
        raise TableError(f"the table covers no task {task!r}; it covers {', '.join(tasks)}")
    return list(tasks[task])


def labels_for(task: str, *, source: Source = "auto", path: Path = TABLE) -> dict[int, str]:
    """The combined label map: TotalSegmentator's ``class_map[task]``, label (1..N) -> class name."""
    if _pick(source) == "installed":
        found = _installed()
        assert found is not None  # _pick saw it
        if task not in found[0].class_map:
            raise TableError(f"TotalSegmentator {installed_version()} has no task {task!r}")
        return dict(found[0].class_map[task])
    names = [name for part in parts_for(task, source="snapshot", path=path) for name in part.labels.values()]
    return dict(enumerate(names, start=1))


def names_for(task: str, *, source: Source = "auto", path: Path = TABLE) -> dict[str, NameEntry]:
    """Each class of the task -> its ``NameEntry``, in combined label order; ``TableError`` if one has none."""
    classes = _table(path).classes
    labels = labels_for(task, source=source, path=path)
    missing = [name for name in labels.values() if name not in classes]
    if missing:
        raise TableError(f"{path.name} has no entry for {task!r} class(es) {', '.join(missing)}")
    return {name: classes[name] for name in labels.values()}


# --- checks -------------------------------------------------------------------------------------------------------


def check_table(path: Path = TABLE, *, installed: bool | None = None) -> list[str]:
    """Every problem with the table, one sentence each; empty when there is none.

    ``installed``: None compares the pinned class maps with the installed TotalSegmentator's when it imports; True
    requires it (its absence is a problem); False skips the comparison.
    """
    try:
        table, parse_problems = _load(path)
    except TableError as exc:
        return [str(exc)]
    problems = list(parse_problems)
    by_name: dict[str, str] = {}
    for entry in table.classes.values():
        problems += name_problems(entry.class_name, entry.tg263)
        if (other := by_name.setdefault(entry.tg263, entry.class_name)) != entry.class_name:
            problems.append(f"{entry.class_name} and {other} both map to {entry.tg263!r}")
    used: set[str] = set()
    for task, parts in table.tasks.items():
        names = [name for part in parts for name in part.labels.values()]
        used.update(names)
        if len(set(names)) != len(names):
            problems.append(f"[tasks.{task}] lists a class twice")
        if missing := [name for name in names if name not in table.classes]:
            problems.append(f"[tasks.{task}]: no entry for {', '.join(missing)}")
        entries = [table.classes[name] for name in dict.fromkeys(names) if name in table.classes]
        for attribute in ("tg263", "colour"):
            seen: dict[object, str] = {}
            for entry in entries:
                if (first := seen.setdefault(getattr(entry, attribute), entry.class_name)) != entry.class_name:
                    problems.append(f"[tasks.{task}]: {first} and {entry.class_name} share the {attribute} "
                                    f"{getattr(entry, attribute)!r}")
    if unused := sorted(set(table.classes) - used):
        problems.append(f"entries for classes of no covered task: {', '.join(unused)}")
    if installed is False:
        return problems
    if _installed() is None:
        return problems + (["totalsegmentator is not installed: the pinned class maps were not compared"]
                           if installed else [])
    version = installed_version()
    for task, pinned in table.tasks.items():
        try:
            actual = _installed_parts(task)
            combined = dict(_installed()[0].class_map[task])  # type: ignore[index]
        except (TableError, KeyError, AttributeError) as exc:
            problems.append(f"[tasks.{task}]: TotalSegmentator {version}: {exc}")
            continue
        if actual != pinned:
            problems.append(f"[tasks.{task}] differs from TotalSegmentator {version}'s class maps: "
                            + "; ".join(_describe(pinned, actual)))
        concatenated = [name for part in actual for name in part.labels.values()]
        if list(combined.values()) != concatenated or list(combined) != list(range(1, len(combined) + 1)):
            problems.append(f"TotalSegmentator {version}: class_map[{task!r}] is not its parts' classes in order")
    return problems


def _describe(pinned: tuple[Part, ...], actual: tuple[Part, ...]) -> list[str]:
    said = []
    if [(p.task_id, p.name) for p in pinned] != [(p.task_id, p.name) for p in actual]:
        said.append(f"parts {[(p.task_id, p.name) for p in actual]}, pinned {[(p.task_id, p.name) for p in pinned]}")
    for mine, theirs in zip(pinned, actual, strict=False):
        if dict(mine.labels) != dict(theirs.labels):
            changed = sorted(set(theirs.labels.items()) ^ set(mine.labels.items()))
            said.append(f"part {theirs.name}: labels differ at {changed[:6]}")
    return said or ["they differ"]


def main() -> int:
    """``python scripts/totalseg_names.py``: print the table's problems; exit 1 if there are any."""
    problems = check_table()
    for problem in problems:
        print(problem)
    if not problems:
        tasks = covered_tasks()
        count = sum(len(labels_for(task, source="snapshot")) for task in tasks)
        print(f"{TABLE.name}: {len(_table().classes)} classes, {count} labels in {len(tasks)} tasks, no problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
