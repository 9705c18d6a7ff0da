"""Tests of pipeline.report.cohort on small synthetic subject folders (no images needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.io.files import read_tsv, write_tsv_atomic
from pipeline.report.cohort import COLUMNS, build_cohort, failure_reason, main

LONG_COLUMNS = [
    "subject",
    "study_date",
    "day",
    "structure",
    "affected_ml",
    "contralateral_ml",
    "difference_ml",
    "asymmetry_pct",
    "change_from_baseline_pct",
]
XSS = "<script>alert(1)</script>"


def _subject(root: Path, name: str, classification: str, series: list[tuple],
             qc_flags: list[dict] | None = None) -> Path:
    """series: (date, day, soft-tissue asymmetry %, lesion mL, edema mL) per session; None
    for a value that is not available (n/a)."""
    d = root / name
    d.mkdir(parents=True)
    rows = []
    for date, day, asym, lesion, edema in series:
        for structure, aff, pct in (
            ("soft_tissue", None if asym is None else 1000.0 * (1 + asym / 100), asym),
            ("marrow_lesion", lesion, None),
            ("edema", edema, None),
        ):
            rows.append(
                {
                    "subject": name,
                    "study_date": date,
                    "day": day,
                    "structure": structure,
                    "affected_ml": aff,
                    "contralateral_ml": 1000.0 if structure == "soft_tissue" else 0.0,
                    "difference_ml": None,
                    "asymmetry_pct": pct,
                    "change_from_baseline_pct": None,
                }
            )
    write_tsv_atomic(d / "longitudinal.tsv", rows, LONG_COLUMNS)
    summary = {
        "subject": name,
        "affected_side": "left",
        "classification": classification,
        "baseline_study_date": series[0][0],
        "warnings": ["w1"],
        "sessions": [
            {"study_date": s[0], "day": s[1], "warnings": ["s"] if i == 1 else []}
            for i, s in enumerate(series)
        ],
    }
    if qc_flags is not None:
        summary["qc_flags"] = qc_flags
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (d / "report.html").write_text("<html></html>", encoding="utf-8")
    return d


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[list[Path], Path, Path]:
    results = tmp_path / "results"
    a = _subject(
        results,
        "p01",
        "pseudo-progression",
        [
            ("2024-02-25", -5, 8.2, 5.9, 148.1),
            ("2024-03-07", 6, 25.4, 7.4, 449.6),
            ("2024-03-31", 30, 0.0, 0.0, 0.0),
        ],
    )
    b = _subject(
        results,
        "p02",
        "progression",
        [("2024-01-01", 0, 3.0, 2.0, 10.0), ("2024-02-01", 31, 12.0, 4.0, 30.0)],
    )
    failed = results / "p03"
    (failed / "logs").mkdir(parents=True)
    (failed / "logs" / "index.log").write_text("INFO indexed 12 files\n", encoding="utf-8")
    (failed / "logs" / "segment_ses-20240101.log").write_text(
        f"Traceback (most recent call last):\n  File x\nRuntimeError: no limb found in {XSS}\n",
        encoding="utf-8",
    )
    missing = results / "p04"  # never processed: no folder at all
    out = tmp_path / "cohort"
    return [a, b, failed, missing], out / "cohort.html", out / "cohort.tsv"


def test_cohort_rows(cohort: tuple[list[Path], Path, Path]) -> None:
    dirs, html_path, tsv_path = cohort
    rows = build_cohort(dirs, html_path, tsv_path)
    assert [r["subject"] for r in rows] == ["p01", "p02", "p03", "p04"]
    table = read_tsv(tsv_path)
    assert list(table[0]) == list(COLUMNS)
    p01, p02, p03, p04 = table
    assert p01["status"] == "ok" and p01["classification"] == "pseudo-progression"
    assert p01["n_sessions"] == "3" and p01["baseline_date"] == "2024-02-25"
    assert float(p01["peak_soft_tissue_asymmetry_pct"]) == pytest.approx(25.4)
    assert p01["peak_asymmetry_day"] == "6"
    assert [float(p01[f"lesion_ml_{k}"]) for k in ("baseline", "peak", "last")] == pytest.approx(
        [5.9, 7.4, 0.0]
    )
    assert [float(p01[f"edema_ml_{k}"]) for k in ("baseline", "peak", "last")] == pytest.approx(
        [148.1, 449.6, 0.0]
    )
    assert p01["n_warnings"] == "2"  # one subject-level, one session-level
    assert p01["report"] == "../results/p01/report.html"
    assert float(p02["lesion_ml_last"]) == pytest.approx(4.0)
    assert p01["n_qc_exclude"] == "n/a" and p01["n_qc_warn"] == "n/a"  # summary without flags
    assert p03["status"] == "failed" and p03["classification"] == "n/a"
    assert p03["reason"].startswith("segment_ses-20240101.log: RuntimeError: no limb found")
    assert p04["status"] == "failed" and "not found" in p04["reason"]


def test_cohort_html(cohort: tuple[list[Path], Path, Path]) -> None:
    dirs, html_path, tsv_path = cohort
    build_cohort(dirs, html_path, tsv_path)
    html = html_path.read_text(encoding="utf-8")
    # relative links that resolve to the subject reports
    links = re.findall(r'<a href="([^"]+)">', html)
    assert links == ["../results/p01/report.html", "../results/p02/report.html"]
    for link in links:
        assert (html_path.parent / link).resolve().is_file()
    # self-contained: no external resource of any kind
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and "url(" not in html
    # sortable headers, numeric sort keys, failed rows marked, reasons escaped
    assert html.count('<th data-key="') == len(COLUMNS) - 1  # 'report' is the subject's link
    assert 'data-sort="25.4"' in html
    assert html.count('class="failed"') == 2
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "pseudo-progression 1" in html and "failed 2" in html


def test_failure_reason_without_error_lines(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log").write_text("all fine\n", encoding="utf-8")
    assert "no error found in a.log" in failure_reason(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no log found" in failure_reason(empty)


def test_unreadable_summary(tmp_path: Path) -> None:
    d = tmp_path / "p05"
    d.mkdir()
    (d / "summary.json").write_text("{not json", encoding="utf-8")
    rows = build_cohort([d], tmp_path / "c.html", tmp_path / "c.tsv")
    assert rows[0]["status"] == "failed" and "unreadable" in rows[0]["reason"]


def test_cli(cohort: tuple[list[Path], Path, Path]) -> None:
    dirs, html_path, tsv_path = cohort
    argv = ["--subject-dirs", *map(str, dirs), "--out-html", str(html_path)]
    assert main([*argv, "--out-tsv", str(tsv_path)]) == 0
    assert len(read_tsv(tsv_path)) == 4 and html_path.stat().st_size > 1000


def _flag(session: str, code: str, severity: str) -> dict:
    return {"session": session, "side": "both", "code": code, "severity": severity,
            "message": "m", "slices": []}


def test_qc_flags_and_unavailable_values(tmp_path: Path) -> None:
    """Flags are counted per severity; a value that is not available is n/a in the row, never
    0 and never replaced by another session's value."""
    results = tmp_path / "results"
    flags = [
        _flag("20240225", "fluid_not_fat_suppressed", "exclude"),
        _flag("20240307", "registration_failed", "exclude"),
        _flag("20240331", "limb_cut_by_fov", "warn"),
    ]
    d = _subject(
        results,
        "p06",
        "indeterminate",
        [
            ("2024-02-25", -5, 4.0, None, None),  # lesion and edema not available
            ("2024-03-07", 6, None, None, None),  # nothing available
            ("2024-03-31", 30, 2.0, 3.5, 50.0),
        ],
        flags,
    )
    clean = _subject(results, "p07", "stable", [("2024-01-01", 0, 1.0, 1.0, 1.0)], [])
    rows = build_cohort([d, clean], tmp_path / "c.html", tmp_path / "c.tsv")
    p06, p07 = read_tsv(tmp_path / "c.tsv")
    assert (p06["n_qc_exclude"], p06["n_qc_warn"]) == ("2", "1")
    assert (p07["n_qc_exclude"], p07["n_qc_warn"]) == ("0", "0")
    assert float(p06["peak_soft_tissue_asymmetry_pct"]) == pytest.approx(4.0)
    assert p06["peak_asymmetry_day"] == "-5"
    for prefix, last in (("lesion", 3.5), ("edema", 50.0)):
        assert p06[f"{prefix}_ml_baseline"] == "n/a"  # not the first available value
        assert float(p06[f"{prefix}_ml_peak"]) == pytest.approx(last)
        assert float(p06[f"{prefix}_ml_last"]) == pytest.approx(last)
    assert rows[0]["lesion_ml_baseline"] is None
    html = (tmp_path / "c.html").read_text(encoding="utf-8")
    headers = re.findall(r'<th data-key="([a-z_]+)"', html)
    assert headers.index("n_qc_exclude") == headers.index("n_warnings") + 1
    assert headers[-1] == "reason" and "QC exclude flags" in html


