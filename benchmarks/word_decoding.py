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

    .venv/bin/python benchmarks/word_decoding.py --run RUN_DIR      # a finished ctc_baseline run folder
    .venv/bin/python benchmarks/word_decoding.py --run RUN_DIR --beams 10 50 200 --passes 3 --sentences 20000
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

RESULT_TAG = "BENCH_RESULT "
LMS = ["embedded", "large", "large+cmu"]
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
    store, preprocessors = FeatureStore(trials, preload=True), build_preprocessors(config)
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


def run_worker(job: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
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
    ap.add_argument("--lms", nargs="+", choices=LMS, default=LMS)
    ap.add_argument("--params", default="{}", help="JSON: lexicon_ngram params for every setting (e.g. acoustic_scale)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one LM's subprocess
    args = ap.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
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


def platform_summary() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
