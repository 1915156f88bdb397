"""n-best rescoring with a Hugging Face causal language model, as the reference does with OPT-6.7B.

    total = acoustic_scale * acoustic + (1 - alpha) * ngram + alpha * llm

(docs/reference.md, section 8; acoustic and ngram come from the beam search, natural logs; llm is the causal
LM's log-probability of the hypothesis' tokens). As in the reference, the LLM scores every token
after the first given the tokens before it, the first being the tokenizer's beginning-of-sequence
token (added here when the tokenizer does not add one itself), and the text is the lowercase words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from config import at_least
from harness.errors import UserError
from word_decoding.beam_search import Hypothesis

log = logging.getLogger(__name__)
# torch is imported inside LLMRescorer: decoders.py imports this module for LLMRescoringParams, and
# the search's worker processes (parallel.py) import decoders.py but never rescore.


@dataclass
class LLMRescoringParams:
    model: str  # hub id (e.g. facebook/opt-6.7b, the reference's) or a local folder, for from_pretrained
    enabled: bool = True  # false keeps the settings in the config without loading the model
    alpha: float = 0.55  # weight of the LLM against the n-gram, 0 to 1 (reference: 0.55)
    batch_size: int = 16  # hypotheses scored per forward pass
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def problems(self):
        if not 0 <= self.alpha <= 1:
            yield "alpha", f"is {self.alpha}: it must be at least 0 and at most 1"
        yield from at_least(self, 1, "batch_size")


class LLMRescorer:
    def __init__(self, params: LLMRescoringParams):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not 0 <= params.alpha <= 1:
            raise UserError(f"llm_rescoring.alpha must lie in [0, 1], got {params.alpha}")
        if params.batch_size < 1:
            raise UserError(f"llm_rescoring.batch_size must be at least 1, got {params.batch_size}")
        self.params = params
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if params.device == "auto" else params.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(params.model)
            self.model = AutoModelForCausalLM.from_pretrained(params.model, dtype=getattr(torch, params.dtype))
        except (OSError, ValueError) as error:  # not found locally and no hub access, or not a causal LM
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot load the rescoring LLM {params.model!r}: {first} "
                            "(give a local folder, or run where the hub is reachable)") from None
        self.model.to(self.device).eval()
        self.bos_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        if self.bos_id is None:
            raise UserError(f"the tokenizer of {params.model!r} has neither a BOS nor an EOS token to start from")
        log.info("LLM rescoring with %s on %s (alpha %.2f)", params.model, self.device, params.alpha)

    def token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        return ids if ids and ids[0] == self.bos_id else [self.bos_id, *ids]

    def log_probs(self, texts: list[str]) -> list[float]:
        """Natural-log probability of each text under the LLM, batched, right-padded with a mask."""
        import torch

        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), self.params.batch_size):
                encoded = [self.token_ids(t) for t in texts[start:start + self.params.batch_size]]
                width = max(map(len, encoded))
                ids = torch.zeros(len(encoded), width, dtype=torch.long)
                mask = torch.zeros(len(encoded), width, dtype=torch.long)
                for row, seq in enumerate(encoded):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
                token_log_probs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
                scores += (token_log_probs * mask[:, 1:]).sum(-1).tolist()
        return scores

    def choose(self, nbests: list[list[Hypothesis]], acoustic_scale: float) -> list[Hypothesis]:
        """The best hypothesis of each trial's n-best list by the reference's combined score;
        every trial's hypotheses go through the LLM together, in batches."""
        flat = [h for nbest in nbests for h in nbest]
        llm = iter(self.log_probs([h.text for h in flat]))
        alpha, chosen = self.params.alpha, []
        for nbest in nbests:
            totals = [acoustic_scale * h.acoustic + (1 - alpha) * h.ngram + alpha * next(llm) for h in nbest]
            chosen.append(nbest[max(range(len(nbest)), key=totals.__getitem__)])
        return chosen
