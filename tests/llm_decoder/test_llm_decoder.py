"""llm_decoder: only the brain side and LoRA train, the loss reads only sentence tokens, generation
stops, both LM routes load through from_pretrained from tiny saved models, checkpoints hold what
trains and refuse another LM, the tiny config writes text end to end, and the full-size config
builds with tiny stand-ins for Qwen2-Audio and mms-tts."""

import csv
import json
import re
from dataclasses import replace

import pytest
import torch

from alignment.losses import LossWeights
from config import TrainingParams
from harness import runner
from harness.errors import UserError
from harness.train import build_optimizer
from llm_decoder.language_model import LMParams, LoRAParams, load_language_model
from llm_decoder.model import GenerationParams, LLMDecoder, LLMDecoderParams
from llm_decoder.sequences import IGNORE, generation_inputs, sentence_loss, shorten, training_inputs
from llm_decoder.train_lm import TinyLMParams, train_tokenizer
from tests.alignment.test_audio_targets import tiny_vits  # noqa: F401  (fixture)
from tests.audio_alignment.test_gru_align import HeldTargets, make_batch
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "llm_decoder"
SENTENCES = ["I want to go home now.", "The dog sleeps outside.", "Can you bring me some tea?", "It is cold today."]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Tiny LMs and targets of these tests live in one temp folder, not in the repo's .cache/."""
    monkeypatch.setenv("B2T_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "b2t_cache"))


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    """A tiny Qwen2 causal LM and a tiny Qwen2-Audio (audio width 16), each saved with a tokenizer."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    root = tmp_path_factory.mktemp("lms")
    tokenizer = train_tokenizer(SENTENCES, TinyLMParams(vocab_size=300))
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**text)).save_pretrained(root / "causal")
    audio = Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2,
                                    encoder_ffn_dim=32, d_model=16, max_source_positions=1500)
    Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(audio_config=audio.to_dict(),
                                                        text_config=dict(model_type="qwen2", **text))
                                       ).save_pretrained(root / "qwen2_audio")
    for name in ("causal", "qwen2_audio"):
        tokenizer.save_pretrained(root / name)
    return root


def build(folder, lora=0, checkpointing=False, targets=None, stats=None, **overrides):
    lm = LMParams(name_or_path=str(folder), lora=LoRAParams(r=lora), gradient_checkpointing=checkpointing)
    p = LLMDecoderParams(n_days=1, n_features=8, n_units=12, n_layers=1, patch_size=4, patch_stride=2,
                         input_dropout=0.0, rnn_dropout=0.0, pack_sequences=False, lm=lm,
                         **{"prompt": "<s>", **overrides})
    torch.manual_seed(0)
    return LLMDecoder(p, load_language_model(lm, None, "unused"), targets, stats)


def batch_of(sentences, lengths=(20, 13, 9, 16)):
    lengths = torch.tensor(lengths[: len(sentences)])
    features = torch.randn(len(sentences), int(lengths.max()), 8)
    features *= (torch.arange(features.shape[1])[None, :] < lengths[:, None]).unsqueeze(2)
    return make_batch(features, lengths, sentences)


@pytest.mark.parametrize("route", ["causal", "qwen2_audio"])
def test_only_the_brain_side_and_lora_get_gradients(lm_folders, route):
    model = build(lm_folders / route, lora=2).train()
    assert model.lm_identity["route"] == ("qwen2_audio" if route == "qwen2_audio" else "causal_lm")
    assert (model.audio_projector is not None) == (route == "qwen2_audio")
    assert not model.lm.training and not any(m.training for m in model.lm.modules())  # frozen: eval mode, always
    model.loss(batch_of(SENTENCES))["loss"].backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if "lora_" in name}
    assert lora and got == trainable  # every trainable weight learns, nothing else gets a gradient
    assert all(not name.startswith(("lm.", "audio_projector.")) for name in trainable - lora)
    assert any(name.startswith("projector.") for name in got) and any(name.startswith("gru.") for name in got)
    assert ("lm_projector.weight" in got) == (route == "causal")  # Qwen2-Audio brings its own projector
    optimizer, _ = build_optimizer(model, TrainingParams())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in model.named_parameters() if name in trainable}
    assert "lora" in {group["name"] for group in optimizer.param_groups}


def test_alignment_losses_add_to_the_sentence_loss_with_their_weights(lm_folders):
    """alpha x (cosine, InfoNCE against standardised targets, CTC head) + beta x sentence CE: each part
    present, weighted as the config says, and the brain side learns from them."""
    torch.manual_seed(1)
    frames = {s: torch.randn(n, 6) for s, n in zip(SENTENCES, (7, 5, 9, 4))}
    targets = HeldTargets(frames, 6)
    stats = torch.randn(6), torch.rand(6) + 0.5
    model = build(lm_folders / "causal", targets=targets, stats=stats, lm_weight=0.5, alignment_weight=2.0,
                  alignment=LossWeights(cosine=1.0, infonce=3.0, ctc=1.0)).train()
    assert model.projector.out_features == 6  # the brain embeddings live in the targets' space
    batch = batch_of(SENTENCES)
    batch = replace(batch, phoneme_ids=torch.tensor([[3, 4], [5, 0], [6, 7], [8, 0]]),
                    phoneme_lengths=torch.tensor([2, 1, 2, 1]))
    parts = model.loss(batch)
    assert set(parts) == {"loss", "lm_ce", "cosine", "infonce", "ctc"}
    expected = 0.5 * parts["lm_ce"] + 2.0 * (parts["cosine"] + 3.0 * parts["infonce"] + parts["ctc"])
    torch.testing.assert_close(parts["loss"], expected)
    parts["loss"].backward()
    assert model.ctc_head.weight.grad is not None and model.projector.weight.grad.abs().sum() > 0


def test_the_loss_reads_only_sentence_tokens_and_ignores_padding(lm_folders):
    model = build(lm_folders / "causal").eval()
    H = model.lm.get_input_embeddings().embedding_dim
    prompt, after = model.embed_tokens([1]), model.embed_tokens([5, 6])
    brain, brain_lengths = torch.randn(3, 7, H), torch.tensor([7, 3, 5])
    ids = model.sentence_ids(SENTENCES[:3])
    inputs = training_inputs(prompt, brain, brain_lengths, after, ids, model.embed_tokens)
    for b, n in enumerate(brain_lengths.tolist()):
        start = 1 + n + 2
        assert (inputs.labels[b, :start] == IGNORE).all()  # prompt, brain frames, prompt_after
        assert inputs.labels[b, start:start + len(ids[b])].tolist() == ids[b]  # sentence + end token
        assert (inputs.labels[b, start + len(ids[b]):] == IGNORE).all()  # padding
        assert inputs.attention_mask[b].sum() == start + len(ids[b]) and ids[b][-1] == model.end_id
    # the batched, padded loss is the token-weighted mean of each trial's cross-entropy computed alone,
    # by hand from the LM's logits, on its sentence tokens only
    with torch.no_grad():
        loss = sentence_loss(model.lm, inputs)
        total, count = 0.0, 0
        for b, n in enumerate(brain_lengths.tolist()):
            alone = torch.cat([prompt, brain[b, :n], after, model.embed_tokens(ids[b])])
            logits = model.lm(inputs_embeds=alone[None]).logits[0]
            start = 1 + n + 2
            log_probs = logits[start - 1:-1].log_softmax(-1)
            total -= log_probs.gather(1, torch.tensor(ids[b])[:, None]).sum()
            count += len(ids[b])
        torch.testing.assert_close(loss, total / count, rtol=1e-4, atol=1e-5)
        # garbage in the padded positions and past each trial's brain length changes nothing
        noisy = replace(inputs, embeds=torch.where(inputs.attention_mask[..., None] == 1, inputs.embeds,
                                                   torch.full_like(inputs.embeds, 1e3)))
        torch.testing.assert_close(sentence_loss(model.lm, noisy), loss)
        brain2 = brain.clone()
        brain2[1, 3:] = 77.0
        again = training_inputs(prompt, brain2, brain_lengths, after, ids, model.embed_tokens)
        torch.testing.assert_close(sentence_loss(model.lm, again), loss)
        # a different prompt changes the loss (the LM reads it) but never what is labelled
        other = training_inputs(model.embed_tokens([2, 3, 4]), brain, brain_lengths, after, ids, model.embed_tokens)
        assert [row[row != IGNORE].tolist() for row in other.labels] == ids
        assert not torch.isclose(sentence_loss(model.lm, other), loss)


def test_generation_inputs_are_left_padded_and_pooling_keeps_padding_out():
    prompt, after = torch.ones(2, 4), torch.full((1, 4), 2.0)
    brain, lengths = torch.randn(2, 5, 4), torch.tensor([5, 2])
    g = generation_inputs(prompt, brain, lengths, after)
    assert g.embeds.shape == (2, 8, 4) and g.attention_mask.tolist() == [[1] * 8, [0] * 3 + [1] * 5]
    torch.testing.assert_close(g.embeds[1, 3:], torch.cat([prompt, brain[1, :2], after]))
    x, n = torch.randn(2, 7, 3), torch.tensor([7, 3])
    pooled, pooled_n = shorten(x, n, "mean", 2)
    assert pooled_n.tolist() == [4, 2] and pooled.shape == (2, 4, 3)
    torch.testing.assert_close(pooled[1, 1], x[1, 2])  # a partial window: its valid frame only
    torch.testing.assert_close(pooled[0, 3], x[0, 6])
    torch.testing.assert_close(pooled[1, 0], x[1, :2].mean(0))
    strided, strided_n = shorten(x, n, "stride", 3)
    assert strided_n.tolist() == [3, 1] and torch.equal(strided[0], x[0, ::3])


class FixedHead(torch.nn.Module):
    """An output head whose logits favour one token whatever the LM computed."""

    def __init__(self, vocab: int, favoured: int):
        super().__init__()
        self.vocab, self.favoured = vocab, favoured

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab) + torch.linspace(0, 1, self.vocab)  # no ties
        logits[..., self.favoured] = 10.0
        return logits


def test_generation_stops_at_the_end_token_and_at_max_new_tokens(lm_folders):
    model = build(lm_folders / "causal", generation=GenerationParams(num_beams=1, max_new_tokens=5)).eval()
    batch, vocab = batch_of(SENTENCES[:3]), model.lm.config.vocab_size
    model.lm.lm_head = FixedHead(vocab, model.end_id)
    rows = model.decode(batch)
    assert all(r["ended"] and r["generated_tokens"] == 0 and r["predicted_text"] == "" for r in rows)
    word = model.tokenizer(" home", add_special_tokens=False)["input_ids"][0]
    model.lm.lm_head = FixedHead(vocab, word)  # never the end token: runs to max_new_tokens
    rows = model.decode(batch)
    assert all(not r["ended"] and r["generated_tokens"] == 5 for r in rows)
    assert rows[0]["predicted_text"] == "home home home home home"
    assert model.split_metrics("val", rows)["ended_share"] == 0.0
    # beam search: same stopping rules (the real head, so the beams differ)
    beams = build(lm_folders / "causal", generation=GenerationParams(num_beams=3, max_new_tokens=4)).eval()
    rows = beams.decode(batch)
    assert len(rows) == 3 and all(r["generated_tokens"] <= 4 for r in rows)


def test_checkpoints_hold_what_trains_and_load_only_against_the_same_lm(lm_folders):
    model = build(lm_folders / "qwen2_audio", lora=2)
    state = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable | {"target_mean", "target_std", "_extra_state"}
    assert state["_extra_state"]["lm"]["route"] == "qwen2_audio" and state["_extra_state"]["lm"]["pretrained"]
    assert not any(k.startswith(("lm.", "audio_projector.")) and "lora_" not in k for k in state)
    torch.save(state, lm_folders / "ckpt.pt")
    loaded = torch.load(lm_folders / "ckpt.pt", weights_only=True)  # what harness.train.load_checkpoint does
    fresh = build(lm_folders / "qwen2_audio", lora=2)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    fresh.load_state_dict(loaded)
    for key, value in fresh.state_dict().items():
        if key != "_extra_state":
            torch.testing.assert_close(value, state[key])
    with pytest.raises(RuntimeError, match="missing keys"):
        fresh.load_state_dict({k: v for k, v in loaded.items() if not k.startswith("projector.")})
    other = build(lm_folders / "causal", lora=2)
    with pytest.raises(UserError, match="trained with the LM"):
        other.load_state_dict(loaded)


def test_gradient_checkpointing_recomputes_the_lm_layers_and_gives_the_same_gradients(lm_folders):
    grads, calls = {}, {}
    for checkpointing in (False, True):
        model = build(lm_folders / "causal", lora=2, checkpointing=checkpointing).train()
        layer = model.lm.model.layers[0]
        count = [0]
        layer.mlp.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))  # noqa: B023 (this layer's own count)
        torch.manual_seed(1)
        model.loss(batch_of(SENTENCES))["loss"].backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        calls[checkpointing] = count[0]
        assert not layer.mlp.training and not layer.self_attn.training  # no dropout either way
    assert calls == {False: 1, True: 2}  # checkpointed: the layer runs again in backward (a pre-hook: the
    # recompute stops once it has what backward needs, inside the MLP, so a post-hook would not see it)
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)


def test_compiled_encoder_gives_the_same_loss(lm_folders):
    """training_params.compile compiles the model's forward (the brain encoder), not the LM; checked
    here with dynamo's eager backend (graph capture without the C++ build of inductor)."""
    model = build(lm_folders / "causal").eval()
    batch = batch_of(SENTENCES)
    with torch.no_grad():
        plain = model.loss(batch)["loss"]
        model.compile(backend="eager")
        torch.testing.assert_close(model.loss(batch)["loss"], plain)


def read_rows(run_dir):
    return list(csv.DictReader(open(run_dir / "per_trial.csv")))


def test_tiny_config_trains_the_lm_here_and_writes_text_for_most_trials(synthetic_dataset, tmp_path):
    overrides = [f"data_params.data_dir={synthetic_dataset}", "evaluation.splits=[val]", "training_params.num_steps=20",
                 "training_params.val_every=0", "training_params.checkpoint_every=0", "model_params.lm.tiny.steps=60",
                 "evaluation.bootstrap_resamples=200"]
    run_dir = runner.run(str(CONFIGS / "tiny.yml"), overrides, str(tmp_path / "run"), False, False)
    rows = read_rows(run_dir)
    assert sum(bool(r["predicted_text"]) for r in rows) >= 0.8 * len(rows)
    assert all(r["predicted_text"] == r["predicted_text"].lower() for r in rows)  # normalised as scored
    metrics = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert re.fullmatch(r"tiny-qwen2-[0-9a-f]{12}-trained-here", metrics["lm"]) and metrics["lm_pretrained"] is False
    assert metrics["wer"] is not None and metrics["wer_ci"][0] <= metrics["wer"] <= metrics["wer_ci"][1]
    assert metrics["by_session"] and metrics["per"] is not None  # the CTC head's phonemes
    log = (run_dir / "run.log").read_text()
    assert f"trained tiny LM {metrics['lm'].removesuffix('-trained-here')}" in log
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("lm.") and "lora_" not in k for k in checkpoint["model"])
    # evaluate rebuilds the model (the LM from the cache, trained on the same transcriptions) and decodes the same
    evaluated = runner.evaluate(str(run_dir), str(synthetic_dataset), "val", str(tmp_path / "evaluated"), None)
    assert read_rows(evaluated) == rows
    assert re.search(r"tiny LM tiny-qwen2-\w+: from the cache", (evaluated / "run.log").read_text())


