"""What pyproject.toml says about b2t-bench: its version and what running it needs.

pyproject.toml in the repository is the source of truth: b2t-bench always runs from its repository
(`python main.py`, or `b2t` from an editable install), and an editable install's metadata keeps the
values of the day it was installed. Without the file, the installed distribution's metadata answers.
"""

from __future__ import annotations

import functools
import re
import tomllib
from importlib import metadata
from pathlib import Path

DIST_NAME = "b2t-bench"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_EXTRA_MARKER = re.compile(r"\bextra\s*==")


@functools.cache
def _project() -> dict:
    try:
        with open(PYPROJECT, "rb") as f:
            return tomllib.load(f).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def version() -> str:
    """b2t-bench's version, e.g. '0.3.0.dev0'; 'unknown' with neither pyproject.toml nor an install."""
    found = _project().get("version")
    if found:
        return str(found)
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


def requirements() -> list[str]:
    """The requirement strings of what running b2t-bench needs ([project] dependencies; not the dev extra)."""
    project = _project()
    if "dependencies" in project:
        return [str(r) for r in project["dependencies"]]
    try:
        found = metadata.requires(DIST_NAME) or []
    except metadata.PackageNotFoundError:
        return []
    return [r for r in found if not _EXTRA_MARKER.search(r)]
