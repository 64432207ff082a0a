"""``python -m gateway triton-repo``: a Triton model repository for every model package, served unchanged by
NVIDIA's Triton image (or any ``tritonserver`` with the Python backend).

Per package (or bundle) ``models_dir/<name>``::

    <out>/<name>/config.pbtxt       the Python backend, the wire's tensors, instance group, package digest
    <out>/<name>/1/model.py         gateway/inference/triton_model.py, as it is
    <out>/<name>/1/package/         the package, byte for byte (its digest is in config.pbtxt)

The model's Python environment must hold the ``contour-gateway`` package and its dependencies (onnxruntime-gpu on
GPU servers): the stub's own Python, or a packed environment named by ``--execution-env`` (Triton's
``EXECUTION_ENV_PATH``). The repository holds no key, no credential and no patient data.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from gateway.errors import ConfigError
from gateway.inference.packages import load_model
from gateway.inference.serving import package_digest
from gateway.inference.wire import HU_FLOAT32, HU_INT16, MAX_VOXELS, RESULT, VOXEL_AXES

__all__ = ["model_config", "write_repository"]

Kind = Literal["gpu", "cpu"]

#: The Python model, copied as it is (it imports Triton's ``triton_python_backend_utils``: not importable here).
_MODEL_SOURCE = Path(__file__).with_name("triton_model.py")


def write_repository(models_dir: Path, out: Path, *, kind: Kind = "gpu", instances: int = 1,
                     execution_env: str | None = None, names: Sequence[str] | None = None) -> list[str]:
    """Write the repository of *names* (default: every package folder of *models_dir*) into *out*; return the
    model names written. A model already in *out* is replaced whole.

    Raises :class:`ConfigError` listing every package that cannot be loaded (nothing is written then).
    """
    folders = [models_dir / name for name in names] if names is not None else sorted(
        p for p in models_dir.iterdir() if (p / "manifest.toml").is_file())
    problems: list[str] = []
    versions: dict[str, str] = {}
    for folder in folders:
        try:
            versions[folder.name] = load_model(folder).manifest.model.version
        except ConfigError as exc:
            problems += [f"{folder.name}: {problem}" for problem in exc.problems]
    if not folders:
        problems.append("no model package (a folder with manifest.toml) to serve")
    if problems:
        raise ConfigError(str(models_dir), problems)
    for folder in folders:
        _write_model(folder, out / folder.name, model_config(folder.name, package_digest(folder),
                                                             versions[folder.name], kind, instances, execution_env))
    return [folder.name for folder in folders]


def model_config(name: str, digest: str, version: str, kind: Kind, instances: int,
                 execution_env: str | None = None) -> str:
    """The ``config.pbtxt`` of one model (protobuf text format)."""
    inputs = ",\n".join([
        _tensor(HU_INT16, "TYPE_INT16", "-1, -1, -1", optional=True),
        _tensor(HU_FLOAT32, "TYPE_FP32", "-1, -1, -1", optional=True),
        _tensor(VOXEL_AXES, "TYPE_FP64", "3, 3"),
        _tensor(MAX_VOXELS, "TYPE_INT64", "1"),
    ])
    parameters = {"package_sha256": digest, "package_version": version}
    if execution_env is not None:
        parameters["EXECUTION_ENV_PATH"] = execution_env
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0", f"input [\n{inputs}\n]",
             f"output [\n{_tensor(RESULT, 'TYPE_STRING', '1')}\n]",
             f"instance_group [ {{ kind: KIND_{kind.upper()} count: {instances} }} ]",
             "version_policy: { specific: { versions: [ 1 ] } }"]
    lines += [f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
              for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


def _tensor(name: str, datatype: str, dims: str, *, optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {datatype} dims: [ {dims} ]{extra} }}'


def _write_model(package: Path, target: Path, config: str) -> None:
    staging = target.with_name(f".{target.name}.writing")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "1").mkdir(parents=True)
    shutil.copytree(package, staging / "1" / "package", ignore=shutil.ignore_patterns(".*", "__pycache__"))
    shutil.copyfile(_MODEL_SOURCE, staging / "1" / "model.py")
    (staging / "config.pbtxt").write_text(config, encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
