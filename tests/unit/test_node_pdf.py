"""The report as PDF and DICOM Encapsulated PDF (pipeline.export.pdf): encapsulation round trip
(pydicom, and dcmtk's dcm2pdf when installed), page count, printing with headless Chromium
(tests/browser_setup.sh installs it; skipped without)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from node_helpers import tiny_image

from pipeline.export import ExportError
from pipeline.export.pdf import (
    ENCAPSULATED_PDF_STORAGE,
    encapsulated_pdf,
    find_chromium,
    html_to_pdf,
    pdf_page_count,
    write_encapsulated_pdf,
)

ROOT = Path(__file__).resolve().parents[2]
#: Two page objects and a page tree, as a PDF writer lays them out (not a full PDF).
TWO_PAGES = (b"%PDF-1.4\n1 0 obj << /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >> endobj\n"
             b"2 0 obj << /Type /Page /Parent 1 0 R >> endobj\n"
             b"3 0 obj <</Type/Page/Parent 1 0 R>> endobj\n%%EOF")
#: A 1 x 1 red PNG.
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d7"
    "63f8cfc000000301010018dd8db40000000049454e44ae426082")).decode()


def _chromium() -> str:
    setup = subprocess.run(["sh", str(ROOT / "tests" / "browser_setup.sh")],
                           capture_output=True, text=True, timeout=900)
    if setup.returncode != 0:
        pytest.skip(f"chromium not available: {setup.stderr.strip()[-200:]}")
    return setup.stdout.strip().splitlines()[-1]


def test_page_count_without_pypdf() -> None:
    assert pdf_page_count(TWO_PAGES) == 2
    assert pdf_page_count(b"%PDF-1.4\n%%EOF") == 0


def test_encapsulated_pdf_round_trip(tmp_path: Path) -> None:
    source = tiny_image("PH000007", name="DOE^JANE")
    source.AccessionNumber, source.StudyID = "ACC1", "7"
    pdf = TWO_PAGES  # odd length: padded in the object, length kept
    assert len(pdf) % 2 == 1
    refs = [("1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.1"), ("1.2.840.10008.5.1.4.1.1.88.34",
                                                          "1.2.3.2")]
    obj = encapsulated_pdf(pdf, source, title="Report", references=refs)
    out = tmp_path / "report_pdf.dcm"
    write_encapsulated_pdf(obj, out)
    back = pydicom.dcmread(out)
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE == back.file_meta.MediaStorageSOPClassUID
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        assert back[keyword].value == source[keyword].value, keyword
    assert back.SeriesInstanceUID != source.SeriesInstanceUID  # a new series
    assert back.Modality == "DOC" and back.DocumentTitle == "Report"
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert back.EncapsulatedDocumentLength == len(pdf)
    assert bytes(back.EncapsulatedDocument)[:len(pdf)] == pdf
    assert len(back.EncapsulatedDocument) % 2 == 0
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in back.SourceInstanceSequence] == refs
    assert "ReferringPhysicianName" in back and "ConceptNameCodeSequence" in back  # Type 2
    second = encapsulated_pdf(pdf, source)
    assert second.SOPInstanceUID != obj.SOPInstanceUID


def test_dcmtk_reads_the_document_back(tmp_path: Path) -> None:
    if shutil.which("dcm2pdf") is None:
        pytest.skip("dcmtk's dcm2pdf not installed (tests/dcmtk_setup.sh installs it)")
    out = tmp_path / "r.dcm"
    write_encapsulated_pdf(encapsulated_pdf(TWO_PAGES, tiny_image("P")), out)
    proc = subprocess.run(["dcm2pdf", str(out), str(tmp_path / "back.pdf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "back.pdf").read_bytes() == TWO_PAGES


def test_not_a_pdf_refused() -> None:
    with pytest.raises(ExportError, match="not a PDF"):
        encapsulated_pdf(b"<html>", tiny_image("P"))


def test_missing_browser_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no headless browser found.*apt-get install"):
        find_chromium("no-such-browser-here")
    (tmp_path / "r.html").write_text("<p>x</p>")
    with pytest.raises(ExportError):
        html_to_pdf(tmp_path / "r.html", tmp_path / "r.pdf", "no-such-browser-here")
    assert not (tmp_path / "r.pdf").exists()


def test_chromium_prints_pages_with_figures(tmp_path: Path) -> None:
    browser = _chromium()
    html = tmp_path / "report.html"
    html.write_text(
        "<!doctype html><html><body><h1>Report</h1>"
        f'<img src="data:image/png;base64,{PNG}" width="200" height="200">'
        '<div style="break-before: page"><h2>Second page</h2></div></body></html>')
    pages = html_to_pdf(html, tmp_path / "report.pdf", browser)
    data = (tmp_path / "report.pdf").read_bytes()
    assert data.startswith(b"%PDF") and pages == 2 == pdf_page_count(data)
    assert b"/Subtype /Image" in data or b"/Subtype/Image" in data  # the figure is in it
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".report*"))
