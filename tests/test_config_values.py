"""Value checks of the params dataclasses (their `problems()`): a value its type allows but a run cannot
use is a UserError at load, naming `--set` and the key path and saying the bound."""

import re

import pytest

from config import load_config
from harness.errors import UserError
from harness.plugins import load_plugins
from tests.conftest import REPO_ROOT, TINY_CONFIG

load_plugins()

CTC = REPO_ROOT / "configs" / "ctc_baseline" / "tiny.yml"
CTC_FULL = REPO_ROOT / "configs" / "ctc_baseline" / "b2txt25.yml"
ALIGN = REPO_ROOT / "configs" / "gru_align" / "tiny.yml"
LLM = REPO_ROOT / "configs" / "llm_decoder" / "llm_decoder.yml"
QWEN = REPO_ROOT / "configs" / "llm_decoder" / "qwen2_audio.yml"
AUGMENT = "data_params.preprocessors[0].params"  # augment, then gaussian_smoothing, in the shipped configs
SMOOTHING = "data_params.preprocessors[1].params"
WORDS = "model_params.word_decoder.params"
TARGETS = "model_params.targets"

# (config, --set, the key path the error names, what the message says about the bound)
BAD_VALUES = [
    # harness/preprocessors.py: GaussianSmoothingParams, AugmentParams, FeatureSubsetParams
    (CTC, f"{SMOOTHING}.std=0", f"{SMOOTHING}.std", "above 0"),
    (CTC, f"{SMOOTHING}.std=-1.5", f"{SMOOTHING}.std", "above 0"),
    (CTC, f"{SMOOTHING}.kernel_size=0", f"{SMOOTHING}.kernel_size", "at least 1"),
    (CTC, f"{AUGMENT}.random_cut=-1", f"{AUGMENT}.random_cut", "at least 0"),
    (CTC, f"{AUGMENT}.white_noise_std=-0.1", f"{AUGMENT}.white_noise_std", "0 or more"),
    (CTC, f"{AUGMENT}.constant_offset_std=.nan", f"{AUGMENT}.constant_offset_std", "finite"),
    (CTC, f"{AUGMENT}.static_gain_std=-1", f"{AUGMENT}.static_gain_std", "0 or more"),
    (CTC, f"{AUGMENT}.random_walk_std=.inf", f"{AUGMENT}.random_walk_std", "finite"),
    (CTC, f"{AUGMENT}.random_walk_axis=3", f"{AUGMENT}.random_walk_axis", "-3 to 2"),
    (TINY_CONFIG, "data_params.preprocessors=[{name: feature_subset, params: {indices: []}}]",
     "data_params.preprocessors[0].params.indices", "is empty"),
    (TINY_CONFIG, "data_params.preprocessors=[{name: feature_subset, params: {indices: [0, -1]}}]",
     "data_params.preprocessors[0].params.indices", "counted from 0"),
    # gru_decoder: GRUEncoderParams (through each model's params)
    (CTC, "model_params.input_dropout=1.5", "model_params.input_dropout", "at least 0 and below 1"),
    (CTC, "model_params.rnn_dropout=1", "model_params.rnn_dropout", "at least 0 and below 1"),
    (CTC, "model_params.rnn_dropout=-0.1", "model_params.rnn_dropout", "at least 0 and below 1"),
    (CTC, "model_params.n_layers=0", "model_params.n_layers", "at least 1"),
    (CTC, "model_params.n_units=0", "model_params.n_units", "at least 1"),
    (CTC, "model_params.n_features=0", "model_params.n_features", "at least 1"),
    (CTC, "model_params.n_days=-1", "model_params.n_days", "at least 0"),
    (CTC, "model_params.patch_size=0", "model_params.patch_size", "at least 1"),
    (CTC, "model_params.patch_stride=0", "model_params.patch_stride", "at least 1"),
    (ALIGN, "model_params.rnn_dropout=2", "model_params.rnn_dropout", "below 1"),
    (LLM, "model_params.n_layers=0", "model_params.n_layers", "at least 1"),
    # ctc_baseline: CTCBaselineParams
    (CTC, "model_params.n_classes=40", "model_params.n_classes", "must be 41"),
    # word_decoding: BeamSearchParams and LexiconNgramParams (lexicon_ngram), LLMRescoringParams
    (CTC, f"{WORDS}.beam_size=0", f"{WORDS}.beam_size", "at least 1"),
    (CTC, f"{WORDS}.beam_size_token=0", f"{WORDS}.beam_size_token", "at least 1"),
    (CTC, f"{WORDS}.nbest=0", f"{WORDS}.nbest", "at least 1"),
    (CTC, f"{WORDS}.acoustic_scale=0", f"{WORDS}.acoustic_scale", "above 0"),
    (CTC, f"{WORDS}.blank_penalty=-1", f"{WORDS}.blank_penalty", "above 0"),
    (CTC, f"{WORDS}.lm_weight=-1", f"{WORDS}.lm_weight", "0 or more"),
    (CTC, f"{WORDS}.word_score=.inf", f"{WORDS}.word_score", "finite"),
    (CTC, f"{WORDS}.beam_threshold=-1", f"{WORDS}.beam_threshold", "at least 0"),
    (CTC, f"{WORDS}.lm_order=1", f"{WORDS}.lm_order", "at least 2"),
    (CTC, f"{WORDS}.num_workers=-1", f"{WORDS}.num_workers", "at least 0"),
    (CTC_FULL, f"{WORDS}.llm_rescoring.alpha=1.5", f"{WORDS}.llm_rescoring.alpha", "at most 1"),
    (CTC_FULL, f"{WORDS}.llm_rescoring.batch_size=0", f"{WORDS}.llm_rescoring.batch_size", "at least 1"),
    (ALIGN, "model_params.word_decoder={name: lexicon_ngram, params: {beam_size: 0}}",
     f"{WORDS}.beam_size", "at least 1"),
    # audio_alignment: GRUAlignParams; alignment: LossWeights, TargetParams, EspeakParams, MmsTtsParams, LogMelParams
    (ALIGN, "model_params.infonce_temperature=0", "model_params.infonce_temperature", "above 0"),
    (ALIGN, "model_params.align_frames=0", "model_params.align_frames", "at least 1"),
    (ALIGN, "model_params.projector_hidden=-1", "model_params.projector_hidden", "at least 0"),
    (ALIGN, "model_params.loss_weights.ctc=-1", "model_params.loss_weights.ctc", "0 or more"),
    (ALIGN, "model_params.loss_weights.cosine=.nan", "model_params.loss_weights.cosine", "finite"),
    (ALIGN, f"{TARGETS}.batch_size=0", f"{TARGETS}.batch_size", "at least 1"),
    (ALIGN, f"{TARGETS}.tts.params.rate=20", f"{TARGETS}.tts.params.rate", "outside 80..450"),
    (ALIGN, f"{TARGETS}.tts.params.pitch=101", f"{TARGETS}.tts.params.pitch", "outside 0..100"),
    (ALIGN, f"{TARGETS}.tts={{name: mms_tts, params: {{speaking_rate: 0}}}}", f"{TARGETS}.tts.params.speaking_rate",
     "above 0"),
    (ALIGN, f"{TARGETS}.encoder.params.pool=0", f"{TARGETS}.encoder.params.pool", "at least 1"),
    (ALIGN, f"{TARGETS}.encoder.params.dim=0", f"{TARGETS}.encoder.params.dim", "at least 1"),
    (ALIGN, f"{TARGETS}.encoder.params.projection_seed=-1", f"{TARGETS}.encoder.params.projection_seed",
     "at least 0"),
    # llm_decoder: LLMDecoderParams, GenerationParams, LMParams' LoRAParams and TinyLMParams
    (LLM, "model_params.frame_factor=0", "model_params.frame_factor", "at least 1"),
    (LLM, "model_params.embedding_dim=-1", "model_params.embedding_dim", "at least 0"),
    (LLM, "model_params.lm_weight=-1", "model_params.lm_weight", "0 or more"),
    (LLM, "model_params.alignment_weight=.inf", "model_params.alignment_weight", "finite"),
    (LLM, "model_params.infonce_temperature=-0.1", "model_params.infonce_temperature", "above 0"),
    (LLM, "model_params.alignment.infonce=-1", "model_params.alignment.infonce", "0 or more"),
    (LLM, "model_params.targets.batch_size=0", "model_params.targets.batch_size", "at least 1"),
    (LLM, "model_params.generation.num_beams=0", "model_params.generation.num_beams", "at least 1"),
    (LLM, "model_params.generation.max_new_tokens=0", "model_params.generation.max_new_tokens", "at least 1"),
    (QWEN, "model_params.generation.length_penalty=.nan", "model_params.generation.length_penalty", "finite"),
    (LLM, "model_params.lm.lora.r=-1", "model_params.lm.lora.r", "at least 0"),
    (LLM, "model_params.lm.lora.alpha=0", "model_params.lm.lora.alpha", "above 0"),
    (LLM, "model_params.lm.lora.target_modules=[]", "model_params.lm.lora.target_modules", "is empty"),
    (LLM, "model_params.lm.tiny.n_layers=0", "model_params.lm.tiny.n_layers", "at least 1"),
    (LLM, "model_params.lm.tiny.vocab_size=0", "model_params.lm.tiny.vocab_size", "at least 1"),
    (LLM, "model_params.lm.tiny.steps=0", "model_params.lm.tiny.steps", "at least 1"),
    (LLM, "model_params.lm.tiny.lr=-0.1", "model_params.lm.tiny.lr", "0 or more"),
    (LLM, "model_params.lm.tiny.seed=-1", "model_params.lm.tiny.seed", "at least 0"),
    (LLM, "model_params.lm.tiny.phoneme_noise=1.5", "model_params.lm.tiny.phoneme_noise", "from 0 to 1"),
    (LLM, "model_params.lm.tiny.n_kv_heads=3", "model_params.lm.tiny.n_kv_heads", "divide n_heads"),
    (LLM, "model_params.lm.tiny.hidden_size=12", "model_params.lm.tiny.hidden_size", "even"),
]


