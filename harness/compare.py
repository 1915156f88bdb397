"""`main.py compare`: finished runs side by side, from their run folders only.

Runs without `DONE` are listed as unfinished and left out. Runs whose data fingerprints differ are
refused unless --force (and the output then says so).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import results
from harness.errors import UserError

METRICS = ("per", "wer", "cer")


def find_runs(results_dir: Path) -> list[Path]:
    """Every folder under results_dir that looks like a run (has config.yaml)."""
    if not results_dir.is_dir():
        return []
    return sorted(p.parent for p in results_dir.rglob("config.yaml"))


def load_run(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    meta = json.loads((run_dir / "meta.json").read_text())
    return {"dir": run_dir, "metrics": metrics, "meta": meta}


def fingerprint_key(run: dict) -> str:
    fp = run["meta"].get("data_fingerprint") or {}
    return f"{fp.get('keys_hash')}/{fp.get('content_hash')}"


def compare(run_dirs: list[str], out: str, results_dir: str = "results", force: bool = False) -> Path:
    dirs = [Path(d) for d in run_dirs] or [d for d in find_runs(Path(results_dir)) if Path(out) not in d.parents]
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise UserError(f"run folder not found: {missing[0]}")
    unfinished = [d for d in dirs if not results.is_finished(d)]
    runs = [load_run(d) for d in dirs if results.is_finished(d)]
    for d in unfinished:
        print(f"unfinished (no DONE), left out: {d}")
    if not runs:
        raise UserError(f"no finished run to compare (looked in {', '.join(run_dirs) or results_dir})")
    fingerprints = {fingerprint_key(r) for r in runs}
    if len(fingerprints) > 1 and not force:
        raise UserError("these runs read different data (data fingerprints differ in meta.json): "
                        "compare runs on identical data, or pass --force")
    table = summary_rows(runs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results.atomic_write_text(out_dir / "comparison.csv", results.rows_to_csv(table))
    note = "**Warning: compared with --force although the runs read different data.**\n\n" if len(fingerprints) > 1 else ""
    unfinished_note = "".join(f"- unfinished, left out: `{d}`\n" for d in unfinished)
    results.atomic_write_text(out_dir / "comparison.md", "# Comparison\n\n" + note + to_markdown(table) + "\n" + unfinished_note)
    print(to_markdown(table))
    print(f"wrote {out_dir / 'comparison.md'} and {out_dir / 'comparison.csv'}")
    return out_dir


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        info = run["metrics"].get("run", {})
        for split, m in run["metrics"].items():
            if split == "run" or not isinstance(m, dict):
                continue
            row = {"run": run["dir"].name, "decoder": info.get("model"), "split": split, "n_trials": m.get("n_trials")}
            for key in METRICS:
                row[key] = m.get(key)
                ci = m.get(f"{key}_ci")
                row[f"{key}_ci"] = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else None
            for key in ("retrieval_top1", "retrieval_top10"):
                if key in m:
                    row[key] = m[key]
            row["wall_seconds"] = run["meta"].get("wall_seconds")
            rows.append(row)
    return rows


def _columns(table: list[dict]) -> list[str]:
    columns = []
    for row in table:
        columns += [k for k in row if k not in columns]
    return columns


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(table: list[dict]) -> str:
    columns = _columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"
