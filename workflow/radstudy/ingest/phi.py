"""Redaction of identifying values from anything ingestion writes (QC records, messages, logs).

Hospitals name files and folders after patients (`segmentation/MRN123_seg.nii.gz`, `DOE_JOHN/`), and
free-text headers such as SeriesDescription can carry names too. Each patient's own identifying values
are read once from a DICOM header and every string that leaves ingestion passes through `Redactor`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom

# DICOM attributes that identify a person or a visit (PS3.15 Basic Profile, the ones hospitals fill).
IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientAddress",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy", "RequestingPhysician",
)
MIN_LENGTH = 3  # shorter fragments (initials, sex) would redact ordinary words


def _whole(pattern: str, escaped: bool = False) -> re.Pattern:
    """Match only where not glued to other letters or digits ('_' and '-' separate), so that a name
    like PATIENT does not eat the word 'patients'."""
    body = pattern if escaped else re.escape(pattern)
    return re.compile(rf"(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])", re.IGNORECASE)


class Redactor:
    """Replaces the patient's original folder name by the pseudonym and other identifying values by [redacted]."""

    def __init__(self, pseudonym: str, original_id: str, values: set[str] = frozenset()):
        self.pseudonym = pseudonym
        fragments = set()
        for value in values:
            fragments.add(value)
            fragments.update(re.split(r"[\^\s,]+", value))  # person names: family^given^middle
        fragments = {f.strip() for f in fragments if len(f.strip()) >= MIN_LENGTH and f.strip() != original_id}
        self._original = _whole(original_id) if original_id else None
        longest_first = sorted(fragments, key=len, reverse=True)
        self._others = _whole("|".join(re.escape(f) for f in longest_first), escaped=True) if fragments else None

    @classmethod
    def from_dicom(cls, pseudonym: str, folder: Path, dicom_file: Path | None) -> "Redactor":
        values: set[str] = set()
        if dicom_file is not None:
            ds = pydicom.dcmread(dicom_file, stop_before_pixels=True, specific_tags=list(IDENTIFYING_TAGS))
            for tag in IDENTIFYING_TAGS:
                element = ds.get(tag)
                if element is None:
                    continue
                items = element if isinstance(element, pydicom.multival.MultiValue) else [element]
                values.update(str(v) for v in items if str(v).strip())
        return cls(pseudonym, folder.name, values)

    def __call__(self, value):
        """Redact a string, or every string inside lists and dicts."""
        if isinstance(value, str):
            if self._original is not None:
                value = self._original.sub(self.pseudonym, value)
            if self._others is not None:
                value = self._others.sub("[redacted]", value)
            return value
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self(v) for v in value)
        return value
