"""The Orthanc TPS double (tests/orthanc.py) against a real dcmtk storescu."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import dcmtk_env, require_tool
from tests.orthanc import Orthanc, orthanc_running
from tests.synthetic import make_ct_series


def storescu(orthanc: Orthanc, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """Send *files* to *orthanc* as CONTOUR_GW."""
    return subprocess.run([require_tool("storescu"), "-aet", "CONTOUR_GW", "-aec", orthanc.aet, "127.0.0.1",
                           str(orthanc.dicom_port), *map(str, files)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=30, check=False)


def test_stores_series_and_keeps_it_across_restart(tmp_path: Path) -> None:
    """A CT series sent by the allowed AE is stored, readable with pydicom, and survives a restart."""
    series = make_ct_series(tmp_path / "ct", 3)
    with orthanc_running(tmp_path / "orthanc") as orthanc:
        sent = storescu(orthanc, series.files)
        assert sent.returncode == 0, sent.stderr
        stored = orthanc.wait_for_instances(3, timeout=10, modality="CT")
        assert sorted(str(ds.SOPInstanceUID) for ds in stored) == sorted(series.sop_uids)
        assert orthanc.datasets(modality="RTSTRUCT") == []
        assert orthanc.tags(orthanc.instances()[0])["SeriesInstanceUID"] == series.series_uid

        ports = orthanc.dicom_port, orthanc.http_port
        orthanc.stop()
        orthanc.start()
        assert (orthanc.dicom_port, orthanc.http_port) == ports
        assert sorted(str(ds.SOPInstanceUID) for ds in orthanc.datasets()) == sorted(series.sop_uids)


def test_rejects_association_when_not_accepting(tmp_path: Path) -> None:
    """accept=False: the association is rejected permanently and nothing is stored."""
    series = make_ct_series(tmp_path / "ct", 1)
    with orthanc_running(tmp_path / "orthanc", accept=False) as orthanc:
        sent = storescu(orthanc, series.files)
        assert sent.returncode != 0
        assert "Rejected Permanent" in sent.stderr + sent.stdout, sent.stderr
        assert "Calling AE Title Not Recognized" in sent.stderr + sent.stdout
        assert orthanc.instances() == []
        assert "Rejected association for remote AET CONTOUR_GW" in orthanc.log_text()
