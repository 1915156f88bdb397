"""benchmarks/gpu_check.py (`make gpu-check`) has never run on a GPU; these runs keep its code paths
working where there is none: every item at toy sizes on the CPU (the CUDA-only one skipped), the
per-item subprocess route that a GPU run takes, and the one line it prints without a GPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
ROOT = SCRIPT.parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.slow
def test_every_item_runs_at_toy_size_on_the_cpu(tmp_path):
    done = run("--device", "cpu", "--tiny", "--out", str(tmp_path / "check"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| item | check | status | ms/step (median) | peak GPU MB | note |" in done.stdout
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["done"] and (tmp_path / "check.md").read_text().count("\n| ") == len(report["rows"]) + 1
    rows = report["rows"]
    assert sorted({r["item"] for r in rows}) == list("abcdefg")
    failed = [f"{r['name']}: {r['status']}\n{r.get('traceback', '')}" for r in rows if r["status"].startswith("FAILED")]
    assert not failed, "\n".join(failed)
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    assert [r["name"] for r in skipped] == ["compile recompilations: harness compile, packed encoder (the configs)"]
    assert all(r["status"].startswith("skipped: needs CUDA") for r in skipped)
    by_name = {r["name"]: r for r in rows}
    # the three CTC variants were compared with fp32, and trained the same number of steps
    precision = [r for r in rows if r["item"] == "a"]
    assert len(precision) == 3 and all(r["ms"] > 0 for r in precision)
    assert all("vs fp32: eval" in r["note"] for r in precision[1:])
    # the recompilation counter counted: the control exceeded the bound that the bucketed run kept
    bucketed = by_name["compile recompilations: static, pad_to_multiple 32"]["data"]
    control = by_name["compile recompilations: static, no padding (control)"]["data"]
    assert 0 < bucketed["total"] <= bucketed["bound"] < control["total"]
    assert by_name["packed vs padded encoder (valid steps)"]["data"]["max_abs_logit_diff"] <= 1e-4
    assert all(r["ms"] > 0 for r in rows if r["item"] in "cdefg")


def test_the_gpu_route_runs_each_item_in_its_own_process(gpu_check):
    args = gpu_check.parse_args(["--device", "cpu", "--tiny"])
    (item,) = gpu_check.selected(["g"])
    (row,) = gpu_check.run_item_subprocess(item, args, budget=60, log_file=None)
    assert row["item"] == "g" and row["status"] == "ok" and "gloo" in row["note"], row


def test_without_a_gpu_it_says_so_and_checks_nothing(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)  # as with CUDA_VISIBLE_DEVICES=""
    assert gpu_check.main(["--out", str(tmp_path / "check")]) == 0
    out = capsys.readouterr().out
    assert "no GPU here" in out and "nothing was checked" in out and out.count("\n") == 1
    assert not list(tmp_path.iterdir())
