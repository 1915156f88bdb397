#!/usr/bin/env python
"""Target precompute throughput of the audio-aligned model: sentences per second through TTS, the
audio encoder, and the on-disk cache.

  offline     the default targets, espeak_ng + log_mel (configs' `model_params.targets` defaults), on
              the CPU whatever --device says (neither needs a GPU); plus the cache: filling an empty
              cache (compute + float16 write) and reading a full one back (every sentence a hit).
  full-size   mms_tts + qwen2_audio at the real architectures' shapes: VitsConfig() (the
              facebook/mms-tts-eng architecture) and Qwen2AudioEncoderConfig() (the audio tower of
              Qwen2-Audio: 32 layers, 1280 wide, 30 s windows) with RANDOM weights, since no weights can
              be downloaded here. They are saved to a temporary folder and loaded through the
              components' own from_pretrained path. Random VITS weights predict arbitrary durations, so
              the VITS speaking rate is scaled once to give the same mean audio length as espeak on
              the same sentences (the cost of VITS grows with the audio; Qwen2-Audio's does not: every
              sentence fills a 30 s window).

Sentences come from the synthetic corpus (harness.sentences, 3-8 words). Each figure is the median
over --repeats of sentences / seconds; stages are timed separately (TTS, then the encoder on its
audio) and together (what TargetMaker.__call__ does), in batches of --batch-size.

    .venv/bin/python benchmarks/target_precompute.py                      # CPU, about 4 min on 2 cores
    .venv/bin/python benchmarks/target_precompute.py --skip-full          # offline default only, about 45 s
    .venv/bin/python benchmarks/target_precompute.py --device cuda --dtype bfloat16 --full-sentences 64
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from alignment.cache import TargetCache  # noqa: E402
from alignment.targets import SAMPLE_RATE, TargetMaker, TargetParams, build_target_maker  # noqa: E402
from harness.sentences import unique_sentences  # noqa: E402


def corpus(n: int, seed: int = 0) -> list[str]:
    return unique_sentences(np.random.default_rng(seed), n)


def time_stages(maker: TargetMaker, sentences: list[str], repeats: int) -> dict:
    """Median sentences/s of the TTS alone, the encoder alone (on that audio) and both, in batches."""
    tts_rates, encoder_rates, total_rates = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        waveforms = [w for i in range(0, len(sentences), maker.batch_size)
                     for w in maker.tts(sentences[i:i + maker.batch_size])]
        middle = time.perf_counter()
        frames = [f for i in range(0, len(waveforms), maker.batch_size)
                  for f in maker.encoder(waveforms[i:i + maker.batch_size])]
        end = time.perf_counter()
        tts_rates.append(len(sentences) / (middle - start))
        encoder_rates.append(len(sentences) / (end - middle))
        total_rates.append(len(sentences) / (end - start))  # what TargetMaker.__call__ does: TTS, then encoder
    return {"targets": maker.name, "dim": maker.dim, "sentences": len(sentences), "repeats": repeats,
            "audio_s_per_sentence": float(np.mean([len(w) / SAMPLE_RATE for w in waveforms])),
            "frames_per_sentence": float(np.mean([len(f) for f in frames])),
            "tts_per_s": statistics.median(tts_rates), "encoder_per_s": statistics.median(encoder_rates),
            "end_to_end_per_s": statistics.median(total_rates)}


def time_cache(maker: TargetMaker, sentences: list[str], repeats: int) -> dict:
    """Median sentences/s filling an empty cache, and reading a full one back."""
    fill, read = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            TargetCache(root, maker).get(sentences, progress=False)
            middle = time.perf_counter()
            cache = TargetCache(root, maker)
            cache.get(sentences, progress=False)
            end = time.perf_counter()
            assert cache.hits == len(sentences) and cache.misses == 0
        fill.append(len(sentences) / (middle - start))
        read.append(len(sentences) / (end - middle))
    return {"fill_per_s": statistics.median(fill), "read_per_s": statistics.median(read)}


def time_log_mel_threads(maker: TargetMaker, sentences: list[str], repeats: int) -> dict:
    """Ablation: log_mel as shipped (its feature extraction on one torch thread) against the same
    code on torch's thread count, interleaved repeat by repeat on the same audio."""
    from alignment import encoders

    waveforms = maker.tts(sentences)
    batches = [waveforms[i:i + maker.batch_size] for i in range(0, len(waveforms), maker.batch_size)]
    rates: dict[str, list[float]] = {"one": [], "all": []}
    for _ in range(repeats):
        for variant in rates:
            context = encoders._one_torch_thread if variant == "one" else contextlib.nullcontext
            with mock.patch.object(encoders, "_one_torch_thread", context):
                start = time.perf_counter()
                for batch in batches:
                    maker.encoder(batch)
                rates[variant].append(len(sentences) / (time.perf_counter() - start))
    one, all_threads = statistics.median(rates["one"]), statistics.median(rates["all"])
    return {"threads": torch.get_num_threads(), "one_thread_per_s": one, "all_threads_per_s": all_threads,
            "ratio": one / all_threads}