@pytest.mark.parametrize("path, override, key, bound", BAD_VALUES,
                         ids=[f"{p.parent.name}/{p.name}:{o.partition('=')[0]}={o.partition('=')[2][:30]}"
                              for p, o, _, _ in BAD_VALUES])
def test_an_impossible_value_names_the_set_key_and_the_bound(path, override, key, bound):
    with pytest.raises(UserError) as error:
        load_config(path, [override])
    message = str(error.value)
    assert message.startswith(f"--set {key}: "), message
    assert bound in message, message


def test_the_file_is_named_when_the_value_comes_from_it(tmp_path):
    text = CTC.read_text().replace("rnn_dropout: 0.0", "rnn_dropout: 1.0")
    assert text != CTC.read_text()
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: model_params\.rnn_dropout: is 1\.0: "
                                        "it must be at least 0 and below 1$"):
        load_config(path)


@pytest.mark.parametrize("path, override", [
    (CTC, f"{AUGMENT}.random_cut=0"),  # off
    (CTC, f"{AUGMENT}.white_noise_std=0"),  # off
    (CTC, "model_params.rnn_dropout=0"),
    (CTC, "model_params.n_days=0"),  # filled from the data by the harness
    (CTC, f"{WORDS}.lm_weight=0"),  # lexicon-only search
    (CTC, f"{WORDS}.word_score=-2.5"),  # a word insertion penalty
    (CTC, f"{WORDS}.num_workers=0"),  # this rank's share of the cores
    (CTC, f"{WORDS}={{lm_path: my.arpa, lm_order: 1}}"),  # the order of a given LM is not read
    (CTC_FULL, f"{WORDS}.llm_rescoring.alpha=1"),
    (ALIGN, "model_params.projector_hidden=0"),  # one linear layer
    (ALIGN, "model_params.loss_weights.ctc=0"),  # no CTC head
    (LLM, "model_params.lm.lora={r: 0, target_modules: []}"),  # no adapters
    (LLM, "model_params.embedding_dim=0"),  # the targets' width
    (LLM, "model_params.lm.tiny.phoneme_noise=1"),
    (QWEN, "model_params.generation.length_penalty=-1"),  # favours short sentences
])
def test_documented_off_and_edge_values_still_load(path, override):
    load_config(path, [override])


CONFIG_FILES = sorted((REPO_ROOT / "configs").rglob("*.yml")) + sorted((REPO_ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", [*CONFIG_FILES, TINY_CONFIG], ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_config_passes_the_value_checks(path):
    config = load_config(path)
    assert config.trial_name
