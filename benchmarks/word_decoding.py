#!/usr/bin/env python
"""Word decoding speed, memory and WER: the lexicon + n-gram beam search (word_decoding/)
on the phoneme log-probabilities of a trained CTC baseline, for two language models:

  embedded  the default: lexicon and 3-gram from the run's training transcriptions
  large     a 3-gram from N sentences (default 100,000) of the synthetic data's sentence generator
            (harness.sentences), none of them a val or test sentence, plus the training transcriptions
  large+cmu the same LM with every word of the CMU dictionary in the lexicon (about 125,000 words, as
            many as a real-corpus LM knows; the LM scores the words it never saw as <unk>): the cost
            of a realistic lexicon size, which the 330-word generator does not show

For each LM, one subprocess pinned to one CPU core (torch on 1 thread; flashlight's search is
single-threaded) builds one decoder per beam size (plus the default beam with LM weight 0) and decodes
the val split with each, the decoders taking turns pass by pass; a pass is every val trial once. It
reports the median pass time (sentences/s) and the val WER of each setting, the time to build the LM,
and the process's peak RSS (VmHWM) with the RSS before any decoder existed. The "chosen" beam is the
smallest whose WER is within 0.5 points of the best beam's.

Cores: one more subprocess, not pinned, decodes the val split at the published search settings
(configs/ctc_baseline/b2txt25.yml: 5-gram of the training transcriptions, beam 500, 100-best,
acoustic scale 0.325, blank penalty 90, beam threshold 17) in batches of 64 as a run does, with
`num_workers` 1 (the search in this process, one trial after another) and 2, 4, ... up to the cores
available (word_decoding.parallel's worker processes), the settings taking turns repeat by repeat.
It reports the median sentences/s of each, the ratio to 1 worker, the CPU time of a pass (this
process and the workers) and the cores it kept busy, and whether every text is identical to the
1-worker text. Pools start before the timing (their start is reported apart).

    .venv/bin/python benchmarks/word_decoding.py --run RUN_DIR      # a finished ctc_baseline run folder
    .venv/bin/python benchmarks/word_decoding.py --run RUN_DIR --beams 10 50 200 --passes 3 --sentences 20000
    .venv/bin/python benchmarks/word_decoding.py --run RUN_DIR --lms --workers 1 2 --repeats 3   # cores only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import ctc_baseline  # noqa: E402,F401  (registers the model)
import harness.preprocessors  # noqa: E402,F401  (registers the preprocessors its configs name)
from config import ComponentSpec, load_config, typed_spec  # noqa: E402
from ctc_baseline.model import CTCBaseline  # noqa: E402
from harness.batching import collate, eval_batches  # noqa: E402
from harness.data import FeatureStore, read_trials  # noqa: E402
from harness.evaluation import apply_preprocessors  # noqa: E402
from harness.metrics import bootstrap_ci, word_edits  # noqa: E402
from harness.pronounce import cmu_dict  # noqa: E402
from harness.runner import build_preprocessors, load_any_checkpoint  # noqa: E402
from harness.sentences import generate_sentence, sentence_key  # noqa: E402
from registry import WORD_DECODERS  # noqa: E402
from word_decoding.decoders import build_word_decoder, cached_lm, lm_text  # noqa: E402
from word_decoding.parallel import available_cores  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
LMS = ["embedded", "large", "large+cmu"]
# the search settings of configs/ctc_baseline/b2txt25.yml (the reference's), for the cores table
PUBLISHED = {"lm_order": 5, "beam_size": 500, "nbest": 100, "acoustic_scale": 0.325, "blank_penalty": 90.0,
             "beam_threshold": 17.0, "lm_weight": 1.0}
REFERENCE = {"3-gram RAM": "about 60 GB", "5-gram RAM": "about 300 GB",
             "5-gram + OPT-6.7B": "0.6-0.8 s per sentence (1.3-1.7 sentences/s) on an RTX 4090, 12.4 GB GPU"}


# ----------------------------------------------------------------------------------------------
# Inputs: the run's val log-probabilities, its training transcriptions, the large corpus


def val_log_probs(run_dir: Path, split: str = "val") -> dict:
    """Log-softmax outputs (valid frames) of every trial of `split`, decoded with the run's best weights."""
    payload, path = load_any_checkpoint(run_dir)
    config = load_config(data=payload["config"])
    config.model_params.word_decoder = ComponentSpec("greedy")  # phonemes only: the benchmark decodes the words
    dp = config.data_params
    trials = read_trials(dp.data_dir, dp.sessions, split, dp.n_features)
    trials = [t for t in trials if t.n_time_steps >= config.model_params.patch_size]
    model = CTCBaseline(config.model_params)
    model.load_state_dict(payload["model"])
    model.eval()
    store, preprocessors = FeatureStore(trials, "memory"), build_preprocessors(config)
    log_probs, references = [], []
    with torch.no_grad():
        for chunk in eval_batches(trials, 64):
            batch = apply_preprocessors(collate([(trials[i], store[i]) for i in chunk]), preprocessors, training=False)
            logits, lengths = model(batch.features, batch.lengths, batch.day_indices)
            for row, n in zip(logits.float().log_softmax(-1).numpy(), lengths.tolist()):
                log_probs.append(row[:n])
            references += [trials[i].sentence for i in chunk]
    train = [t.sentence for t in read_trials(dp.data_dir, dp.sessions, "train", dp.n_features)]
    held_out = [t.sentence for s in ("val", "test") for t in read_trials(dp.data_dir, dp.sessions, s, dp.n_features)
                if t.sentence]  # the test split is unlabeled here; with labels its sentences are excluded too
    return {"log_probs": log_probs, "references": references, "train": train, "held_out": held_out,
            "checkpoint": str(path), "data_dir": dp.data_dir}


