"""The design document (docs/) stays current with the code.

Every column the code writes to the main tables, every QC code, every configuration key and
every label of the label map must be documented in docs/, and every ``docs/...`` file (and
quoted section) the code cites must exist.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import labels, qc
from pipeline.longitudinal import LONGITUDINAL_COLUMNS
from pipeline.measure import VOLUME_COLUMNS
from pipeline.profiles import CIRCUMFERENCE_COLUMNS, CSA_COLUMNS
from pipeline.report.cohort import COLUMNS as COHORT_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
#: Where the code may cite the design document.
CITING = ("pipeline", "rules", "config", "tests", "benchmarks", "Snakefile", "README.md",
          "Makefile")
#: ``docs/design.md``, optionally followed by a quoted section: ``docs/design.md "Uncertainty"``.
CITATION = re.compile(r"""(docs/[\w./-]+\.md)(?:'s)?(?:\s+\(?"([A-Z][^"\n]{1,60})")?""")


def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("**/*.md")))


@pytest.fixture(scope="module")
def docs() -> str:
    return _docs_text()


def _code(name: str, docs: str) -> bool:
    """`name` appears in docs/ as code (between backticks, alone or in a list)."""
    return re.search(r"`[^`\n]*\b" + re.escape(name) + r"\b[^`\n]*`", docs) is not None


@pytest.mark.parametrize(("table", "columns"), [
    ("volumes.tsv", VOLUME_COLUMNS),
    ("longitudinal.tsv", LONGITUDINAL_COLUMNS),
    ("profile_csa.tsv", CSA_COLUMNS),
    ("circumference.tsv", CIRCUMFERENCE_COLUMNS),
    ("cohort.tsv", COHORT_COLUMNS),
])
def test_every_column_is_documented(table: str, columns: tuple[str, ...], docs: str) -> None:
    missing = [c for c in columns if not _code(c, docs)]
    assert not missing, f"{table} columns not documented in docs/: {missing}"


def test_main_tables_have_a_row_per_column_in_order(docs: str) -> None:
    """outputs.md lists volumes.tsv and longitudinal.tsv column by column, in file order."""
    outputs = (DOCS / "outputs.md").read_text(encoding="utf-8")
    for name, columns in (("volumes.tsv", VOLUME_COLUMNS),
                          ("longitudinal.tsv", LONGITUDINAL_COLUMNS)):
        section = outputs.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
        assert rows == list(columns), f"docs/outputs.md '{name}' rows differ from the code"


def test_every_qc_code_is_documented(docs: str) -> None:
    codes = set(qc.EXCLUDED_STRUCTURES) | set(qc.MEANING)
    qc_doc = (DOCS / "qc.md").read_text(encoding="utf-8")
    table_codes = set(re.findall(r"^\| `(\w+)` \|", qc_doc, flags=re.M))
    assert codes <= table_codes, f"QC codes missing from docs/qc.md: {codes - table_codes}"
    assert table_codes <= codes, f"docs/qc.md lists unknown codes: {table_codes - codes}"


def _config_keys(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, leaf name) of every key of the configuration, sections included."""
    for key, value in node.items():
        yield prefix + key, key
        if isinstance(value, Mapping):
            yield from _config_keys(value, f"{prefix}{key}.")


def test_every_config_key_is_documented(docs: str) -> None:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    missing = [dotted for dotted, leaf in _config_keys(config)
               if not (_code(leaf, docs) or _code(dotted, docs))]
    assert not missing, f"config keys not documented in docs/: {missing}"


def test_every_label_is_documented(docs: str) -> None:
    for value, name in labels.LABEL_NAMES.items():
        assert re.search(rf"^\| {value} \| {re.escape(name)} \|", docs, flags=re.M), (
            f"label {value} ({name}) has no row in the label table of docs/design.md")
    missing = [s for s in labels.STRUCTURES if not _code(s, docs)]
    assert not missing, f"structures not documented: {missing}"


def _citing_files() -> Iterator[Path]:
    for name in CITING:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (p for p in path.rglob("*") if p.is_file()
                        and p.suffix in {".py", ".smk", ".yaml", ".yml", ".html", ".rst",
                                         ".md", ".tsv"})


def _headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip().lower()
            for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def test_cited_docs_exist() -> None:
    cited = 0
    problems = []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in CITATION.finditer(text):
            cited += 1
            doc, section = ROOT / match.group(1), match.group(2)
            where = f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
            if not doc.is_file():
                problems.append(f"{where}: no such file")
            elif section and not any(section.lower() in h for h in _headings(doc)):
                problems.append(f"{where}: no heading containing {section!r}")
    assert cited, "no citation of docs/ found: is the pattern still right?"
    assert not problems, "\n".join(problems)


#: A path of the package named in docs/: a file (``pipeline/qc.py``, ``pipeline/data/x.json``)
#: or a module's attribute (``pipeline/qc.unavailable``).
CODE_PATH = re.compile(r"\bpipeline/[\w/]+(?:\.\w+)?")


def test_code_cited_in_docs_exists(docs: str) -> None:
    missing = []
    for cited in sorted(set(CODE_PATH.findall(docs))):
        path = ROOT / cited
        if path.exists():
            continue
        module, _, attribute = cited.rpartition(".")
        if (ROOT / f"{module}.py").is_file():
            imported = importlib.import_module(module.replace("/", "."))
            if hasattr(imported, attribute):
                continue
        missing.append(cited)
    assert not missing, f"docs/ cite code that does not exist: {missing}"


def test_readme_links_the_documentation() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("docs/design.md", "docs/outputs.md", "docs/qc.md"):
        assert f"({name})" in readme, f"README.md does not link {name}"
