"""The HTML report as PDF (printed by headless Chromium) and as a DICOM Encapsulated PDF.

:func:`html_to_pdf` prints the self-contained report (figures are embedded PNGs, no scripts)
with Debian's ``chromium`` in headless mode, in a fresh profile folder, with networking
features off: the page is the same one a browser shows, figures included.

:func:`encapsulated_pdf` wraps the PDF in an Encapsulated PDF Storage object
(SOP class 1.2.840.10008.5.1.4.1.1.104.1) carrying the patient and study of a source image
(so a PACS files it with that study), in a new series of modality ``DOC``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, FileMetaDataset
from pydicom.dataset import FileDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from pipeline import __version__
from pipeline.export import ExportError
from pipeline.export.dicom import UID_PREFIX
from pipeline.io.files import atomic_path

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: Browsers tried, in order, when none is named.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Flags for a headless print: no sandbox (root in a container), no GPU, no network features
#: a hospital firewall would flag, no first-run work, no header/footer with the file path.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-pdf-header-footer", "--print-to-pdf-no-header",
)
#: Attributes copied from the source image: Patient, General Study and Patient Study modules.
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)
#: Series number of the report series (apart from the scanner's low numbers).
REPORT_SERIES_NUMBER = 9901
DEFAULT_TITLE = "limbtrack longitudinal limb volumetry report"


def find_chromium(name: str | None = None) -> str:
    """The browser's path: `name` if given (a path or a command), else the first of
    :data:`CHROMIUM_NAMES` on PATH. Raises ExportError naming what to install."""
    for candidate in ([name] if name else CHROMIUM_NAMES):
        found = shutil.which(candidate)
        if found:
            return found
    raise ExportError(f"no headless browser found ({name or ', '.join(CHROMIUM_NAMES)}); "
                      "install Debian's chromium (apt-get install chromium) or name one "
                      "with --chromium")


def html_to_pdf(html: Path, pdf: Path, chromium: str | None = None,
                timeout_s: float = 180.0) -> int:
    """Print `html` to `pdf` (atomically) with headless Chromium; returns the page count.

    Raises ExportError when the browser fails, times out, or writes no PDF.
    """
    browser = find_chromium(chromium)
    with tempfile.TemporaryDirectory(prefix="limbtrack-chromium-") as profile, \
            atomic_path(pdf) as tmp:
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--print-to-pdf={tmp}", Path(html).resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "HOME": profile})
        except subprocess.TimeoutExpired:
            raise ExportError(f"{html}: the browser did not finish printing in "
                              f"{timeout_s:.0f} s") from None
        data = tmp.read_bytes() if tmp.exists() else b""
        if proc.returncode != 0 or not data.startswith(b"%PDF"):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"{html}: the browser wrote no PDF (exit {proc.returncode}: "
                              f"{tail[0]})")
    return pdf_page_count(data)


def pdf_page_count(data: bytes) -> int:
    """Pages of a PDF: pypdf when installed, else the page objects (``/Type /Page``)."""
    try:
        import io

        from pypdf import PdfReader  # optional
    except ImportError:
        return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))
    return len(PdfReader(io.BytesIO(data)).pages)


def _now() -> tuple[str, str]:
    now = dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def encapsulated_pdf(pdf: bytes, source: Dataset, title: str = DEFAULT_TITLE,
                     references: Sequence[tuple[str, str]] = ()) -> FileDataset:
    """An Encapsulated PDF object of `pdf` in the study of `source`.

    Parameters
    ----------
    pdf : bytes
        The document (must start with ``%PDF``).
    source : Dataset
        An image of the study the report belongs to (its patient and study attributes,
        :data:`PATIENT_STUDY_KEYWORDS`, are copied).
    title : str
        Document Title.
    references : sequence of (SOP class UID, SOP instance UID)
        The instances the document was derived from (Source Instance Sequence).
    """
    if not pdf.startswith(b"%PDF"):
        raise ExportError("encapsulated_pdf: the document is not a PDF")
    sop_uid = generate_uid(prefix=UID_PREFIX)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF_STORAGE)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:  # Type 2: present, maybe empty
            setattr(ds, keyword, "")
    _document_attributes(ds, sop_uid, title, references)
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)  # OB: even length
    return ds


def _document_attributes(ds: Dataset, sop_uid: str, title: str,
                         references: Sequence[tuple[str, str]]) -> None:
    """SOP Common, series, equipment and Encapsulated Document module attributes."""
    date, time = _now()
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid(prefix=UID_PREFIX)
    ds.SeriesNumber = REPORT_SERIES_NUMBER
    ds.SeriesDescription = "limbtrack report (PDF)"
    ds.Manufacturer = "limbtrack"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # SC Equipment: workstation
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.BurnedInAnnotation = "YES"  # dates and the patient's pseudonym are on the pages
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if references:
        items = []
        for sop_class, instance in references:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = instance
            items.append(item)
        ds.SourceInstanceSequence = items


def write_encapsulated_pdf(ds: FileDataset, path: Path) -> None:
    """Save an :func:`encapsulated_pdf` object as a DICOM file, atomically."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