def generated_corpus(n: int, exclude: list[str], seed: int = 12345) -> list[str]:
    """n generated sentences (repeats allowed, as in real text) that are not val/test sentences."""
    rng, banned, out = np.random.default_rng(seed), {sentence_key(s) for s in exclude}, []
    while len(out) < n:
        sentence = generate_sentence(rng)
        if sentence_key(sentence) not in banned:
            out.append(sentence)
    return out


# ----------------------------------------------------------------------------------------------
# One LM, in a subprocess pinned to one core


def vm_kib(field: str) -> int:
    # VmHWM/VmRSS, not ru_maxrss: Linux carries the parent's high-water mark across fork + exec into
    # ru_maxrss, so a subprocess of a big parent would report the parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(job: dict) -> dict:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    inputs = np.load(job["inputs"], allow_pickle=True)
    log_probs = [torch.from_numpy(x)[None] for x in inputs["log_probs"]]
    references = list(inputs["references"])
    train = list(inputs["train"])
    settings = [{"beam_size": b, "lm_weight": job["lm_weight"]} for b in sorted(job["beams"], reverse=True)]
    settings.append({"beam_size": job["default_beam"], "lm_weight": 0.0})
    specs = [ComponentSpec("lexicon_ngram", {**job["params"], **setting}) for setting in settings]
    out = {"lm": job["name"], "n_sentences": len(references), "rss_start_mb": vm_kib("VmRSS") / 1024}

    # 1. the LM alone (built from text, as a run does the first time; cached after)
    first = typed_spec(WORD_DECODERS, specs[0], "word_decoder").params
    start = time.perf_counter()
    lm_file = cached_lm(lm_text(first, train), first.lm_order, Path(job["cache_dir"], "word_decoding"))
    out.update(lm_build_s=time.perf_counter() - start, lm_build_peak_rss_mb=vm_kib("VmHWM") / 1024,
               lm_file_mb=lm_file.stat().st_size / 1e6)

    # 2. one decoder (the largest beam), as a run holds it: its peak over building and one pass
    out["peak_reset"] = reset_peak_rss()
    rss_before = vm_kib("VmRSS")
    start = time.perf_counter()
    decoders = [build_word_decoder(specs[0], train, job["cache_dir"])]
    out["decoder_build_s"] = time.perf_counter() - start
    for x in log_probs:
        decoders[0].decode(x, [x.shape[1]])
    out.update(rss_before_decoder_mb=rss_before / 1024, peak_rss_one_decoder_mb=vm_kib("VmHWM") / 1024,
               vocabulary=len(decoders[0].vocabulary))

    # 3. every setting, taking turns pass by pass
    decoders += [build_word_decoder(spec, train, job["cache_dir"]) for spec in specs[1:]]
    times, texts = [[] for _ in settings], [None] * len(settings)
    for p in range(job["passes"]):
        for k in [(i + p) % len(settings) for i in range(len(settings))]:  # rotate the order every pass
            start = time.perf_counter()
            texts[k] = [decoders[k].decode(x, [x.shape[1]])[0] for x in log_probs]
            times[k].append(time.perf_counter() - start)
    out["rows"] = []
    for setting, pass_times, hyps in zip(settings, times, texts):
        edits, counts = zip(*(word_edits(r, h) for r, h in zip(references, hyps)))
        median = statistics.median(pass_times)
        out["rows"].append({**setting, "wer": sum(edits) / sum(counts), "wer_ci": bootstrap_ci(edits, counts, 2000),
                            "median_pass_s": median, "sentences_per_s": len(references) / median,
                            "ms_per_sentence": 1000 * median / len(references)})
    return out


