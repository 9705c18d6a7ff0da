"""The one Jinja2 environment of limbtrack's HTML pages (report, cohort).

Autoescaping is on for every template: text from DICOM headers, file names and logs renders
as text, never as markup.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"


@cache
def environment() -> jinja2.Environment:
    """The shared template environment (autoescape, strict undefined variables)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template_name: str, **context: Any) -> str:
    """Render `template_name` from ``pipeline/report/templates`` with `context`."""
    return environment().get_template(template_name).render(**context)
