"""Ingestion speed: header indexing and series conversion against the raw-read floor and dcm2niix.

Builds (once, cached under ``--work``) a PACS-like corpus of >= 10 000 DICOM files and one
512x512x200 series from the phantom generator, then measures side by side and prints Markdown
tables (issue 3, part 6). Usage::

    python benchmarks/ingest_speed.py [--work DIR] [--replicas 130] [--repeat 3] [--cold]
        [--only index,convert,profile] [--baseline OLD_MODULE.py]
        [--convert-baseline DIR_WITH_OLD_pipeline_PACKAGE]

Corpus: one phantom study (T1 + STIR, 40 slices of 256x256) replicated with fresh Study, Series
and SOP Instance UIDs into ``replicas`` studies (80 files each), plus a Siemens-like private
block in every header (CSA image/series headers of 6.8 kB and 52 kB, as in the Siemens files of
``../shared/realdata/dcm_qa_12bit``): phantom headers alone are ~1.5 kB and 60 elements, real
ones 60 kB and 100+ elements, and header size is what indexing pays for. A few non-DICOM files
are mixed in so the problem path is exercised.

Every measured method runs in its own subprocess; wall time includes its start-up (Python
imports, process pool), "work" is the time the child measured around the call itself (for
dcm2niix they are the same). Peak RSS is the child's ru_maxrss (os.wait4). Timings are medians
of ``--repeat`` runs on a warm page cache (the corpus is read once before measuring) unless
``--cold``, which evicts the corpus files from the page cache (posix_fadvise DONTNEED, these
files only) before each run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DCM2NIIX = shutil.which("dcm2niix", path=str(Path(PY).parent)) or shutil.which("dcm2niix")

CORPUS_VERSION = 2
SMALL_SLICES, SMALL_MATRIX = 40, (256, 256)
BIG_SLICES, BIG_MATRIX = 200, (512, 512)
CSA_IMAGE_BYTES, CSA_SERIES_BYTES = 6812, 52132


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------

def _phantom(out: Path, slices: int, matrix: tuple[int, int], pixel_mm: float,
             slice_mm: float) -> Path:
    """One phantom study (T1w + STIR series) under ``out/dicom``; pixel content is irrelevant."""
    from pipeline.validation.phantom import PhantomSpec, SessionSpec, generate

    if not (out / "truth.json").exists():
        spec = PhantomSpec(subject="bench", sessions=(SessionSpec(0, 0.1, 4.0, 0.3),),
                           pixel_mm=pixel_mm, slice_mm=slice_mm, n_slices=slices,
                           matrix=matrix, supersample_xy=1, supersample_z=1)
        generate(spec, out)
    return out / "dicom"


#: Standard elements a Siemens classic MR header carries and the phantom's does not (values
#: made up, nothing identifying); with them a corpus header has ~105 top-level elements.
SCANNER_TAGS: tuple[tuple[int, str, Any], ...] = (
    (0x00080023, "DA", "20241120"), (0x00080032, "TM", "110432.974996"),
    (0x00080033, "TM", "110437.015000"), (0x00080090, "PN", ""),
    (0x00081010, "SH", "MRC00000"), (0x00081070, "PN", ""),
    (0x00081090, "LO", "PhantomTim"), (0x00101030, "DS", "35.0"),
    (0x00180024, "SH", "*tse2d1_3"), (0x00180025, "CS", "N"), (0x00180083, "DS", "1"),
    (0x00180084, "DS", "63.676"), (0x00180085, "SH", "1H"), (0x00180089, "IS", "256"),
    (0x00180093, "DS", "100"), (0x00180094, "DS", "100"), (0x00180095, "DS", "230"),
    (0x00181000, "LO", "00000"), (0x00181020, "LO", "syngo MR E11"),
    (0x00181200, "DA", "20241101"), (0x00181201, "TM", "180218.000000"),
    (0x00181251, "SH", "Body"), (0x00181310, "US", [0, 256, 256, 0]),
    (0x00181312, "CS", "ROW"), (0x00181314, "DS", "150"), (0x00181315, "CS", "N"),
    (0x00181316, "DS", "0.12239962816238"), (0x00181318, "DS", "0"),
    (0x00280106, "US", 0), (0x00280107, "US", 2908), (0x00281055, "LO", "Algo1"),
    (0x00321060, "LO", "MR THIGHS"), (0x00400244, "DA", "20241120"),
    (0x00400245, "TM", "105619.609000"), (0x00400253, "SH", "MR20241120105619"),
    (0x00400254, "LO", "MR THIGHS"),
)


def _add_siemens_block(ds: Any, seed: int) -> None:
    """Scanner tags plus private Siemens CSA elements of realistic size (random bytes)."""
    import numpy as np
    from pydicom.dataset import Dataset

    for tag, vr, value in SCANNER_TAGS:
        ds.add_new(tag, vr, value)
    refs = []
    for k in range(3):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{seed}.{k}"
        refs.append(item)
    ds.ReferencedImageSequence = refs
    rng = np.random.default_rng(seed)
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00290011, "LO", "SIEMENS MEDCOM HEADER2")
    ds.add_new(0x00291008, "CS", "IMAGE NUM 4")
    ds.add_new(0x00291009, "LO", "20241120")
    ds.add_new(0x00291010, "OB", rng.bytes(CSA_IMAGE_BYTES))
    ds.add_new(0x00291018, "CS", "MR")
    ds.add_new(0x00291019, "LO", "20241120")
    ds.add_new(0x00291020, "OB", rng.bytes(CSA_SERIES_BYTES))
    ds.add_new(0x00291160, "LO", "com")


def build_corpus(work: Path, replicas: int) -> Path:
    """``replicas`` copies of a phantom study with new UIDs: ``corpus/Pnnnn/ST0001/SEnnnn/IM*``."""
    import pydicom
    from pydicom.uid import generate_uid

    corpus = work / "corpus"
    stamp = work / "corpus.json"
    want = {"version": CORPUS_VERSION, "replicas": replicas, "slices": SMALL_SLICES,
            "matrix": list(SMALL_MATRIX)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return corpus
    if corpus.exists():
        shutil.rmtree(corpus)
    src = _phantom(work / "src_small", SMALL_SLICES, SMALL_MATRIX, 1.6, 5.0)
    sources = sorted(p for p in src.rglob("*") if p.is_file())
    print(f"building corpus: {replicas} x {len(sources)} files under {corpus} ...",
          file=sys.stderr)
    datasets = [(p.relative_to(src), pydicom.dcmread(p)) for p in sources]
    for _, ds in datasets:
        _add_siemens_block(ds, 0)
    for r in range(replicas):
        study_uid = generate_uid(entropy_srcs=["bench", "study", str(r)])
        series_uids: dict[str, str] = {}
        for rel, ds in datasets:
            old_series = str(ds.SeriesInstanceUID)
            series_uids.setdefault(old_series, generate_uid(
                entropy_srcs=["bench", "series", str(r), old_series]))
            sop = generate_uid(entropy_srcs=["bench", "sop", str(r), str(rel)])
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uids[old_series]
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.AccessionNumber = f"B{r:06d}"
            out = corpus / f"P{r:04d}" / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out, enforce_file_format=True)
            ds.SeriesInstanceUID = old_series  # the next file finds its series again
        if r % 10 == 0:
            (corpus / f"P{r:04d}" / "README.txt").write_text("exported by PACS\n")
    stamp.write_text(json.dumps(want))
    return corpus


def build_big(work: Path) -> Path:
    """One 512x512x200 series (the STIR of a phantom study); returns its folder."""
    src = _phantom(work / "src_big", BIG_SLICES, BIG_MATRIX, 0.5, 1.0)
    return src / "ST0001" / "SE0004"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def evict(paths: Sequence[Path]) -> None:
    """Drop these files (only) from the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

