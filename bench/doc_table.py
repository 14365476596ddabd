"""Tables the benches write into the docs: the text between a pair of markers, replaced by a table made
from a results file (so no figure in the docs is typed by hand); and the commit a results file records.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def short_commit() -> str:
    """The repository's HEAD as `git rev-parse --short` prints it ('' outside a git checkout)."""
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return run.stdout.strip()


def write_between(doc: Path, markers: tuple[str, str], table: str) -> None:
    """Replace what stands between markers[0] and markers[1] in `doc` by `table`."""
    text = doc.read_text()
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    doc.write_text(text[:start] + "\n" + table + "\n" + text[end:])
