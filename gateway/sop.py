"""The DICOM the node speaks: SOP classes it accepts and sends, and the transfer syntaxes it offers (PS3.4, PS3.5)."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["DOSE_REPORT_SOP_CLASSES", "IMAGE_SOP_CLASSES", "SECONDARY_CAPTURE", "STORAGE_SOP_CLASSES",
           "TRANSFER_SYNTAXES", "VERIFICATION", "VERIFICATION_TRANSFER_SYNTAXES"]

#: PS3.4 A.4: the Verification SOP Class (C-ECHO).
VERIFICATION = UID("1.2.840.10008.1.1")
#: Radiation dose structured reports (PS3.4 Annex B): received and kept apart, never processed.
DOSE_REPORT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR
})
#: Secondary Capture Image: screenshots of dose pages and reports often travel with a planning CT.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: Image classes besides CT that may arrive with a study; accepted so the sender sees success, never contoured.
IMAGE_SOP_CLASSES = frozenset({SECONDARY_CAPTURE})
#: Storage SOP classes accepted. CT is contoured; secondary captures and dose reports often
#: travel with a planning CT and are accepted so the sender sees success, then quarantined
#: (by pseudonymisation). Enhanced CT waits for a volume stage that reads it.
STORAGE_SOP_CLASSES = (CTImageStorage, *sorted(IMAGE_SOP_CLASSES), *sorted(DOSE_REPORT_SOP_CLASSES))
#: C-ECHO carries no data set: the two little endian syntaxes every peer proposes are enough.
VERIFICATION_TRANSFER_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
#: Offered transfer syntaxes; Deflate is deliberately absent (unbounded inflation).
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

