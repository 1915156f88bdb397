"""The repository's layering: model folders import the harness and the shared packages, never each
other; the harness and the shared packages never import a model folder. The old module paths of the
0.2.0 reorganisation still import, with a DeprecationWarning."""

import ast
import importlib
import sys

import pytest

from harness.plugins import plugin_names
from tests.conftest import REPO_ROOT

SHARED_ENCODER = "gru_decoder"  # the GRU encoder every model builds on: shared, not a model folder
# Shared code: may import the harness and each other, never a model folder.
SHARED = ["harness", "word_decoding", "alignment", SHARED_ENCODER, "registry.py", "config.py", "main.py"]


def model_folders() -> list[str]:
    """Top-level folders plugin_names() finds (not B2T_PLUGINS modules elsewhere, such as tests.tiny_plugin)."""
    return sorted(name for name in plugin_names(REPO_ROOT)
                  if "." not in name and (REPO_ROOT / name).is_dir() and name != SHARED_ENCODER)


def imported_modules(path):
    """(line, module name) of every absolute import in a file, at any depth (functions, classes,
    try blocks), plus importlib.import_module("...") / __import__("...") with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:  # relative imports stay inside their own package
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def python_files(entry: str):
    path = REPO_ROOT / entry
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def violations(entries, forbidden_for) -> list[str]:
    """'file:line: import X' for every import of a top-level package in forbidden_for(entry)."""
    found = []
    for entry in entries:
        forbidden = forbidden_for(entry)
        for path in python_files(entry):
            for line, module in imported_modules(path):
                if module.split(".")[0] in forbidden:
                    found.append(f"{path.relative_to(REPO_ROOT)}:{line}: import {module}")
    return found


def test_the_layout_sees_the_model_folders_and_every_import_form(tmp_path):
    folders = model_folders()
    assert {"ctc_baseline", "audio_alignment", "llm_decoder"} <= set(folders)
    assert SHARED_ENCODER not in folders
    probe = tmp_path / "probe.py"
    probe.write_text("import a.b\nfrom c.d import e\nfrom . import f\n"
                     "def g():\n    import h\n    from i import j\n    importlib.import_module('k.l')\n")
    assert list(imported_modules(probe)) == [(1, "a.b"), (2, "c.d"), (5, "h"), (6, "i"), (7, "k.l")]


def test_model_folders_never_import_each_other():
    folders = model_folders()
    found = violations(folders, lambda folder: set(folders) - {folder})
    assert not found, "a model folder imports another model folder (move the shared code to a shared " \
                      "package):\n" + "\n".join(found)


def test_harness_and_shared_packages_never_import_a_model_folder():
    found = violations(SHARED, lambda entry: set(model_folders()))
    assert not found, "shared code imports a model folder:\n" + "\n".join(found)


@pytest.mark.parametrize("old, new_home", [
    ("ctc_baseline.word_decoding", "word_decoding"),
    ("ctc_baseline.preprocess", "harness.preprocessors"),
    ("audio_alignment.targets", "alignment.targets"),
])
def test_deprecated_paths_still_import_with_a_warning(old, new_home):
    importlib.import_module(old.split(".")[0])  # the model folder itself warns about nothing
    sys.modules.pop(old, None)  # so that the module body (and its warning) runs again
    with pytest.warns(DeprecationWarning, match=new_home.replace(".", r"\.")):
        module = importlib.import_module(old)
    new = importlib.import_module(new_home)
    shared = [name for name in dir(module) if not name.startswith("_") and hasattr(new, name)]
    assert shared and all(getattr(module, name) is getattr(new, name) for name in shared)