def test_last_session_not_available_is_not_replaced(tmp_path: Path) -> None:
    d = _subject(tmp_path, "p08", "indeterminate",
                 [("2024-01-01", 0, 1.0, 2.0, 20.0), ("2024-02-01", 31, None, None, None)],
                 [_flag("20240201", "anatomical_not_t1_like", "exclude")])
    (row,) = build_cohort([d], tmp_path / "c.html", tmp_path / "c.tsv")
    assert row["lesion_ml_baseline"] == pytest.approx(2.0) and row["lesion_ml_last"] is None
    assert row["edema_ml_peak"] == pytest.approx(20.0) and row["n_qc_exclude"] == 1


def test_cli_with_the_files_the_rule_declares(cohort: tuple[list[Path], Path, Path]) -> None:
    """The cohort rule passes each subject's summary, measurements and report (the files it
    declares): the rows are those of the folder form."""
    dirs, html_path, tsv_path = cohort
    ok = dirs[:2]
    argv = ["--summaries", *(str(d / "summary.json") for d in ok),
            "--longitudinal", *(str(d / "longitudinal.tsv") for d in ok),
            "--reports", *(str(d / "report.html") for d in ok),
            "--out-html", str(html_path), "--out-tsv", str(tsv_path)]
    assert main(argv) == 0
    by_files = read_tsv(tsv_path)
    build_cohort(ok, html_path.parent / "c.html", html_path.parent / "c.tsv")
    assert by_files == read_tsv(html_path.parent / "c.tsv")  # links relative to one folder
    assert [r["subject"] for r in by_files] == ["p01", "p02"]
    assert by_files[0]["report"] == "../results/p01/report.html"


def test_cli_refuses_unpaired_files(cohort: tuple[list[Path], Path, Path]) -> None:
    dirs, html_path, tsv_path = cohort
    argv = ["--summaries", *(str(d / "summary.json") for d in dirs[:2]),
            "--longitudinal", str(dirs[0] / "longitudinal.tsv"),
            "--reports", *(str(d / "report.html") for d in dirs[:2]),
            "--out-html", str(html_path), "--out-tsv", str(tsv_path)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
