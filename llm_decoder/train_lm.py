"""The offline default LM: a tiny Qwen2-architecture causal LM trained here on the training
transcriptions, cached as a named artefact and then loaded like any pretrained LM.

No pretrained LM can be downloaded on the machines this project runs on, so the embedded default
trains one: a small BPE tokenizer (the `tokenizers` library, wrapped as a transformers fast
tokenizer with bos/eos/pad) and a `Qwen2ForCausalLM` built from a small `Qwen2Config`, trained for a
few hundred steps on "<s> <phonemes> <text> sentence </s>" (`phoneme_prompt`; "<s> sentence </s>"
without it): the sentence's ARPAbet phonemes, one token each and corrupted at random (`corrupt`),
then the sentence, the loss on the sentence only. The LM thus learns to write a sentence from what it
reads between "<s>" and "<text>", the place the brain embeddings take (the configs' prompt and
prompt_after). Both are written with `save_pretrained` to
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

import numpy as np
import torch

from config import at_least, non_negative
from harness.phonemes import PHONEME_TO_ID, PHONEMES

log = logging.getLogger(__name__)

TINY_LM_FORMAT = 1  # bump when code here changes what an artefact holds without changing a param
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
PHONEME_TOKENS = [f"<{p}>" for p in PHONEMES[1:]]  # the 39 ARPAbet phonemes and SIL, one token each
TEXT_TOKEN = "<text>"  # ends the prefix, starts the sentence


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
    seed: int = 0  # numpy's generator: 0 or more
    phoneme_prompt: bool = True  # train on "<s> <phonemes> <text> sentence </s>" (module docstring)
    phoneme_noise: float = 0.15  # share of prefix phonemes replaced, dropped or doubled at random (0 to 1)

    def problems(self):
        yield from at_least(self, 1, "vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                            "intermediate_size", "max_positions", "steps", "batch_size")
        yield from non_negative(self, "lr")
        yield from at_least(self, 0, "seed")
        if not 0 <= self.phoneme_noise <= 1:
            yield "phoneme_noise", f"is {self.phoneme_noise}: it must be a share, from 0 to 1"
        if self.n_heads >= 1 and self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads:
            yield "n_kv_heads", f"is {self.n_kv_heads}: it must divide n_heads ({self.n_heads})"
        head = self.hidden_size // self.n_heads if self.n_heads >= 1 else 2
        if head < 2 or head % 2:
            yield "hidden_size", (f"is {self.hidden_size}: each of the {self.n_heads} heads gets hidden_size // n_heads "
                                  f"= {head} channels, which rotary embeddings need even and at least 2")


Example = tuple[str, str]  # (sentence, its phonemes as space-separated ARPAbet with SIL)


def artefact_name(examples: list[Example], params: TinyLMParams) -> str:
    """tiny-qwen2-<hash of the transcriptions (in order) and the params>: names the folder and the LM in results."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    digest.update(json.dumps({"format": TINY_LM_FORMAT, "params": asdict(params), "torch": torch.__version__,
                              "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
                             sort_keys=True).encode())
    for sentence, phonemes in examples:
        digest.update(f"{sentence}\t{phonemes if params.phoneme_prompt else ''}\n".encode())
    return f"tiny-qwen2-{digest.hexdigest()[:12]}"


def tiny_lm_folder(examples: list[Example], params: TinyLMParams, cache_dir: str | Path) -> Path:
    """The artefact's folder, trained and saved first unless a complete one is already there."""
    folder = Path(cache_dir) / "llm" / artefact_name(examples, params)
    if folder.is_dir():
        log.info("tiny LM %s: from the cache (%s)", folder.name, folder)
        return folder
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        sentences = [sentence for sentence, _ in examples]
        tokenizer = train_tokenizer(sentences, params)
        model, loss = train_model(examples, tokenizer, params)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "trained_here.json").write_text(json.dumps(
            {"name": folder.name, "params": asdict(params), "n_sentences": len(examples),
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
    log.info("trained tiny LM %s on %d training sentences%s in %.0f s (final loss %.3f): %s", folder.name,
             len(examples), " after their phonemes" if params.phoneme_prompt else "", time.monotonic() - started,
             loss, folder)
    return folder


def train_tokenizer(sentences: list[str], params: TinyLMParams):
    """Qwen2's byte-level BPE tokenizer, retrained on the sentences (`train_new_from_iterator`) down to
    `vocab_size`, with <s>, </s> and <pad>. Byte-level: any text can be written, unseen words included.
    Being Qwen2's own class, `AutoTokenizer` reads it back as what it is (a tokenizer of another class
    saved beside a qwen2 config would be read back as Qwen2Tokenizer anyway, and mangled)."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer().train_new_from_iterator(sentences, vocab_size=params.vocab_size,
                                                         new_special_tokens=list(SPECIAL_TOKENS.values()))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.add_tokens([*PHONEME_TOKENS, TEXT_TOKEN], special_tokens=True)  # never written in generated text
    return tokenizer


def train_model(examples: list[Example], tokenizer, params: TinyLMParams):
    """Qwen2ForCausalLM from a small Qwen2Config, AdamW on batches of training examples; -> (model, last loss).
    The loss covers the sentence and </s> (and <s> without a phoneme prefix), never the prefix."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    generator = torch.Generator().manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    with torch.random.fork_rng():  # the run's own RNG stream (model init, dropout) stays as it was
        torch.manual_seed(params.seed)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=params.hidden_size,
                             intermediate_size=params.intermediate_size, num_hidden_layers=params.n_layers,
                             num_attention_heads=params.n_heads, num_key_value_heads=params.n_kv_heads,
                             max_position_embeddings=params.max_positions, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = Qwen2ForCausalLM(config).train()
    sentence_ids = tokenizer([s for s, _ in examples], add_special_tokens=False)["input_ids"]
    phoneme_ids = tokenizer.convert_tokens_to_ids(PHONEME_TOKENS)  # index = phoneme class id - 1
    bos, eos, text = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TEXT_TOKEN)

    def example(i: int) -> tuple[list[int], int]:
        """(token ids, length of the unlabelled prefix)"""
        if not params.phoneme_prompt:
            return [bos, *sentence_ids[i], eos], 0
        classes = [PHONEME_TO_ID[p] for p in examples[i][1].split()]
        prefix = [bos, *(phoneme_ids[c - 1] for c in corrupt(classes, params.phoneme_noise, rng)), text]
        return [*prefix, *sentence_ids[i], eos], len(prefix)

    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / params.steps))
    loss = torch.tensor(float("nan"))
    for _ in range(params.steps):
        picks = [example(i) for i in torch.randint(len(examples), (params.batch_size,), generator=generator).tolist()]
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p, _ in picks], batch_first=True,
                                              padding_value=tokenizer.pad_token_id)
        positions = torch.arange(ids.shape[1])[None, :]
        mask = (positions < torch.tensor([len(p) for p, _ in picks])[:, None]).long()
        labels = ids.masked_fill((mask == 0) | (positions < torch.tensor([n for _, n in picks])[:, None]), -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), float(loss.detach())


def corrupt(classes: list[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Each phoneme, with probability `rate`, replaced by a random one, dropped or doubled (a third each):
    the LM learns to write the sentence from imperfect phonemes, as the brain side will give it."""
    out = []
    for c in classes:
        if rng.random() >= rate:
            out.append(c)
            continue
        kind = rng.integers(3)
        if kind == 0:
            out.append(int(rng.integers(1, len(PHONEMES))))
        elif kind == 2:
            out += [c, c]
    return out
