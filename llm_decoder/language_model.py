"""The frozen language model of llm_decoder: loading either route, freezing, LoRA, its identity.

Two routes, one shape: whatever is loaded ends up as a causal LM with `generate` (`lm`), its
tokenizer, and for Qwen2-Audio the model's own audio->text projector (`audio_projector`):
- `qwen2_audio`: `Qwen2AudioForConditionalGeneration.from_pretrained`; its multimodal projector
  and its language model are kept (frozen), its audio tower is dropped (the brain encoder takes
  its place). The language model and lm_head are re-seated in the text config's causal-LM class
  (`Qwen2ForCausalLM`), sharing the loaded modules, so both routes generate the same way.
- `causal_lm`: any `AutoModelForCausalLM.from_pretrained`.
`auto` picks qwen2_audio when the folder's config says so. A hub id, a local folder and the tiny LM
trained here (`train_lm.py`, used when `name_or_path` is null) all go through the same
`from_pretrained` calls.

Every loaded weight is frozen (requires_grad False); optional LoRA adapters (peft, injected in
place so the LM keeps its class and `generate`) are the only LM weights that train. The identity
(name, route, whether it was pretrained, a digest of the input embeddings and the audio projector)
goes into checkpoints, so a checkpoint only loads against the LM it was trained with.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from config import above, at_least
from harness.errors import UserError
from llm_decoder.train_lm import TinyLMParams, tiny_lm_folder

log = logging.getLogger(__name__)


@dataclass
class LoRAParams:
    r: int = 0  # rank; 0 = no adapters (the LM stays entirely frozen)
    alpha: float = 16.0  # scale: the adapters' output is multiplied by alpha / r; above 0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # at least one when r > 0

    def problems(self):
        yield from at_least(self, 0, "r")
        yield from above(self, 0, "alpha")
        if self.r > 0 and not self.target_modules:
            yield "target_modules", f"is empty: with r {self.r}, name the LM modules that get adapters"


@dataclass
class LMParams:
    """`model_params.lm`. One key switches to a real LM: `name_or_path: Qwen/Qwen2.5-0.5B` (or a folder)."""

    name_or_path: str | None = None  # hub id or local folder; null: the tiny LM trained here (`tiny`)
    route: Literal["auto", "qwen2_audio", "causal_lm"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the frozen weights; bfloat16 for GPUs
    gradient_checkpointing: bool = False  # recompute the LM's layer activations in backward (memory)
    lora: LoRAParams = field(default_factory=LoRAParams)
    tiny: TinyLMParams = field(default_factory=TinyLMParams)


@dataclass
class LoadedLM:
    lm: nn.Module  # causal LM (frozen, + LoRA), with generate(); also the module whose layers run the loss
    tokenizer: object
    audio_projector: nn.Module | None  # Qwen2-Audio's multimodal projector (frozen); None on the causal route
    identity: dict  # name, name_or_path, route, pretrained, digest

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().embedding_dim

    @property
    def audio_dim(self) -> int | None:
        return None if self.audio_projector is None else self.audio_projector.linear.in_features


def load_language_model(p: LMParams, training_transcriptions, cache_dir: str) -> LoadedLM:
    """`training_transcriptions()` -> [(sentence, phonemes)] is only called when the tiny LM has to be
    found or trained."""
    pretrained = p.name_or_path is not None
    path = p.name_or_path if pretrained else str(tiny_lm_folder(training_transcriptions(), p.tiny, cache_dir))
    name = p.name_or_path if pretrained else f"{path.rstrip('/').split('/')[-1]}-trained-here"
    route = p.route if p.route != "auto" else _detect_route(path)
    dtype = getattr(torch, p.dtype)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2AudioForConditionalGeneration

        tokenizer = AutoTokenizer.from_pretrained(path)
        if route == "qwen2_audio":
            lm, audio_projector = split_qwen2_audio(Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=dtype))
        else:
            lm, audio_projector = AutoModelForCausalLM.from_pretrained(path, dtype=dtype), None
    except (OSError, ValueError) as error:
        raise UserError(f"model_params.lm.name_or_path: cannot load {route} from {path!r}: "
                        f"{str(error).splitlines()[0]}") from None
    loaded = prepare(lm, audio_projector, tokenizer, p, {"name": name, "name_or_path": path if pretrained else None,
                                                         "route": route, "pretrained": pretrained})
    log.info("language model %s (%s, %s): %d frozen parameters%s", name, route, p.dtype,
             sum(t.numel() for t in lm.parameters() if not t.requires_grad),
             f", LoRA rank {p.lora.r} on {p.lora.target_modules}" if p.lora.r > 0 else "")
    return loaded


def prepare(lm: nn.Module, audio_projector: nn.Module | None, tokenizer, p: LMParams, identity: dict) -> LoadedLM:
    """Freeze, add LoRA and gradient checkpointing as `p` says, and name the weights (also used by
    benchmarks/llm_decoder_step.py on models built with random weights)."""
    for module in (lm, audio_projector):
        if module is not None:
            module.requires_grad_(False).eval()
    if p.lora.r > 0:
        add_lora(lm, p.lora)
    if p.gradient_checkpointing:
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable()  # non-reentrant torch.utils.checkpoint on every decoder layer
    identity = {**identity, "digest": weights_digest(lm.get_input_embeddings(), audio_projector)}
    return LoadedLM(lm, tokenizer, audio_projector, identity)


def _detect_route(path: str) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"model_params.lm.name_or_path: cannot read a model config from {path!r}: "
                        f"{str(error).splitlines()[0]}") from None
    return "qwen2_audio" if config.model_type == "qwen2_audio" else "causal_lm"


def split_qwen2_audio(full) -> tuple[nn.Module, nn.Module]:
    """Qwen2AudioForConditionalGeneration -> (a causal LM sharing its language model and lm_head, its
    multimodal projector). The audio tower is left behind with `full`."""
    from transformers import AutoModelForCausalLM

    text_config = full.config.text_config
    with torch.device("meta"):  # an empty shell: both of its modules are replaced right below
        lm = AutoModelForCausalLM.from_config(text_config, dtype=full.lm_head.weight.dtype)
    lm.model, lm.lm_head = full.model.language_model, full.lm_head
    lm.generation_config = full.generation_config
    assert not any(t.is_meta for t in lm.state_dict().values()), "the causal-LM shell kept an empty weight"
    return lm, full.model.multi_modal_projector


def add_lora(lm: nn.Module, p: LoRAParams) -> None:
    """LoRA adapters injected in place (the LM keeps its class); they are the only LM weights that train."""
    from peft import LoraConfig, inject_adapter_in_model

    try:
        inject_adapter_in_model(LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=0.0,
                                           target_modules=list(p.target_modules)), lm)
    except ValueError as error:
        raise UserError(f"model_params.lm.lora.target_modules: {str(error).splitlines()[0]}") from None
    for name, param in lm.named_parameters():
        param.requires_grad_("lora_" in name)


def keep_frozen_mode(lm: nn.Module, training: bool) -> None:
    """The LM always runs in eval mode (no dropout), except that its checkpointed layers follow
    `training`: transformers only checkpoints a layer whose own `training` flag is set. Such a layer
    has no dropout of its own; its children (attention, MLP) stay in eval mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm.eval()
    for module in lm.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = training


def weights_digest(*modules: nn.Module | None) -> str:
    """A digest of the weights that tie the brain side to this LM (input embeddings, audio projector):
    the same weights give the same digest wherever they were loaded from."""
    hasher = hashlib.blake2b(digest_size=12)
    for module in modules:
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()