#: Child programs: each prints one JSON line {"work_s": ..., ...} on its last stdout line.
CHILD_PRELUDE = """
import json, sys, time
from pathlib import Path
"""

CHILD = {
    "raw_read": """
folder = Path(sys.argv[1])
t = time.perf_counter()
import os
n = nbytes = 0
for root, dirs, files in os.walk(folder):
    for name in files:
        if name.startswith('.'):
            continue
        with open(os.path.join(root, name), 'rb') as fh:
            nbytes += len(fh.read())
        n += 1
print(json.dumps({"work_s": time.perf_counter() - t, "files": n, "bytes": nbytes}))
""",
    "walk": """
from pipeline.io.scan import _walk
t = time.perf_counter()
n = len(_walk(Path(sys.argv[1])))
print(json.dumps({"work_s": time.perf_counter() - t, "files": n}))
""",
    "index": """
import importlib.util, inspect
if len(sys.argv) > 3:  # a baseline copy of the module defining index_folder
    spec = importlib.util.spec_from_file_location("dicom_index_baseline", sys.argv[3])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dicom_index_baseline"] = module
    spec.loader.exec_module(module)
    index_folder = module.index_folder
else:
    from pipeline.io.scan import index_folder
kwargs = {}
if sys.argv[2] != "auto":
    if "workers" not in inspect.signature(index_folder).parameters:
        print(json.dumps({"skip": "index_folder has no workers parameter"})); sys.exit(0)
    kwargs["workers"] = int(sys.argv[2])
t = time.perf_counter()
r = index_folder(Path(sys.argv[1]), **kwargs)
print(json.dumps({"work_s": time.perf_counter() - t, "files": r.n_files_seen,
                  "series": len(r.series), "problems": len(r.problems)}))
""",
    "read_series": """
from pipeline.io.convert import read_series, write_volume
files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_file())
level = sys.argv[3]
t = time.perf_counter()
image, sidecar = read_series(files)
t_read = time.perf_counter() - t
if level != "none":
    name = "vol.nii" if level == "0" else "vol.nii.gz"
    write_volume(image, sidecar, Path(sys.argv[2]) / name, compression_level=int(level))
out = {"work_s": time.perf_counter() - t, "read_s": t_read}
if level != "none":
    out["out_bytes"] = (Path(sys.argv[2]) / name).stat().st_size
print(json.dumps(out))
""",
    "sitk": """
import SimpleITK as sitk
t = time.perf_counter()
reader = sitk.ImageSeriesReader()
names = reader.GetGDCMSeriesFileNames(sys.argv[1])
t_scan = time.perf_counter() - t
reader.SetFileNames(names)
reader.SetOutputPixelType(sitk.sitkFloat32)
image = reader.Execute()
print(json.dumps({"work_s": time.perf_counter() - t, "scan_s": t_scan,
                  "size": list(image.GetSize())}))
""",
}


