"""The LLM-decoded variant: the audio-aligned brain encoder read by a frozen language model
(Qwen2-Audio's projector + LM, or any causal LM with a trainable projector), optional LoRA."""

from llm_decoder import (  # noqa: F401
    language_model,
    model,  # noqa: F401  registers the llm_decoder constructor
    sequences,
    train_lm,
)
