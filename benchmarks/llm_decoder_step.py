#!/usr/bin/env python
"""Training-step time and peak memory of llm_decoder, gradient checkpointing (and bf16) on and off.

Sizes:
  tiny   configs/llm_decoder/llm_decoder.yml as `make llm-decoder` trains it (2 x 256 GRU, the tiny LM
         trained here, LoRA rank 8), on the CPU; fp32 (bf16 autocast is CUDA-only in this harness).
  7b     configs/llm_decoder/qwen2_audio.yml's brain side (5 x 768 GRU, MLP projector to 1280) read by a
         language model of Qwen2-Audio-7B-Instruct's published shapes (hidden 4096, 32 layers, 32 heads,
         MLP 11008, vocabulary 156032, multimodal projector 1280 -> 4096) with random weights (none can be
         downloaded here; timing does not depend on the values), LoRA rank 8 on q/k/v/o, the config's
         chat prompt; alignment targets are random 1280-d frames at 25 per second standing in for the
         cache. GPU only: without one it prints "no GPU: skipped".
  toy    the 7b code path at toy widths, so that it can run (and be tested) on a CPU.
A step is the loop body of harness/train.py: collate, preprocess, loss (under bf16 autocast where
asked), backward, clip, AdamW, scheduler. Each variant runs in its own subprocess (this script with
--one), so its peak memory is its own: torch.cuda.max_memory_allocated on a GPU, else the process's
peak RSS (VmHWM).

    .venv/bin/python benchmarks/llm_decoder_step.py                       # tiny on CPU; 7b if a GPU is there
    .venv/bin/python benchmarks/llm_decoder_step.py --sizes 7b --steps 20 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from config import load_config  # noqa: E402
from harness import runner  # noqa: E402
from harness.batching import TrainBatchSampler, TrialDataset, collate  # noqa: E402
from harness.data import FeatureStore  # noqa: E402
from harness.evaluation import apply_preprocessors, autocast  # noqa: E402
from harness.plugins import load_plugins  # noqa: E402
from harness.train import build_optimizer  # noqa: E402

RESULT_TAG = "RESULT "
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>"]
# Qwen2-Audio-7B(-Instruct) config.json: text_config and the audio width the multimodal projector reads
QWEN2_AUDIO_7B_TEXT = dict(model_type="qwen2", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, intermediate_size=11008, vocab_size=156032,
                           max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-5)
TOY_TEXT = dict(QWEN2_AUDIO_7B_TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=128, vocab_size=2200)
SIZES = {"tiny": "configs/llm_decoder/llm_decoder.yml", "7b": "configs/llm_decoder/qwen2_audio.yml",
         "toy": "configs/llm_decoder/qwen2_audio.yml"}
TOY_BRAIN = ["model_params.n_units=32", "model_params.n_layers=1", "model_params.rnn_dropout=0.0",
             "model_params.projector_hidden=32",
             "data_params.batch_size=8"]


def variants(size: str, device: str) -> list[dict]:
    on_gpu = device.startswith("cuda")
    dtypes = ["bfloat16", "float32"] if on_gpu and size != "tiny" else ["float32"]
    return [{"dtype": d, "checkpointing": c} for d in dtypes for c in (False, True)]


class RandomTargets:
    """Stands in for the target cache: random frames at 25 per second of the trial, fixed per sentence."""

    name = "random_stand_in"

    def __init__(self, dim: int, trials):
        generator = torch.Generator().manual_seed(0)
        self.dim, self.frames = dim, {}
        for t in trials:
            if t.sentence not in self.frames:
                self.frames[t.sentence] = torch.randn(max(1, t.n_time_steps // 2), dim, generator=generator).half()

    def get(self, sentences):
        return {s: self.frames[s] for s in sentences}


def fix_rotary_buffers(model) -> int:
    """Building on the meta device and then calling to_empty() leaves the non-persistent rotary buffers
    (inv_freq) uninitialised: garbage frequencies, and now and then NaN losses. Recompute them (float32,
    as the rotary module makes them); returns how many modules were fixed."""
    fixed = 0
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "config"):
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer.to(getattr(module, name).device))
            module.attention_scaling = getattr(fresh, "attention_scaling", 1.0)
            fixed += 1
    return fixed


def build_qwen2_audio_shaped(config, trials, device, text: dict):
    """An LLMDecoder whose LM has Qwen2-Audio's architecture at the `text` shapes, random weights."""
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration

    from llm_decoder.language_model import prepare, split_qwen2_audio
    from llm_decoder.model import LLMDecoder
    from llm_decoder.train_lm import TinyLMParams, train_tokenizer

    p = config.model_params
    dtype = getattr(torch, p.lm.dtype)
    # the audio tower is dropped by split_qwen2_audio: one layer of it is enough to build the model
    audio = Qwen2AudioEncoderConfig(d_model=1280, encoder_layers=1, encoder_attention_heads=20, encoder_ffn_dim=5120)
    with torch.device("meta"):
        full = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(audio_config=audio.to_dict(), text_config=text))
    full = full.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in full.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    if not fix_rotary_buffers(full):
        raise RuntimeError("no rotary embedding found to initialise: has the LM's structure changed?")
    lm, projector = split_qwen2_audio(full)
    del full
    # a BPE over the training sentences (about one token per word, like Qwen's 151k vocabulary on this
    # text) with the chat template's special tokens; every id fits the 156032-wide embedding
    tokenizer = train_tokenizer([t.sentence for t in trials["train"]], TinyLMParams(vocab_size=2000))
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    loaded = prepare(lm, projector, tokenizer, p.lm, {"name": "qwen2-audio-7b-shaped-random", "name_or_path": None,
                                                      "route": "qwen2_audio", "pretrained": False})
    return LLMDecoder(p, loaded, RandomTargets(loaded.audio_dim, [t for ts in trials.values() for t in ts])).to(device)


