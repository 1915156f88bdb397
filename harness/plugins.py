"""Find and import model folders so that their decorators fill the registries.

The shared component packages (the harness's preprocessors, word decoding, alignment) are imported
first, so every config can name their components. A model folder is any other top-level folder of
the repository that holds an `__init__.py`. Extra plugin modules (a folder elsewhere, or a test plugin) are named in the
environment variable `B2T_PLUGINS` (comma separated import names). An import error in a plugin is
never swallowed: it stops the program with the folder's name and the error.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Shared packages: components every model may use; imported first, never model folders themselves.
SHARED_PACKAGES = ["harness.preprocessors", "gru_decoder", "word_decoding", "alignment"]
NOT_PLUGINS = {"harness", "tests", "configs", "results", "benchmarks", "data", "docs",
               *(name.split(".")[0] for name in SHARED_PACKAGES)}


class PluginImportError(Exception):
    """A plugin folder failed to import; carries the folder name and the original error."""

    def __init__(self, plugin: str, error: BaseException):
        self.plugin = plugin
        super().__init__(f"model folder '{plugin}' failed to import: {type(error).__name__}: {error}")


def plugin_names(root: Path = REPO_ROOT) -> list[str]:
    found = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and (p / "__init__.py").is_file() and p.name not in NOT_PLUGINS and not p.name.startswith(".")
    )
    extra = [m.strip() for m in os.environ.get("B2T_PLUGINS", "").split(",") if m.strip()]
    return found + [m for m in extra if m not in found]


_loaded = False


def load_plugins(root: Path = REPO_ROOT) -> list[str]:
    """Import every plugin once; returns their names. Raises PluginImportError on the first failure."""
    global _loaded
    names = plugin_names(root)
    if _loaded:
        return names
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for name in SHARED_PACKAGES + names:
        try:
            importlib.import_module(name)
        except Exception as error:  # re-raised with the folder's name, original chained
            raise PluginImportError(name, error) from error
    _loaded = True
    return names


def plugin_records() -> list[dict]:
    """Which plugin modules this process loaded and from where, for meta.json and checkpoints:
    {"module", "file", "git_commit", "git_changed"} (the commit of the git repository holding the
    file, None outside one; git_changed: the plugin's folder has uncommitted or untracked changes,
    so the commit alone does not reproduce it). A plugin outside the repository is what `evaluate` must be told to load."""
    records = []
    for name in plugin_names() if _loaded else []:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        folder = str(Path(file).parent) if file else None
        records.append({"module": name, "file": file, "git_commit": _git_commit(folder) if folder else None,
                        "git_changed": _git_changed(folder) if folder else None})
    return records


@functools.cache
def _git_commit(folder: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


@functools.cache
def _git_changed(folder: str) -> bool | None:
    try:
        done = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--", "."], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None