def cores_worker(job: dict) -> dict:
    """The val split decoded in batches by one decoder per worker count; median sentences/s of each."""
    torch.set_num_threads(1)  # this process pads and waits; the search runs in it only for 1 worker
    inputs = np.load(job["inputs"], allow_pickle=True)
    log_probs, references, train = list(inputs["log_probs"]), list(inputs["references"]), list(inputs["train"])
    batches = []
    for start in range(0, len(log_probs), job["batch_size"]):  # padded (B, T, 41) and lengths, as a model passes
        rows = [torch.from_numpy(x) for x in log_probs[start:start + job["batch_size"]]]
        batches.append((torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), [len(r) for r in rows]))
    out = {"n_sentences": len(references), "params": job["params"], "cores": available_cores(), "rows": []}
    decoders, first_call = {}, {}
    for k in job["workers"]:
        start = time.perf_counter()
        decoders[k] = build_word_decoder(ComponentSpec("lexicon_ngram", {**job["params"], "num_workers": k}), train,
                                         job["cache_dir"])
        out.setdefault("first_build_s", time.perf_counter() - start)  # the first one builds the LM too
        start = time.perf_counter()
        decoders[k].decode(*batches[0])  # starts the pool: the first call's extra cost, outside the timing
        first_call[k] = time.perf_counter() - start
    times, cpu, texts, stable = {k: [] for k in decoders}, {k: [] for k in decoders}, {}, True
    for p in range(job["repeats"]):
        for k in job["workers"][p % len(decoders):] + job["workers"][:p % len(decoders)]:  # rotate every repeat
            start, start_cpu = time.perf_counter(), cpu_seconds()
            decoded = [text for batch in batches for text in decoders[k].decode(*batch)]
            times[k].append(time.perf_counter() - start)
            cpu[k].append(cpu_seconds() - start_cpu)
            stable &= texts.setdefault(k, decoded) == decoded
    for decoder in decoders.values():
        decoder.close()
    baseline = statistics.median(times[1])
    edits, counts = zip(*(word_edits(r, h) for r, h in zip(references, texts[1])))
    out.update(wer=sum(edits) / sum(counts), repeats_identical=stable)
    for k in job["workers"]:
        median = statistics.median(times[k])
        out["rows"].append({"workers": k, "median_pass_s": median, "pass_s": times[k],
                            "sentences_per_s": len(references) / median, "ratio": baseline / median,
                            "cpu_s": statistics.median(cpu[k]), "cores_used": statistics.median(
                                c / t for c, t in zip(cpu[k], times[k])),
                            "first_call_s": first_call[k], "text_identical": texts[k] == texts[1]})
    return out


def cpu_seconds() -> float:
    """CPU time so far of this process and its children (the pools' workers, idle ones included)."""
    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def default_workers() -> list[int]:
    """1, 2, 4, ... and the cores available (1 is the serial baseline)."""
    counts, cores = [1], available_cores()
    while counts[-1] * 2 < cores:
        counts.append(counts[-1] * 2)
    return counts + [cores] if cores > 1 else counts