def full_size_maker(folder: Path, device: str, dtype: str, batch_size: int, speaking_rate: float = 1.0) -> TargetMaker:
    params = TargetParams(tts={"name": "mms_tts", "params": {"model": str(folder / "vits"), "speaking_rate": speaking_rate}},
                          encoder={"name": "qwen2_audio", "params": {"model": str(folder / "qwen2_audio"), "dtype": dtype}},
                          device=device, batch_size=batch_size)
    return build_target_maker(params)  # resolves and checks the params


def save_random_full_size_models(folder: Path) -> None:
    """Randomly initialised models with the real architectures (no weights can be downloaded here)."""
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig, VitsConfig, VitsModel, VitsTokenizer

    torch.manual_seed(0)
    symbols = ["<pad>", "<unk>", " ", "'", "-", *"abcdefghijklmnopqrstuvwxyz", *"0123456"]  # 38, as mms-tts-eng
    (folder / "vits").mkdir(parents=True)
    (folder / "vits" / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    VitsTokenizer(str(folder / "vits" / "vocab.json"), language="eng", phonemize=False).save_pretrained(folder / "vits")
    VitsModel(VitsConfig(vocab_size=len(symbols))).save_pretrained(folder / "vits")
    # saved in bfloat16 (as Qwen2-Audio's own checkpoint) to halve the temporary file; loaded as float32
    Qwen2AudioEncoder(Qwen2AudioEncoderConfig()).to(torch.bfloat16).save_pretrained(folder / "qwen2_audio")


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = f"CPU {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, load average {load}"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def table(rows: list[dict]) -> str:
    lines = ["| targets | device | dtype | sentences x repeats | audio s / sentence | frames / sentence | "
             "TTS sentences/s | encoder sentences/s | end to end sentences/s | cache fill sentences/s | "
             "cache read sentences/s |", "|" + "---|" * 11]
    for r in rows:
        fill = f"{r['fill_per_s']:.3g}" if "fill_per_s" in r else "-"
        read = f"{r['read_per_s']:.0f}" if "read_per_s" in r else "-"
        lines.append(f"| {r['targets']} ({r['dim']}-d) | {r['device']} | {r['dtype']} | {r['sentences']} x {r['repeats']} | "
                     f"{r['audio_s_per_sentence']:.2f} | {r['frames_per_sentence']:.1f} | {r['tts_per_s']:.3g} | "
                     f"{r['encoder_per_s']:.3g} | {r['end_to_end_per_s']:.3g} | {fill} | {read} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="where the full-size models run: cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Qwen2-Audio's dtype")
    parser.add_argument("--sentences", type=int, default=200, help="offline default: sentences per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-sentences", type=int, default=2, help="full-size shapes: sentences per repeat")
    parser.add_argument("--full-repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="sentences per TTS/encoder call")
    parser.add_argument("--skip-full", action="store_true", help="only the offline default")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# target precompute, {datetime.date.today()}: {machine(args.device)}", flush=True)
    rows = []
    sentences = corpus(args.sentences)
    offline = build_target_maker(TargetParams(batch_size=args.batch_size))
    offline(sentences[:4])  # warm-up: library and feature-extractor set-up
    row = {**time_stages(offline, sentences, args.repeats), **time_cache(offline, sentences, args.repeats),
           "device": "cpu", "dtype": "float32"}
    rows.append(row)
    print(table(rows), flush=True)
    threads = None
    if torch.get_num_threads() > 1:
        threads = time_log_mel_threads(offline, sentences, args.repeats)
        print(f"log_mel encoder alone: one torch thread (as shipped) {threads['one_thread_per_s']:.1f} sentences/s, "
              f"{threads['threads']} threads {threads['all_threads_per_s']:.1f} sentences/s: "
              f"{threads['ratio']:.2f}x (interleaved, median of {args.repeats})", flush=True)

    if not args.skip_full:
        few = corpus(args.full_sentences, seed=1)
        espeak_seconds = np.mean([len(w) / SAMPLE_RATE for w in offline.tts(few)])
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            save_random_full_size_models(folder)
            probe = full_size_maker(folder, args.device, args.dtype, args.batch_size)
            vits_seconds = np.mean([len(w) / SAMPLE_RATE for w in probe.tts(few)])
            rate = float(vits_seconds / espeak_seconds)  # random durations -> espeak's mean audio length
            full = full_size_maker(folder, args.device, args.dtype, args.batch_size, speaking_rate=rate)
            full(few[:1])  # warm-up
            row = {**time_stages(full, few, args.full_repeats), "device": args.device, "dtype": args.dtype,
                   "vits_speaking_rate": rate, "random_weights": True}
            rows.append(row)
        print(table(rows[-1:]).split("\n", 2)[2], flush=True)
        print(f"(full size: random weights; VITS speaking rate scaled by {rate:.3g} to espeak's mean audio length)")
    print(f"# done: load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")

    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "date": str(datetime.date.today()),
                                         "rows": rows, "log_mel_threads": threads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
