import subprocess
import sys

import pytest

from harness.errors import UserError
from harness.plugins import PluginImportError, load_plugins, plugin_names
from registry import DuplicateRegistrationError, Registry
from tests.conftest import REPO_ROOT


def test_name_defaults_to_function_name_and_lookup_works():
    r = Registry("thing")

    @r.register()
    def alpha():
        return 1

    @r.register("beta_custom")
    def beta():
        return 2

    assert r.names() == ["alpha", "beta_custom"]
    assert r.get("alpha") is alpha and r.get("beta_custom") is beta


def test_duplicate_raises_and_names_both_definitions():
    r = Registry("model constructor")

    @r.register("same")
    def first():
        pass

    with pytest.raises(DuplicateRegistrationError) as info:
        @r.register("same")
        def second():
            pass

    message = str(info.value)
    assert "'same'" in message and "first" in message and "second" in message
    assert "test_registry.py" in message  # where each definition lives


def test_unknown_name_lists_registered_and_suggests_closest():
    r = Registry("model constructor")
    for name in ["ctc_baseline", "gru_align", "llm_decoder"]:
        r.register(name)(lambda: None)
    with pytest.raises(UserError) as info:
        r.get("ctc_basline")
    message = str(info.value)
    assert "did you mean 'ctc_baseline'" in message
    assert "ctc_baseline, gru_align, llm_decoder" in message


def test_bare_decorator_is_refused():
    r = Registry("config setter")
    with pytest.raises(TypeError, match="parentheses"):
        @r.register
        def oops():
            pass


def test_plugin_folders_are_found_without_editing_main(tmp_path):
    (tmp_path / "my_model").mkdir()
    (tmp_path / "my_model" / "__init__.py").write_text("")
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "__init__.py").write_text("")
    (tmp_path / "not_a_package").mkdir()
    assert plugin_names(tmp_path)[:1] == ["my_model"]
    assert "harness" not in plugin_names(tmp_path) and "not_a_package" not in plugin_names(tmp_path)


def _run_main(args, cwd, env_plugins=""):
    env = {"PATH": "/usr/bin:/bin", "B2T_PLUGINS": env_plugins, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, str(cwd / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


def _repo_copy(tmp_path):
    """A copy of the code (no data, no venv) where a plugin folder can be added."""
    dst = tmp_path / "repo"
    import shutil

    shutil.copytree(REPO_ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "data", "results", ".cache",
                                                                  "__pycache__", "*.hdf5"))
    return dst


def test_new_folder_registers_and_list_shows_it(tmp_path):
    repo = _repo_copy(tmp_path)
    (repo / "zz_new_model").mkdir()
    (repo / "zz_new_model" / "__init__.py").write_text(
        "from registry import Registry, register_model_constructor\n"
        "@register_model_constructor()\n"
        "def zz_brand_new(params, ctx):\n    pass\n"
        "GADGETS = Registry('zz gadget')\n"  # a model folder's own registry is listed too
        "@GADGETS.register()\n"
        "def zz_sprocket():\n    pass\n")
    result = _run_main(["list"], repo)
    assert result.returncode == 0, result.stderr
    assert "model constructors:" in result.stdout and "zz_brand_new" in result.stdout
    assert "zz gadgets:\n  zz_sprocket" in result.stdout
    assert "config setters:" in result.stdout and "data preprocessors:" in result.stdout


def test_plugin_import_error_stops_with_folder_name(tmp_path):
    repo = _repo_copy(tmp_path)
    (repo / "zz_broken").mkdir()
    (repo / "zz_broken" / "__init__.py").write_text("import package_that_does_not_exist_xyz\n")
    result = _run_main(["list"], repo)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "zz_broken" in last and "package_that_does_not_exist_xyz" in last
    assert "Traceback" in result.stderr  # the original error is shown, not swallowed


def test_plugin_import_error_is_raised_in_process(tmp_path, monkeypatch):
    (tmp_path / "bad_plugin").mkdir()
    (tmp_path / "bad_plugin" / "__init__.py").write_text("raise RuntimeError('boom in plugin')\n")
    import harness.plugins as plugins

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setenv("B2T_PLUGINS", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginImportError, match="bad_plugin.*boom in plugin"):
        load_plugins(tmp_path)
    monkeypatch.setattr(plugins, "_loaded", False)
