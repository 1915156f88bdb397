"""llm_decoder: the audio-aligned brain encoder read by a frozen language model that writes the sentence.

brain features -> GRUEncoder (day layers, patching, GRU) -> projector -> embeddings in the audio
encoder's space (B, P, D) -> pooled/strided frames -> into the LM's embedding width:
  qwen2_audio route: Qwen2-Audio's own multimodal projector (frozen), fed the embeddings in the
                     audio tower's units (the standardisation of the targets undone);
  causal_lm route:   a trainable linear layer.
The LM reads [prompt] [brain] [prompt_after] and writes the sentence; it is frozen (optional LoRA).

Loss = alignment_weight * (the audio-alignment losses against cached targets, as gru_align: cosine,
InfoNCE, and the auxiliary CTC head) + lm_weight * cross-entropy on the sentence tokens (+ end token).
Decoding: `generate(inputs_embeds=...)`, greedy or beam search; the text is normalised as the
reference's scoring does (`predicted_text`), the raw generation kept in `generated_text`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from alignment.losses import LossWeights, alignment_losses, weighted_total
from alignment.store import TargetStore, fill_targets, make_projector, standardized_targets
from alignment.targets import TargetParams
from config import above, at_least, non_negative
from gru_decoder import GRUEncoder, GRUEncoderParams
from harness.errors import UserError
from harness.metrics import normalize_text
from harness.model_api import DecoderModel
from harness.phonemes import N_CLASSES, ids_to_text
from llm_decoder.language_model import LMParams, LoadedLM, keep_frozen_mode, load_language_model
from llm_decoder.sequences import generation_inputs, sentence_loss, shorten, training_inputs
from registry import register_model_constructor
from word_decoding import greedy_phonemes

FROZEN_PREFIXES = ("lm.", "audio_projector.")  # modules whose weights are loaded, not trained or saved


@dataclass
class GenerationParams:
    num_beams: int = 1  # 1: greedy
    max_new_tokens: int = 32
    length_penalty: float = 1.0  # beam search only: the score is divided by length ** this (< 0 favours short)

    def problems(self):
        yield from at_least(self, 1, "num_beams", "max_new_tokens")
        if not math.isfinite(self.length_penalty):
            yield "length_penalty", f"is {self.length_penalty}: it must be a finite number"


@dataclass
class LLMDecoderParams(GRUEncoderParams):
    """Every key of model_params: the encoder sizes (GRUEncoderParams) plus these."""

    lm: LMParams = field(default_factory=LMParams)
    prompt: str = ""  # text before the brain embeddings (may hold special tokens, e.g. "<s>")
    prompt_after: str = ""  # text between the brain embeddings and the sentence
    end_token: str | None = None  # ends the sentence (labels, and where generation stops); null: the tokenizer's eos
    embedding_dim: int = 0  # projector width; 0: the targets' width, else Qwen2-Audio's audio width, else the LM's
    projector_hidden: int = 0  # 0: one linear layer; > 0: MLP with this hidden width (as gru_align)
    frame_pooling: Literal["mean", "stride", "none"] = "mean"  # brain frames -> LM positions
    frame_factor: int = 2  # frames per LM position
    lm_weight: float = 1.0  # beta: cross-entropy on the sentence tokens; 0 = none
    alignment_weight: float = 0.0  # alpha: the audio-alignment losses below; 0 = none, no targets built
    alignment: LossWeights = field(default_factory=lambda: LossWeights(cosine=1.0, infonce=1.0, ctc=0.0))
    targets: TargetParams = field(default_factory=TargetParams)  # made and cached as gru_align's
    standardize_targets: bool = True
    align_frames: int = 32
    infonce_temperature: float = 0.1
    infonce_similarity: Literal["pooled", "sequence"] = "pooled"  # what InfoNCE compares (alignment.losses)
    generation: GenerationParams = field(default_factory=GenerationParams)

    def problems(self):
        yield from super().problems()
        yield from at_least(self, 0, "embedding_dim", "projector_hidden")
        yield from at_least(self, 1, "frame_factor", "align_frames")
        yield from non_negative(self, "lm_weight", "alignment_weight")
        yield from above(self, 0, "infonce_temperature")


class LLMDecoder(GRUEncoder, DecoderModel):
    """Checkpoints hold only what trains (encoder, projectors, CTC head, target statistics, LoRA
    adapters) plus the LM's identity (`_extra_state`): the frozen LM stays in the module tree, so
    that `.to(device)` moves it and its LoRA adapters reach the optimizer, and `state_dict` /
    `load_state_dict` leave its loaded weights out (the LM is read again from where it came)."""

    def __init__(self, p: LLMDecoderParams, loaded: LoadedLM, targets: TargetStore | None = None, target_stats=None):
        super().__init__(p)
        self.p = p
        self.min_time_steps = p.patch_size  # shorter trials give no output frame
        self.lm, self.audio_projector, self.tokenizer = loaded.lm, loaded.audio_projector, loaded.tokenizer
        self.lm_identity = loaded.identity
        self.targets = targets  # not a module: the targets stay out of the state dict
        dim = resolve_embedding_dim(p, loaded, targets)
        self.projector = make_projector(p.n_units, p.projector_hidden, dim)
        self.lm_projector = nn.Linear(dim, loaded.hidden_size) if loaded.audio_projector is None else None
        self.ctc_head = nn.Linear(p.n_units, N_CLASSES) if p.alignment_weight > 0 and p.alignment.ctc > 0 else None
        mean, std = target_stats if target_stats is not None else (torch.zeros(dim), torch.ones(dim))
        self.register_buffer("target_mean", mean)  # standardisation of the targets, saved with the weights
        self.register_buffer("target_std", std)
        self.prompt_ids = self._token_ids(p.prompt, "prompt")
        self.after_ids = self._token_ids(p.prompt_after, "prompt_after")
        self.end_id = self._end_token_id(p.end_token)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        self.lm_dtype = self.lm.get_input_embeddings().weight.dtype
        keep_frozen_mode(self.lm, False)

    # -- tokens

    def _token_ids(self, text: str, key: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            raise UserError(f"model_params.{key}: {text!r} holds tokens the LM's tokenizer does not know")
        return ids

    def _end_token_id(self, token: str | None) -> int:
        if token is None:
            if self.tokenizer.eos_token_id is None:
                raise UserError("model_params.end_token: the LM's tokenizer has no eos token; name one")
            return self.tokenizer.eos_token_id
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"model_params.end_token: {token!r} is {len(ids)} tokens for this tokenizer, not one")
        return ids[0]

    def sentence_ids(self, sentences: list[str]) -> list[list[int]]:
        return [self.tokenizer(s, add_special_tokens=False)["input_ids"] + [self.end_id] for s in sentences]

    def embed_tokens(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.target_mean.device)
        return self.lm.get_input_embeddings()(ids)

    # -- brain side

    def forward(self, features, lengths, day_indices):
        """-> brain embeddings in the (standardised) audio space (B, P, D), GRU outputs, valid lengths.
        This is what `training_params.compile` compiles: the encoder and projector, not the LM."""
        hidden, out_lengths = self.encode(features, lengths, day_indices)
        return self.projector(hidden), hidden, out_lengths

    def to_lm_space(self, emb: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, D) embeddings -> (B, P', H) LM input embeddings and their lengths."""
        emb, lengths = shorten(emb, lengths, self.p.frame_pooling, self.p.frame_factor)
        if self.audio_projector is not None:  # Qwen2-Audio's projector reads the audio tower's own units
            raw = emb * self.target_std + self.target_mean
            return self.audio_projector(raw.to(self.lm_dtype)), lengths
        return self.lm_projector(emb).to(self.lm_dtype), lengths

    def context(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_tokens(self.prompt_ids), self.embed_tokens(self.after_ids)

    # -- DecoderModel

    def brain_outputs(self, batch, lm_space: bool = True) -> tuple:
        """Everything before the LM, once per batch: (embeddings, GRU outputs, lengths, and with
        lm_space the LM input embeddings and their lengths, else None)."""
        emb, hidden, lengths = self(batch.features, batch.lengths, batch.day_indices)
        return emb, hidden, lengths, self.to_lm_space(emb, lengths) if lm_space else None

    def loss(self, batch):
        return self.loss_from(self.brain_outputs(batch, lm_space=self.p.lm_weight > 0), batch)

    @torch.no_grad()
    def decode(self, batch):
        return self.rows_from(self.brain_outputs(batch), batch)

    def evaluate(self, batch, *, with_loss, decode_words=True):
        """One brain encoder pass shared by the loss and the rows; the LM's teacher-forced pass and
        its generation stay two. No word decoder here: decode_words changes nothing (generation is
        the model's only text)."""
        outputs = self.brain_outputs(batch)
        parts = self.loss_from(outputs, batch) if with_loss and batch.phoneme_ids is not None else None
        return parts, self.rows_from(outputs, batch)

    def loss_from(self, outputs, batch):
        emb, hidden, lengths, lm_space = outputs
        parts, total = {}, 0.0
        if self.p.lm_weight > 0:
            brain, brain_lengths = lm_space
            prompt, after = self.context()
            inputs = training_inputs(prompt, brain, brain_lengths, after, self.sentence_ids(batch.sentences),
                                     self.embed_tokens)
            parts["lm_ce"] = sentence_loss(self.lm, inputs)
            total = self.p.lm_weight * parts["lm_ce"]
        if self.p.alignment_weight > 0:
            aligned = self.alignment_losses(emb.float(), hidden, lengths, batch)
            parts.update(aligned)
            total = total + self.p.alignment_weight * weighted_total(self.p.alignment, aligned)
        return {"loss": total, **parts}

    def alignment_losses(self, emb, hidden, lengths, batch) -> dict:
        """gru_align's losses on the same embeddings the LM reads (alignment.losses)."""
        target, target_lengths = None, None
        if self.targets is not None:
            target, target_lengths = standardized_targets(self.targets, batch.sentences, emb.device,
                                                          self.target_mean, self.target_std)
        return alignment_losses(
            self.p.alignment, emb, lengths, target, target_lengths, batch.sentences,
            temperature=self.p.infonce_temperature, similarity=self.p.infonce_similarity,
            align_frames=self.p.align_frames, ctc_logits=self.ctc_head(hidden) if self.ctc_head is not None else None,
            phoneme_ids=batch.phoneme_ids, phoneme_lengths=batch.phoneme_lengths)

    @torch.no_grad()
    def rows_from(self, outputs, batch) -> list[dict]:
        _, hidden, lengths, (brain, brain_lengths) = outputs
        prompt, after = self.context()
        inputs = generation_inputs(prompt, brain, brain_lengths, after)
        g = self.p.generation
        out = self.lm.generate(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                               max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, do_sample=False,
                               length_penalty=g.length_penalty, eos_token_id=self.end_id, pad_token_id=self.pad_id,
                               use_cache=True)
        rows = []
        for ids in out.tolist():  # only the new tokens: the inputs were embeddings
            ended = self.end_id in ids
            ids = ids[: ids.index(self.end_id)] if ended else ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            rows.append({"predicted_text": normalize_text(text), "generated_text": text.strip(),
                         "generated_tokens": len(ids), "ended": ended})
        if self.ctc_head is not None:
            for row, phonemes in zip(rows, greedy_phonemes(self.ctc_head(hidden), lengths)):
                row["predicted_phonemes"] = phonemes
        return rows

    def split_metrics(self, split, rows):
        ended = [r["ended"] for r in rows]
        return {"lm": self.lm_identity["name"], "lm_pretrained": self.lm_identity["pretrained"],
                "lm_route": self.lm_identity["route"], "lora_rank": self.p.lm.lora.r,
                "targets": self.targets.name if self.targets is not None else None,
                "num_beams": self.p.generation.num_beams, "max_new_tokens": self.p.generation.max_new_tokens,
                "ended_share": sum(ended) / len(ended) if ended else None}

    def param_group(self, name: str) -> str:
        return "lora" if "lora_" in name else super().param_group(name)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_mode(self.lm, mode)  # frozen: no dropout, ever
        if self.audio_projector is not None:
            self.audio_projector.eval()
        return self

    # -- checkpoints: what trains, and the LM's identity

    @staticmethod
    def saved_key(key: str) -> bool:
        return not key.startswith(FROZEN_PREFIXES) or "lora_" in key

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix) and not self.saved_key(k[len(prefix):])]:
            del state[key]  # (a prefix: this model inside another module, e.g. a wrapper)
        return state

    def get_extra_state(self):
        return {"lm": dict(self.lm_identity)}

    def set_extra_state(self, state):
        saved, here = state["lm"], self.lm_identity
        if (saved["digest"], saved["route"]) != (here["digest"], here["route"]):
            raise UserError(f"this checkpoint was trained with the LM {saved['name']} ({saved['route']}, weights "
                            f"{saved['digest']}), but the config loads {here['name']} ({here['route']}, weights "
                            f"{here['digest']}): point model_params.lm at the LM it was trained with")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "_extra_state" not in state_dict:
            raise UserError("this checkpoint holds no LM identity: it is not an llm_decoder checkpoint")
        self.set_extra_state(state_dict["_extra_state"])  # a clear error before any weight is touched
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if self.saved_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {result.unexpected_keys}")
        return result


