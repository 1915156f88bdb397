"""The offline default LM: a tiny Qwen2-architecture causal LM trained here on the training
transcriptions, cached as a named artefact and then loaded like any pretrained LM.

No pretrained LM can be downloaded on the machines this project runs on, so the embedded default
trains one: a small BPE tokenizer (the `tokenizers` library, wrapped as a transformers fast
tokenizer with bos/eos/pad) and a `Qwen2ForCausalLM` built from a small `Qwen2Config`, trained for a
few hundred steps on "<s> sentence </s>". Both are written with `save_pretrained` to
`<cache_dir>/llm/tiny-qwen2-<hash>/`, where the hash covers the sentences and every param, and read
back by the same `from_pretrained` path a hub id or a local copy of a real LM goes through.

Byte-level BPE rather than whole words: val/test sentences may hold words that no training sentence
has (3 of the 183 val words of the embedded data), which a word-level vocabulary could never write.

The folder is written to a temporary sibling and renamed into place: two processes building the
same artefact at once (two DDP ranks) both train it, one rename wins, the other process uses the
winner's folder. A folder is complete once it exists under its final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_LM_FORMAT = 1  # bump when code here changes what an artefact holds without changing a param
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


@dataclass
class TinyLMParams:
    """`model_params.lm.tiny`: the LM trained here when `lm.name_or_path` is null."""

    vocab_size: int = 512  # BPE vocabulary, special tokens included
    hidden_size: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 512  # prompt + brain frames + sentence must fit
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def artefact_name(sentences: list[str], params: TinyLMParams) -> str:
    """tiny-qwen2-<hash of the sentences (in order) and the params>: names the folder and the LM in results."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    digest.update(json.dumps({"format": TINY_LM_FORMAT, "params": asdict(params), "torch": torch.__version__,
                              "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
                             sort_keys=True).encode())
    for sentence in sentences:
        digest.update(sentence.encode("utf-8") + b"\n")
    return f"tiny-qwen2-{digest.hexdigest()[:12]}"


def tiny_lm_folder(sentences: list[str], params: TinyLMParams, cache_dir: str | Path) -> Path:
    """The artefact's folder, trained and saved first unless a complete one is already there."""
    folder = Path(cache_dir) / "llm" / artefact_name(sentences, params)
    if folder.is_dir():
        log.info("tiny LM %s: from the cache (%s)", folder.name, folder)
        return folder
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer = train_tokenizer(sentences, params)
        model, loss = train_model(sentences, tokenizer, params)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "trained_here.json").write_text(json.dumps(
            {"name": folder.name, "params": asdict(params), "n_sentences": len(sentences),
             "final_loss": loss, "note": "trained by b2t-bench on the run's training transcriptions"}, indent=2))
        try:
            os.rename(work, folder)  # atomic; fails if another process got there first
        except OSError:
            if not folder.is_dir():
                raise
            log.info("tiny LM %s: another process saved it first; using theirs", folder.name)
            return folder
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("trained tiny LM %s on %d training sentences in %.0f s (final loss %.3f): %s", folder.name,
             len(sentences), time.monotonic() - started, loss, folder)
    return folder


def train_tokenizer(sentences: list[str], params: TinyLMParams):
    """Qwen2's byte-level BPE tokenizer, retrained on the sentences (`train_new_from_iterator`) down to
    `vocab_size`, with <s>, </s> and <pad>. Byte-level: any text can be written, unseen words included.
    Being Qwen2's own class, `AutoTokenizer` reads it back as what it is (a tokenizer of another class
    saved beside a qwen2 config would be read back as Qwen2Tokenizer anyway, and mangled)."""
    from transformers import Qwen2Tokenizer

    tokens = [SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token")]
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(sentences, vocab_size=params.vocab_size,
                                                         new_special_tokens=tokens)
    tokenizer.add_special_tokens({k: SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token")})
    return tokenizer


def train_model(sentences: list[str], tokenizer, params: TinyLMParams):
    """Qwen2ForCausalLM from a small Qwen2Config, AdamW on '<s> sentence </s>' batches; -> (model, last loss)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    generator = torch.Generator().manual_seed(params.seed)
    with torch.random.fork_rng():  # the run's own RNG stream (model init, dropout) stays as it was
        torch.manual_seed(params.seed)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=params.hidden_size,
                             intermediate_size=params.intermediate_size, num_hidden_layers=params.n_layers,
                             num_attention_heads=params.n_heads, num_key_value_heads=params.n_kv_heads,
                             max_position_embeddings=params.max_positions, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = Qwen2ForCausalLM(config).train()
    texts = [f"{tokenizer.bos_token}{s}{tokenizer.eos_token}" for s in sentences]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / params.steps))
    loss = torch.tensor(float("nan"))
    for _ in range(params.steps):
        picks = torch.randint(len(encoded), (params.batch_size,), generator=generator).tolist()
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(encoded[i]) for i in picks], batch_first=True,
                                              padding_value=tokenizer.pad_token_id)
        mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor([len(encoded[i]) for i in picks])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), float(loss.detach())