def test_full_size_config_builds_and_decodes_with_tiny_qwen2_audio_and_mms_tts(small_dataset, tmp_path, lm_folders,
                                                                            tiny_vits):
    """configs/llm_decoder/qwen2_audio.yml as it is, but with a tiny local Qwen2-Audio (as the LM and as
    the target encoder) and mms-tts, the small test data, no training (a full-size step is a benchmark)."""
    qwen = lm_folders / "qwen2_audio"
    overrides = [
        f"data_params.data_dir={small_dataset}", "data_params.sessions=null", "data_params.num_workers=0",
        f"model_params.lm.name_or_path={qwen}", "model_params.lm.dtype=float32", "model_params.end_token=null",
        f"model_params.targets.tts.params.model={tiny_vits}", f"model_params.targets.encoder.params.model={qwen}",
        "model_params.targets.encoder.params.dtype=float32", "model_params.targets.device=cpu",
        "training_params.num_steps=0", "training_params.device=cpu", "evaluation.splits=[val]",
        "evaluation.bootstrap_resamples=100",
    ]
    run_dir = runner.run(str(CONFIGS / "qwen2_audio.yml"), overrides, str(tmp_path / "full"), False, False)
    config = (run_dir / "config.yaml").read_text()
    assert "n_units: 768" in config and "n_layers: 5" in config and "gradient_checkpointing: true" in config
    days, c, h, width = 3, 512, 768, 16  # 3 sessions; the tiny audio tower is 16 wide (1280 real)
    gru = 3 * h * (14 * c + h) + 4 * 3 * h * (2 * h) + 5 * 2 * 3 * h
    lora = 2 * 8 * (4 * 16 + (16 + 8 + 8 + 16))  # 2 layers; A: r x 16 each, B: out x r (q, o 16; k, v 8)
    expected = days * (c * c + c) + gru + h + (h * 1024 + 1024) + (1024 * width + width) + lora
    assert f"model llm_decoder: {expected} trainable parameters" in (run_dir / "run.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert metrics["lm_route"] == "qwen2_audio" and metrics["lm_pretrained"] is True
    assert metrics["targets"] == "mms_tts+qwen2_audio" and metrics["lora_rank"] == 8
    assert len(read_rows(run_dir)) == metrics["n_trials"] > 0


class BoostedHead(torch.nn.Module):
    """The LM's output head with some tokens made far likelier, so that counting them moves a loss."""

    def __init__(self, head, favoured: list[int]):
        super().__init__()
        self.head, self.favoured = head, sorted(set(favoured))

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.favoured] += 10.0
        return logits