def run_one(size: str, variant: dict, args) -> dict:
    """Builds the model of one size and variant, times `args.steps` training steps after warm-up."""
    load_plugins()
    device = torch.device(args.device)
    overrides = [f"data_params.data_dir={args.data_dir}", f"training_params.device={args.device}",
                 "data_params.num_workers=0", f"model_params.lm.dtype={variant['dtype']}",
                 f"model_params.lm.gradient_checkpointing={str(variant['checkpointing']).lower()}",
                 f"training_params.amp_bf16={str(variant['dtype'] == 'bfloat16').lower()}"]
    if size != "tiny":
        overrides += ["data_params.sessions=null", "model_params.targets.device=cpu"]
    if size == "toy":
        overrides += TOY_BRAIN
    config = load_config(REPO_ROOT / SIZES[size], overrides)
    trials, preprocessors = runner.prepare_data(config, ["train", "val", "test"])
    torch.manual_seed(config.training_params.seed)
    if size == "tiny":
        model = runner.build_model(config, list(config.data_params.sessions), trials, device)
    else:
        model = build_qwen2_audio_shaped(config, trials, device, QWEN2_AUDIO_7B_TEXT if size == "7b" else TOY_TEXT)
    model.train()
    if args.compile:
        model.compile()
    tp, dp = config.training_params, config.data_params
    optimizer, scheduler = build_optimizer(model, tp)
    dataset = TrialDataset(trials["train"], FeatureStore(trials["train"], "memory"))
    sampler = TrainBatchSampler(trials["train"], dp.batch_size, dp.days_per_batch, dp.seed, args.warmup + args.steps)

    def step(i: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.manual_seed(1000 + i)
        batch = apply_preprocessors(collate([dataset[j] for j in sampler.batch_for_step(i)]).to(device),
                                    preprocessors, training=True)
        with autocast(device, tp.amp_bf16):
            loss = model.loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], tp.grad_norm_clip)
        optimizer.step()
        scheduler.step()
        float(loss.detach())  # waits for the step
        return (time.perf_counter() - start) * 1000

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    median_ms = statistics.median(step(args.warmup + i) for i in range(args.steps))
    result = {"size": size, **variant, "batch_size": dp.batch_size, "steps": args.steps,
              "median_ms": median_ms, "trials_per_s": dp.batch_size / median_ms * 1000,
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
              "lm": model.lm_identity["name"], "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    else:
        with open("/proc/self/status") as f:
            result["peak_rss_mb"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return result


def run_subprocess(size: str, variant: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps({"size": size, **variant}),
           "--device", args.device, "--data-dir", str(args.data_dir), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--compile"] if args.compile else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if "OutOfMemoryError" in done.stderr or "CUDA out of memory" in done.stderr:
        return {"size": size, **variant, "error": "out of memory"}
    raise RuntimeError(f"{size} {variant} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def table(results: list[dict]) -> str:
    lines = ["| size | weights / autocast | gradient checkpointing | batch | ms/step (median) | trials/s | peak memory MB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        memory = r.get("peak_gpu_mb", r.get("peak_rss_mb"))
        if "error" in r:
            lines.append(f"| {r['size']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | | {r['error']} | | |")
            continue
        lines.append(f"| {r['size']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | {r['batch_size']} | "
                     f"{r['median_ms']:.1f} | {r['trials_per_s']:.1f} | {memory:,.0f} ({'GPU' if 'peak_gpu_mb' in r else 'RSS'}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny", "7b"])
    ap.add_argument("--device", default=None, help="default: cpu for tiny and toy, cuda for 7b")
    ap.add_argument("--data-dir", default="data/synthetic")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the brain encoder (the model's forward)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every figure here too")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one variant in this process
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        spec = json.loads(args.one)
        size = spec.pop("size")
        print(RESULT_TAG + json.dumps(run_one(size, spec, args)), flush=True)
        return 0
    results = []
    for size in args.sizes:
        device = args.device or ("cuda" if size == "7b" else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{size}: no GPU: skipped (it needs CUDA; nothing was measured)")
            continue
        for variant in variants(size, device):
            sub = argparse.Namespace(**{**vars(args), "device": device})
            result = run_subprocess(size, variant, sub)
            results.append(result)
            print(f"{size} {variant}: " + (result.get("error") or f"{result['median_ms']:.1f} ms/step"), flush=True)
    if results:
        print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
