"""A real Orthanc run as the treatment-planning-system double for end-to-end tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest

__all__ = ["Orthanc", "orthanc_running", "start_orthanc"]

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 20.0
_LOG_TAIL = 4000


@dataclass
class Orthanc:
    """One Orthanc process; its configuration, storage, index and log all live under *root*."""

    root: Path
    dicom_port: int
    http_port: int
    aet: str = "ORTHANC"
    allowed_aet: str = "CONTOUR_GW"
    process: subprocess.Popen[bytes] | None = None
    accept: bool = True
    _modalities: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def start(self) -> None:
        """(Re)start with the same ports and storage; return once REST answers /system for our ports."""
        if self.process is not None and self.process.poll() is None:
            raise AssertionError("Orthanc is already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([_binary(), str(self.config_path)], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.root,
                                            env={**os.environ, "TCP_NODELAY": "1"}, start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited ({self.process.returncode}) while starting:\n"
                                     + self._log_tail())
            if self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"Orthanc did not answer within {_START_TIMEOUT} s:\n" + self._log_tail())

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL the process group after 20 s."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return [str(item) for item in self._get_json("/instances")]

    def tags(self, instance_id: str) -> dict[str, Any]:
        """The simplified tags (keyword -> value) of one instance."""
        tags: dict[str, Any] = self._get_json(f"/instances/{instance_id}/simplified-tags")
        return tags

    def file(self, instance_id: str) -> bytes:
        """The stored DICOM Part 10 file of one instance."""
        return self._get(f"/instances/{instance_id}/file")

    def file_of(self, sop_instance_uid: str) -> bytes:
        """The stored Part 10 file of the instance with *sop_instance_uid*, as Orthanc keeps it."""
        for instance in self.instances():
            raw = self.file(instance)
            if str(pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID) == sop_instance_uid:
                return raw
        raise AssertionError(f"instance {sop_instance_uid} not found at the TPS")

    def datasets(self, modality: str | None = None) -> list[pydicom.Dataset]:
        """Every stored instance parsed with pydicom, optionally only those of *modality*."""
        return [pydicom.dcmread(io.BytesIO(self.file(i))) for i in self._instances_of(modality)]

    def wait_for_instances(self, count: int, timeout: float = 60.0,
                           modality: str | None = None) -> list[pydicom.Dataset]:
        """Poll until at least *count* instances (of *modality*) are stored; return them parsed."""
        deadline = time.monotonic() + timeout
        while True:
            found = len(self._instances_of(modality))
            if found >= count:
                return self.datasets(modality)
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"Orthanc is not running; {found} of {count} instances stored:\n"
                                     + self._log_tail())
            if time.monotonic() >= deadline:
                kind = f" {modality}" if modality else ""
                raise AssertionError(f"Orthanc stored {found} of {count}{kind} instances within {timeout} s:\n"
                                     + self._log_tail())
            time.sleep(0.1)

    def log_text(self) -> str:
        """Everything Orthanc wrote to its log, across restarts."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _instances_of(self, modality: str | None) -> list[str]:
        ids = self.instances()
        if modality is None:
            return ids
        for instance_id in ids:
            if instance_id not in self._modalities:  # an id always names the same stored instance
                self._modalities[instance_id] = str(self.tags(instance_id).get("Modality", ""))
        return [i for i in ids if self._modalities[i] == modality]

    def _ready(self) -> bool:
        try:
            system = self._get_json("/system", timeout=1)
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                pass
        except (OSError, ValueError, AssertionError):  # not up yet, or someone else's server
            return False
        # Another process may hold a port we picked: only our own configuration counts.
        return bool(system.get("DicomPort") == self.dicom_port and system.get("DicomAet") == self.aet)

    def _get(self, path: str, timeout: float = 10) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                body: bytes = reply.read()
                return body
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Orthanc answered {exc.code} to GET {path}:\n" + self._log_tail()) from exc

    def _get_json(self, path: str, timeout: float = 10) -> Any:
        return json.loads(self._get(path, timeout))

    def _log_tail(self) -> str:
        return self.log_text()[-_LOG_TAIL:]


def start_orthanc(root: Path, *, allowed_aet: str = "CONTOUR_GW", allowed_host: str = "127.0.0.1",
                  accept: bool = True) -> Orthanc:
    """Write a configuration under *root* and start Orthanc; return once its REST API answers.

    Orthanc 1.10 cannot bind to loopback only, so it admits one calling AE from one host: *allowed_aet* on
    *allowed_host*. With ``accept=False`` no AE is known and unknown AEs are refused, so every association is
    rejected (permanent, calling AE title not recognised).
    """
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = _free_ports(2)
    orthanc = Orthanc(root, dicom_port, http_port, allowed_aet=allowed_aet, accept=accept)
    modalities = {"gateway": [allowed_aet, allowed_host, 104]} if accept else {}
    orthanc.config_path.write_text(json.dumps({
        "Name": "tps-double", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "DicomAet": orthanc.aet, "DicomPort": dicom_port, "DicomCheckCalledAet": True,
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [], "LuaScripts": [], "SaveJobs": False, "StorageCompression": False, "SyncStorageArea": True,
        # An association is refused unless one of these is true or the calling AE is a known modality.
        "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True, "DicomModalities": modalities,
    }, indent=2))
    orthanc.start()
    return orthanc


@contextlib.contextmanager
def orthanc_running(root: Path, **kwargs: Any) -> Iterator[Orthanc]:
    """``with orthanc_running(tmp_path / "orthanc") as tps:`` starts Orthanc and always stops it."""
    orthanc = start_orthanc(root, **kwargs)
    try:
        yield orthanc
    finally:
        orthanc.stop()


def _binary() -> str:
    """The Orthanc binary; fail (never skip) when `make test` did not install it."""
    path = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(path).exists():
        pytest.fail("test peer 'Orthanc' is missing: run `make test`, which installs it")
    return path


def _free_ports(count: int) -> list[int]:
    """*count* distinct TCP ports that were free on loopback a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