# The cores job runs this file through `python -c` rather than as a script: the search's worker processes
# start with "spawn", which re-imports a script __main__ (this one imports torch and the model) in every
# worker, whereas `main.py`, the __main__ of a real run, imports almost nothing. Under `-c` there is no
# __main__ file, so the workers import what a run's do (word_decoding, without torch).
AS_MODULE = "import runpy, sys; sys.exit(runpy.run_path(sys.argv[1], run_name='word_decoding_bench')['main'](sys.argv[2:]))"


def run_worker(job: dict) -> dict:
    command = [sys.executable, "-c", AS_MODULE, __file__] if job["name"] == "cores" else [sys.executable, __file__]
    result = subprocess.run([*command, "--worker", json.dumps(job)], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"worker {job['name']} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def chosen(rows: list[dict], lm_weight: float) -> dict:
    """The smallest beam within 0.5 WER points of the best beam (LM-weight-0 row excluded)."""
    searched = [r for r in rows if r["lm_weight"] == lm_weight]
    best = min(r["wer"] for r in searched)
    return min((r for r in searched if r["wer"] <= best + 0.005), key=lambda r: r["beam_size"])


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished ctc_baseline run folder (its best checkpoint is used)")
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 25, 50, 100, 200, 500, 1000])
    ap.add_argument("--default-beam", type=int, default=200, help="the beam of the LM-weight-0 row (the configs')")
    ap.add_argument("--passes", type=int, default=5, help="timed passes over the val split per setting")
    ap.add_argument("--sentences", type=int, default=100_000, help="generated sentences for the large LM")
    ap.add_argument("--lms", nargs="*", choices=LMS, default=LMS, help="the one-core tables (none: --lms alone)")
    ap.add_argument("--params", default="{}", help="JSON: lexicon_ngram params for every setting (e.g. acoustic_scale)")
    ap.add_argument("--workers", type=int, nargs="*", default=None,
                    help="num_workers values of the cores table (default 1, 2, 4, ... up to the cores; none: "
                         "--workers alone; 1 is always added)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the val split per worker count")
    ap.add_argument("--cores-params", default="{}", help="JSON: changes to the published settings, for the cores table")
    ap.add_argument("--batch-size", type=int, default=64, help="trials per decode call in the cores table (eval_batch_size)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one LM's subprocess
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(RESULT_TAG + json.dumps(cores_worker(job) if job["name"] == "cores" else worker(job)), flush=True)
        return 0
    if not args.run:
        ap.error("--run RUN_DIR is required (a finished ctc_baseline run, e.g. from `make ctc-baseline`)")

    data = val_log_probs(Path(args.run))
    params = {"lm_order": 3, **json.loads(args.params)}
    lm_weight = float(params.pop("lm_weight", 1.0))
    results = {"date": datetime.date.today().isoformat(), "machine": platform_summary(), "run": args.run,
               "checkpoint": data["checkpoint"], "params": params, "lm_weight": lm_weight, "lms": [],
               "reference": REFERENCE}
    print(f"{len(data['references'])} val trials of {data['data_dir']}; {len(data['train'])} training transcriptions")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.npz"
        log_probs = np.empty(len(data["log_probs"]), dtype=object)
        log_probs[:] = data["log_probs"]
        np.savez(inputs, log_probs=log_probs, references=np.array(data["references"]), train=np.array(data["train"]))
        corpus, cmu_words = Path(tmp) / "corpus.txt", Path(tmp) / "cmu_words.txt"
        if {"large", "large+cmu"} & set(args.lms):
            start = time.perf_counter()
            corpus.write_text("\n".join(generated_corpus(args.sentences, data["held_out"])) + "\n")
            print(f"generated {args.sentences} sentences in {time.perf_counter() - start:.1f} s")
        if "large+cmu" in args.lms:
            cmu_words.write_text("\n".join(cmu_dict()) + "\n")
        for name in args.lms:
            job_params = dict(params)
            if name != "embedded":
                job_params["corpus_files"] = [str(corpus)]
            if name == "large+cmu":
                job_params["words_file"] = str(cmu_words)
            job = {"name": name, "inputs": str(inputs), "params": job_params, "lm_weight": lm_weight,
                   "beams": args.beams, "default_beam": args.default_beam, "passes": args.passes,
                   "cache_dir": str(Path(tmp) / f"cache-{name}")}
            result = run_worker(job)
            result["chosen_beam"] = chosen(result["rows"], lm_weight)["beam_size"]
            results["lms"].append(result)
            print_lm(result, name, args.sentences)
        workers = default_workers() if args.workers is None else args.workers
        if workers:
            job = {"name": "cores", "inputs": str(inputs), "params": {**PUBLISHED, **json.loads(args.cores_params)},
                   "workers": sorted({1, *workers}), "repeats": args.repeats, "batch_size": args.batch_size,
                   "cache_dir": str(Path(tmp) / "cache-cores")}
            results["cores"] = run_worker(job)
            print_cores(results["cores"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_lm(result: dict, name: str, n_sentences: int) -> None:
    what = "training transcriptions" if name == "embedded" else f"{n_sentences:,} generated sentences + training transcriptions"
    what += ", every CMU word in the lexicon" if name == "large+cmu" else ""
    print(f"\n## {name}: 3-gram of {what}; vocabulary {result['vocabulary']} words, ARPA {result['lm_file_mb']:.1f} MB "
          f"built in {result['lm_build_s']:.1f} s (peak RSS {result['lm_build_peak_rss_mb']:.0f} MB)")
    print(f"one decoder (beam {max(r['beam_size'] for r in result['rows'])}): built in {result['decoder_build_s']:.1f} s, "
          f"peak RSS {result['peak_rss_one_decoder_mb']:.0f} MB (RSS before it {result['rss_before_decoder_mb']:.0f} MB"
          f"{'' if result['peak_reset'] else '; peak not reset: includes the LM build'})")
    print(f"{result['n_sentences']} val sentences per pass, median of the passes, one core")
    print("| beam | LM weight | val WER [95% CI] | sentences/s | ms/sentence |")
    print("|---|---|---|---|---|")
    for r in sorted(result["rows"], key=lambda r: (-r["lm_weight"], r["beam_size"])):
        mark = " (chosen)" if r["beam_size"] == result["chosen_beam"] and r["lm_weight"] != 0 else ""
        ci = f"[{r['wer_ci'][0]:.3f}, {r['wer_ci'][1]:.3f}]" if r["wer_ci"] else ""
        print(f"| {r['beam_size']}{mark} | {r['lm_weight']:g} | {r['wer']:.3f} {ci} | {r['sentences_per_s']:.0f} | "
              f"{r['ms_per_sentence']:.1f} |")


def print_cores(result: dict) -> None:
    p = result["params"]
    print(f"\n## cores: {p['lm_order']}-gram of the training transcriptions, beam {p['beam_size']}, {p['nbest']}-best, "
          f"acoustic scale {p['acoustic_scale']:g}, blank penalty {p['blank_penalty']:g}, beam threshold "
          f"{p['beam_threshold']:g}; {result['n_sentences']} val sentences per pass in batches, median of "
          f"{len(result['rows'][0]['pass_s'])} passes; {result['cores']} cores available; val WER {result['wer']:.3f}; "
          f"LM and first decoder built in {result['first_build_s']:.1f} s")
    print("| workers | sentences/s | x 1 worker | median pass | CPU per pass | cores used | first batch (with the pool "
          "start) | text identical to 1 worker |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        name = "1 (in-process)" if r["workers"] == 1 else str(r["workers"])
        print(f"| {name} | {r['sentences_per_s']:.1f} | {r['ratio']:.2f} | {r['median_pass_s']:.2f} s | {r['cpu_s']:.2f} s | "
              f"{r['cores_used']:.2f} | {r['first_call_s']:.2f} s | {'yes' if r['text_identical'] else 'NO'} |")
    same = all(r["text_identical"] for r in result["rows"]) and result["repeats_identical"]
    print(f"text identical across worker counts and repeats: {'yes' if same else 'NO'}")
    print("(cores used = CPU time / wall time: below the worker count, the workers waited for a core; on a shared "
          "machine, Linux's autogroup scheduling gives each session an equal share of the cores)")


def platform_summary() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