def test_the_cross_entropy_counts_sentence_and_end_tokens_never_prompt_tokens(lm_folders):
    """model.loss with a several-token prompt and a prompt_after, against the cross-entropy computed by
    hand from the LM's logits on each trial alone: only the sentence tokens and the end token count."""
    model = build(lm_folders / "causal", prompt="I want to", prompt_after=" go home now").eval()
    n_p, n_a = len(model.prompt_ids), len(model.after_ids)
    assert n_p >= 2 and n_a >= 1
    model.lm.lm_head = BoostedHead(model.lm.lm_head, model.prompt_ids + model.after_ids)  # prompts: near-0 NLL
    batch = batch_of(SENTENCES[1:4])
    with torch.no_grad():
        lm_ce = model.loss(batch)["lm_ce"]
        emb, _, lengths = model(batch.features, batch.lengths, batch.day_indices)
        brain, brain_lengths = model.to_lm_space(emb, lengths)
        prompt, after = model.context()
        sentence, with_prompt = [0.0, 0], [0.0, 0]
        for b, (n, ids) in enumerate(zip(brain_lengths.tolist(), model.sentence_ids(batch.sentences))):
            alone = torch.cat([prompt, brain[b, :n], after, model.embed_tokens(ids)])
            nll = -model.lm(inputs_embeds=alone[None]).logits[0, :-1].log_softmax(-1)  # row t predicts t + 1
            start = n_p + n + n_a
            sentence[0] += nll[start - 1:].gather(1, torch.tensor(ids)[:, None]).sum()
            sentence[1] += len(ids)
            # what a loss that also read the prompt tokens (the first has no predecessor) and
            # prompt_after would add: it must be told apart
            with_prompt[0] += nll[: n_p - 1].gather(1, torch.tensor(model.prompt_ids[1:])[:, None]).sum()
            with_prompt[0] += nll[n_p + n - 1: start - 1].gather(1, torch.tensor(model.after_ids)[:, None]).sum()
            with_prompt[1] += n_p - 1 + n_a
    torch.testing.assert_close(lm_ce, sentence[0] / sentence[1], rtol=1e-4, atol=1e-5)
    wrong = (sentence[0] + with_prompt[0]) / (sentence[1] + with_prompt[1])
    assert lm_ce > wrong + 1.0  # the prompt tokens are the easy ones
