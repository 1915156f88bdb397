"""The "Adding a model" section of the README is complete: its files, copied verbatim into a copy of
the repository, register a model that `python main.py run` trains to a finished run folder."""

import re
import shutil
import subprocess
import sys

from tests.conftest import REPO_ROOT


def readme_files() -> dict[str, str]:
    """Fenced code blocks whose first line is `# file: PATH`."""
    text = (REPO_ROOT / "README.md").read_text()
    files = {}
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", text, flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            files[first[len("# file: "):].strip()] = block
    return files


def test_readme_model_folder_runs_end_to_end(small_dataset, tmp_path):
    files = readme_files()
    assert set(files) == {"linear_ctc/__init__.py", "configs/linear_ctc/linear_ctc.yml"}
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "data", "results", ".cache",
                                                                   "__pycache__", "linear_ctc"))
    for path, content in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(content)
    env = {"PATH": "/usr/bin:/bin", "B2T_PLUGINS": ""}
    listed = subprocess.run([sys.executable, "main.py", "list"], cwd=repo, capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "linear_ctc  (params: LinearCTCParams)" in listed.stdout and "linear_ctc_setter" in listed.stdout
    result = subprocess.run(
        [sys.executable, "main.py", "run", "--config", "configs/linear_ctc/linear_ctc.yml",
         "--set", f"data_params.data_dir={small_dataset}", "--set", "training_params.num_steps=6",
         "--set", "training_params.val_every=3", "--set", "evaluation.bootstrap_resamples=100",
         "--out", str(tmp_path / "run")],
        cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "DONE").is_file()
    assert "predicted_phonemes" in (tmp_path / "run" / "per_trial.csv").read_text().splitlines()[0]