def run_child(argv: list[str], cwd: Path = ROOT) -> dict[str, Any]:
    """Run `argv`, return wall time, peak RSS (MB) and the child's JSON report (if any)."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's own resource usage (ru_maxrss in kB on Linux)
    stdout_chunks = []
    assert proc.stdout is not None and proc.stderr is not None
    stdout_chunks.append(proc.stdout.read())
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = b"".join(stdout_chunks).decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}): "
                           f"{stderr.decode(errors='replace')[-2000:]}")
    report: dict[str, Any] = {}
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if lines:
        report = json.loads(lines[-1])
    report["wall_s"] = wall
    report["cpu_s"] = usage.ru_utime + usage.ru_stime  # the child and its reaped workers
    report["rss_mb"] = usage.ru_maxrss / 1024
    report.setdefault("work_s", wall)
    return report


def py_child(kind: str, *args: str) -> list[str]:
    return [PY, "-c", CHILD_PRELUDE + CHILD[kind], *args]


def measure(argv_fn: Any, repeat: int, cold_paths: Sequence[Path] | None = None,
            before: Any = None, cwd: Path = ROOT) -> dict[str, Any]:
    """Median (by work time) of `repeat` runs of the command built by ``argv_fn()``.

    `cwd` is the folder the child runs in: its ``pipeline`` package is the one imported.
    """
    runs = []
    for _ in range(repeat):
        if before is not None:
            before()
        if cold_paths is not None:
            evict(cold_paths)
        runs.append(run_child(argv_fn(), cwd=cwd))
    if "skip" in runs[0]:
        return runs[0]
    runs.sort(key=lambda r: r["work_s"])
    best = dict(runs[len(runs) // 2])
    best["runs"] = [round(r["work_s"], 3) for r in runs]
    best["max_rss_mb"] = max(r["rss_mb"] for r in runs)
    return best


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------

def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def index_section(corpus: Path, work: Path, repeat: int, cold: bool,
                  baseline: Path | None = None) -> str:
    paths = files_under(corpus)
    n = len(paths)
    nbytes = sum(p.stat().st_size for p in paths)
    cold_paths = paths if cold else None
    out_root = work / "out_index"
    rows: list[list[Any]] = []

    def add(name: str, res: dict[str, Any], note: str = "") -> None:
        if "skip" in res:
            rows.append([name, "-", "-", "-", "-", "-", "-", res["skip"]])
            return
        rows.append([name, res["work_s"], f"{n / res['work_s']:,.0f}", res["wall_s"],
                     f"{n / res['wall_s']:,.0f}", res["cpu_s"], f"{res['max_rss_mb']:.0f}",
                     note])

    add("read all bytes (floor)", measure(lambda: py_child("raw_read", str(corpus)), repeat,
                                          cold_paths), f"{nbytes / 1e9:.2f} GB")
    add("walk only (`_walk`)", measure(lambda: py_child("walk", str(corpus)), repeat),
        "os.scandir + sort, no file opened")
    if baseline is not None:
        add("before: `index_folder` (baseline copy)", measure(
            lambda: py_child("index", str(corpus), "auto", str(baseline)), repeat, cold_paths),
            f"{baseline.name}")
    add("`index_folder`, 1 process", measure(
        lambda: py_child("index", str(corpus), "1"), repeat, cold_paths))
    auto = measure(lambda: py_child("index", str(corpus), "auto"), repeat, cold_paths)
    add("`index_folder` (default)", auto, f"{auto.get('series', '?')} series, "
        f"{auto.get('problems', '?')} problems")
    if DCM2NIIX:
        qdir = out_root / "q"
        add("dcm2niix `-q y` (search only)", measure(
            lambda: [DCM2NIIX, "-q", "y", str(corpus)], repeat, cold_paths),
            "finds DICOM files, parses nothing further")
        add("dcm2niix `-b o` (headers + sort, JSON only)", measure(
            lambda: [DCM2NIIX, "-b", "o", "-ba", "n", "-f", "%j", "-o", str(fresh_dir(qdir)),
                     str(corpus)], 1 if repeat > 1 else repeat, cold_paths),
            "fairest match for an index: every header parsed, grouped into series")
        add("dcm2niix `-z n` (full conversion)", measure(
            lambda: [DCM2NIIX, "-b", "y", "-ba", "n", "-z", "n", "-f", "%j", "-o",
                     str(fresh_dir(qdir)), str(corpus)], 1, cold_paths),
            "headers + pixels + NIfTI writes (for scale)")
        shutil.rmtree(qdir, ignore_errors=True)
    cache = "cold (corpus evicted from page cache before each run)" if cold else \
        "warm page cache"
    head = (f"### Indexing: {n:,} files ({nbytes / 1e9:.2f} GB), {os.cpu_count()} cores, "
            f"{cache}, medians of {repeat}; load average before: {_load()}\n\n"
            "work = time around the call in the child; wall = whole subprocess incl. Python "
            "imports / pool start-up; CPU = user + system of the child and its workers.\n\n")
    return head + md_table(["method", "work (s)", "files/s", "wall (s)", "files/s (wall)",
                            "CPU (s)", "peak RSS (MB)", "note"], rows)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def convert_section(series_dir: Path, work: Path, repeat: int,
                    baseline: Path | None = None) -> str:
    files = files_under(series_dir)
    nbytes = sum(p.stat().st_size for p in files)
    out = work / "out_convert"
    rows: list[list[Any]] = []

    def add(name: str, res: dict[str, Any], note: str = "") -> None:
        size = res.get("out_bytes")
        rows.append([name, res["work_s"], res["wall_s"], res["cpu_s"],
                     f"{res['max_rss_mb']:.0f}", f"{size / 1e6:.1f}" if size else "-", note])

    add("read all bytes (floor)", measure(lambda: py_child("raw_read", str(series_dir)), repeat),
        f"{len(files)} files, {nbytes / 1e6:.0f} MB")
    roots = [("before: ", baseline)] if baseline is not None else []
    for prefix, root in [*roots, ("", ROOT)]:
        res = measure(lambda: py_child("read_series", str(series_dir), str(fresh_dir(out)),
                                       "none"), repeat, cwd=root)
        add(f"{prefix}`convert.read_series` (no write)", res,
            f"{root.name}/pipeline" if prefix else
            "pydicom headers; pixels np.fromfile, rescaled into the image's float32 buffer")
        for level in ("0", "1", "6"):
            res = measure(lambda lv=level: py_child("read_series", str(series_dir),
                                                    str(fresh_dir(out)), lv), repeat, cwd=root)
            name = "`.nii` uncompressed" if level == "0" else f"`.nii.gz` gzip {level}"
            add(f"{prefix}`read_series` + `write_volume` {name}", res,
                f"read {res['read_s']:.2f} s, write {res['work_s'] - res['read_s']:.2f} s "
                "(float32)")
    if DCM2NIIX:
        for label, opts in (("`-z n`", ["-z", "n"]), ("`-z y` (default level 6)", ["-z", "y"]),
                            ("`-z y -1`", ["-z", "y", "-1"])):
            def argv(opts: list[str] = opts) -> list[str]:
                d = fresh_dir(out)
                return [DCM2NIIX, "-b", "y", "-ba", "n", *opts, "-f", "%s", "-o", str(d),
                        str(series_dir)]
            res = measure(argv, repeat)
            produced = sorted(p for p in out.iterdir() if ".nii" in p.name)
            res["out_bytes"] = sum(p.stat().st_size for p in produced)
            add(f"dcm2niix {label}", res, "int16/uint16 output, no pigz on this machine"
                if "y" in opts and not shutil.which("pigz") else "int16/uint16 output")
    add("SimpleITK `ImageSeriesReader` (GDCM scan + read, float32)",
        measure(lambda: py_child("sitk", str(series_dir)), repeat), "no write")
    shutil.rmtree(out, ignore_errors=True)
    head = (f"### Conversion: one {BIG_MATRIX[0]}x{BIG_MATRIX[1]}x{len(files)} series "
            f"({nbytes / 1e6:.0f} MB), warm page cache, medians of {repeat}; load average "
            f"before: {_load()}\n\n")
    return head + md_table(["method", "work (s)", "wall (s)", "CPU (s)", "peak RSS (MB)",
                            "output (MB)", "note"], rows)


# --------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------

def _bucket(filename: str, func: str) -> str:
    if "pydicom" in filename:
        if any(k in filename for k in ("filereader", "fileutil")):
            return "pydicom: element parsing (filereader)"
        if any(k in filename for k in ("values.py", "hooks.py", "dataelem.py", "valuerep.py",
                                       "charset.py", "multival.py", "tag.py")):
            return "pydicom: value conversion (values/dataelem/valuerep/tag)"
        if "pixels" in filename or "pixel" in func:
            return "pydicom: pixel decoding"
        return "pydicom: Dataset bookkeeping (dataset.py etc.)"
    if "SimpleITK" in filename:
        return "SimpleITK"
    if "numpy" in filename:
        return "numpy"
    if "multiprocessing" in filename or "concurrent" in filename or "selectors" in filename:
        return "process pool (IPC, pickling, waiting)"
    if "pipeline" in filename:
        return "limbtrack code (pipeline/)"
    if filename == "~":
        if any(k in func for k in ("read", "open", "stat", "seek", "tell", "scandir", "listdir",
                                   "fspath", "io.")):
            return "built-in I/O (open/read/seek/stat)"
        return "other built-ins"
    if "pathlib" in filename or "posixpath" in filename or filename.endswith("os.py"):
        return "pathlib/os.path"
    return "other Python"


def profile_table(fn: Any, title: str, top: int = 12) -> str:
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    elapsed = time.perf_counter() - t
    stats = pstats.Stats(prof, stream=io.StringIO())
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values())
    buckets: dict[str, float] = {}
    for (filename, _, func), (_, _, tottime, _, _) in entries.items():
        key = _bucket(filename, func)
        buckets[key] = buckets.get(key, 0.0) + tottime
    bucket_rows = [[k, v, f"{100 * v / total:.0f} %"]
                   for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])]
    items = sorted(entries.items(), key=lambda kv: -kv[1][2])[:top]
    func_rows = []
    for (filename, line, func), (_, nc, tottime, cumtime, _) in items:
        short = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        func_rows.append([f"`{short}:{line}({func})`", nc, tottime, cumtime])
    return (f"#### {title} (under cProfile: {elapsed:.2f} s; profiling overhead inflates "
            "Python-level calls)\n\n"
            + md_table(["where", "self time (s)", "share"], bucket_rows) + "\n\n"
            + md_table(["function (top by self time)", "calls", "self (s)", "cumulative (s)"],
                       func_rows))


def profile_section(corpus: Path, series_dir: Path, n_profile: int) -> str:
    import inspect

    from pipeline.io import scan
    from pipeline.io.convert import read_series

    subset = corpus / "P0000"
    # a slice of the corpus, as its own folder tree of symlink-free copies would cost disk;
    # profile the first replicas in place instead
    dirs = sorted(p for p in corpus.iterdir() if p.is_dir())
    per_dir = len(files_under(subset))
    take = dirs[:max(1, n_profile // max(1, per_dir))]
    kwargs: dict[str, Any] = {}
    if "workers" in inspect.signature(scan.index_folder).parameters:
        kwargs["workers"] = 1  # in-process, so the profile sees the parsing

    def run_index() -> None:
        for d in take:
            scan.index_folder(d, **kwargs)

    files = files_under(series_dir)
    parts = [
        profile_table(run_index, f"`index_folder`, 1 process, {len(take) * per_dir} files"),
        profile_table(lambda: read_series(files), f"`read_series`, {len(files)} files of "
                                                  f"{BIG_MATRIX[0]}x{BIG_MATRIX[1]}"),
    ]
    return "### Where the time goes\n\n" + "\n\n".join(parts)


# --------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=None,
                   help="cache folder for the corpus (default: a new temporary folder)")
    p.add_argument("--replicas", type=int, default=130,
                   help="studies of 80 files in the indexing corpus (130 -> 10 413 files)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--cold", action="store_true",
                   help="also measure indexing with the corpus evicted from the page cache")
    p.add_argument("--profile-files", type=int, default=2000,
                   help="files of the corpus profiled with cProfile")
    p.add_argument("--baseline", type=Path, default=None,
                   help="a copy of an older module defining index_folder (pipeline/io/scan.py, "
                        "before issue 14 pipeline/io/dicom_index.py) to time side by side")
    p.add_argument("--convert-baseline", type=Path, default=None,
                   help="a folder holding an older copy of the `pipeline` package: its "
                        "read_series / write_volume are timed side by side (\"before:\" rows)")
    p.add_argument("--only", default="index,convert,profile",
                   help="comma-separated sections: index, convert, profile")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="limbtrack_ingest_"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    corpus = build_corpus(work, args.replicas)
    series_dir = build_big(work)
    # warm the page cache once (read everything)
    for p_ in files_under(corpus) + files_under(series_dir):
        p_.read_bytes()
    sections = args.only.split(",")
    print(f"## Ingestion speed ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"dcm2niix {DCM2NIIX or 'not found'})\n")
    if "index" in sections:
        print(index_section(corpus, work, args.repeat, cold=False, baseline=args.baseline),
              "\n", flush=True)
        if args.cold:
            print(index_section(corpus, work, args.repeat, cold=True, baseline=args.baseline),
                  "\n", flush=True)
    if "convert" in sections:
        print(convert_section(series_dir, work, args.repeat, args.convert_baseline), "\n",
              flush=True)
    if "profile" in sections:
        print(profile_section(corpus, series_dir, args.profile_files), flush=True)
    print(f"\n(corpus cached under {work})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