def resolve_embedding_dim(p: LLMDecoderParams, loaded: LoadedLM, targets: TargetStore | None) -> int:
    """The projector's width: what the targets and Qwen2-Audio's projector need (they must agree)."""
    needs = {}
    if targets is not None:
        needs["the alignment targets"] = targets.dim
    if loaded.audio_dim is not None:
        needs["Qwen2-Audio's multimodal projector"] = loaded.audio_dim
    if p.embedding_dim:
        needs["model_params.embedding_dim"] = p.embedding_dim
    if len(set(needs.values())) > 1:
        raise UserError("model_params: the brain embeddings cannot match every width they must: " +
                        ", ".join(f"{k} {v}" for k, v in needs.items()) +
                        " (for Qwen2-Audio, align to the qwen2_audio encoder's targets)")
    return next(iter(needs.values()), loaded.hidden_size)


def training_transcriptions(ctx) -> list[tuple[str, str]]:
    """(sentence, phonemes) of every labelled training trial."""
    return [(t.sentence, ids_to_text(t.phoneme_ids)) for t in ctx.training_trials()
            if t.sentence and t.phoneme_ids is not None]


@register_model_constructor()
def llm_decoder(params: LLMDecoderParams, ctx):
    if params.lm_weight <= 0 and params.alignment_weight <= 0:
        raise UserError("model_params: lm_weight or alignment_weight must be > 0 (nothing trains otherwise)")
    if params.frame_factor < 1 or params.generation.num_beams < 1 or params.generation.max_new_tokens < 1:
        raise UserError("model_params: frame_factor, generation.num_beams and generation.max_new_tokens must be >= 1")
    loaded = load_language_model(params.lm, lambda: training_transcriptions(ctx), ctx.cache_dir)
    targets, stats = None, None
    w = params.alignment
    if params.alignment_weight > 0 and (w.cosine > 0 or w.infonce > 0):
        targets = TargetStore(params.targets, ctx.cache_dir)
        stats = fill_targets(targets, ctx.trials, params.standardize_targets)
    return LLMDecoder(params, loaded, targets, stats)
