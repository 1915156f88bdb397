"""Alignment targets: espeak-ng speech, log-mel frames, the real mms_tts / qwen2_audio loading path
(tiny models built from transformers config classes, saved and loaded back with from_pretrained),
config hashes, and the errors a user sees."""

import json
import multiprocessing
import threading

import numpy as np
import pytest
import torch

from alignment.encoders import LogMelParams, Qwen2AudioParams, _one_torch_thread, log_mel, qwen2_audio
from alignment.targets import SAMPLE_RATE, ComponentSpec, TargetParams, build_target_maker, resolve_target_params
from alignment.tts import EspeakParams, MmsTtsParams, espeak_ng, mms_tts
from harness.errors import UserError

SHORT = "Hello."
LONG = "The quick brown fox jumps over the lazy dog and then it runs all the way back home again."


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine every op of two threads waits for
    the slower one (measured: a tiny VITS sentence 60 ms on one thread, 2-4 s on two)."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def espeak():
    return espeak_ng(EspeakParams(), "cpu")


@pytest.fixture(scope="module")
def mels():
    return log_mel(LogMelParams(), "cpu")


# ----------------------------------------------------------------------------------------------
# espeak_ng


def _speech_span(waveform, threshold=0.02):
    loud = np.flatnonzero(np.abs(waveform) > threshold)
    return (loud[-1] - loud[0]) / SAMPLE_RATE


def test_espeak_speech_is_real_audio_whose_length_grows_with_the_text(espeak):
    short, long = espeak([SHORT, LONG])
    assert short.dtype == np.float32 and short.ndim == 1 and 0.1 < np.abs(long).max() < 1.5  # int16 scaled to +-1
    assert 0.2 < len(short) / SAMPLE_RATE < 1.5  # one word
    n_words = len(LONG.split())
    assert 0.15 * n_words < _speech_span(long) < 0.6 * n_words  # about 175 words per minute
    # speech, not silence or a click: sound over most of the span, energy mostly below 4 kHz
    frames = long[: len(long) // 160 * 160].reshape(-1, 160)
    assert (np.sqrt((frames ** 2).mean(1)) > 0.01).mean() > 0.5
    spectrum = np.abs(np.fft.rfft(long)) ** 2
    freqs = np.fft.rfftfreq(len(long), 1 / SAMPLE_RATE)
    assert spectrum[(freqs > 80) & (freqs < 4000)].sum() > 0.8 * spectrum.sum()


def test_espeak_is_deterministic_and_follows_its_params(espeak):
    again, = espeak([LONG])
    assert np.array_equal(again, espeak([LONG])[0])
    fast, = espeak_ng(EspeakParams(rate=350), "cpu")([LONG])
    assert _speech_span(fast) < 0.7 * _speech_span(again)


def _synthesise_in_child(sentence):
    return espeak_ng(EspeakParams(), "cpu")([sentence])[0]


def test_espeak_is_safe_in_threads_and_in_forked_workers(espeak):
    sentences = [SHORT, LONG, "One two three.", "Brain to text."]
    expected = espeak(sentences)
    results = {}

    def work(i):
        results[i] = [espeak([s])[0] for s in sentences]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):  # concurrent calls give exactly the sequential audio (the lock serialises espeak)
        assert all(np.array_equal(a, b) for a, b in zip(results[i], expected))
    # DataLoader workers are forked by default: the library initialised in this process keeps working there
    with multiprocessing.get_context("fork").Pool(2) as pool:
        in_children = pool.map(_synthesise_in_child, sentences)
    assert all(np.array_equal(a, b) for a, b in zip(in_children, expected))


# ----------------------------------------------------------------------------------------------
# log_mel


def test_log_mel_frames_cover_the_audio_at_40_ms(mels):
    assert (mels.dim, mels.frame_rate) == (80, 25.0)
    rng = np.random.default_rng(0)
    for n_samples, n_frames in ((16_000, 25), (16_000 + 500, 26), (800, 2), (10, 1)):
        (frames,) = mels([rng.standard_normal(n_samples).astype(np.float32) * 0.1])
        # Whisper gives n // 160 mel frames (10 ms); 4 of them per frame, the last partial one kept
        assert frames.shape == (n_frames, 80) and frames.dtype == np.float32
    wide = log_mel(LogMelParams(n_mels=128, pool=2), "cpu")
    assert wide([np.zeros(16_000, np.float32)])[0].shape == (50, 128) and wide.frame_rate == 50.0


def test_log_mel_pools_whisper_log_mels(mels, espeak):
    (speech,) = espeak([LONG])
    mel = mels.log_mels([speech])[0]  # (n // 160, 80) Whisper log-mels
    assert mel.shape == (len(speech) // 160, 80)
    # batched with a longer waveform (more padding): the same frames, to the last one
    np.testing.assert_allclose(mels.log_mels([speech, np.tile(speech, 3)])[0], mel, atol=1e-5)
    np.testing.assert_allclose(mels.log_mels([speech[:5000], speech])[0], mels.log_mels([speech[:5000]])[0], atol=1e-5)
    (pooled,) = mels([speech])  # default: no normalisation beyond Whisper's own
    np.testing.assert_allclose(pooled[0], mel[:4].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[-1], mel[(len(mel) - 1) // 4 * 4:].mean(0), rtol=1e-5, atol=1e-6)
    normalised = log_mel(LogMelParams(normalize="mean_std"), "cpu")([speech])[0]
    normalised_mel = (mel - mel.mean(0)) / np.maximum(mel.std(0), 1e-3)  # per utterance and channel
    np.testing.assert_allclose(normalised[1], normalised_mel[4:8].mean(0), rtol=1e-4, atol=1e-4)
    # informative: different sentences differ by more than one sentence spoken at another rate
    same_fast, = log_mel(LogMelParams(), "cpu")(espeak_ng(EspeakParams(rate=220), "cpu")([LONG]))
    other, = mels(espeak(["Seven small green boxes sit on my kitchen table by the window today."]))

    def average(frames):  # sentence-level spectrum, centred by the mean of the three
        return frames.mean(0)

    centre = (average(pooled) + average(same_fast) + average(other)) / 3
    a, b, c = (average(x) - centre for x in (pooled, same_fast, other))
    assert np.linalg.norm(a - b) < 0.5 * np.linalg.norm(a - c)


def test_log_mel_projection_is_fixed_by_its_seed(espeak):
    (speech,) = espeak([SHORT])
    projected = log_mel(LogMelParams(dim=32, projection_seed=3), "cpu")
    a = projected([speech])[0]
    assert a.shape[1] == 32 and projected.dim == 32
    assert np.array_equal(a, log_mel(LogMelParams(dim=32, projection_seed=3), "cpu")([speech])[0])
    assert not np.allclose(a, log_mel(LogMelParams(dim=32, projection_seed=4), "cpu")([speech])[0])


# ----------------------------------------------------------------------------------------------
# qwen2_audio: tiny encoders saved alone and inside a full Qwen2-Audio model


@pytest.fixture(scope="module")
def qwen2_folders(tmp_path_factory):
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoder, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration

    root = tmp_path_factory.mktemp("qwen2_audio")
    # max_source_positions 1500: the real model's 3000 mel-frame window, at a tiny width
    audio = Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                                    encoder_ffn_dim=32, d_model=16, max_source_positions=1500)
    text = dict(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    full = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(audio_config=audio.to_dict(), text_config=text))
    full.save_pretrained(root / "full")
    tower = full.model.audio_tower
    assert isinstance(tower, Qwen2AudioEncoder)
    tower.save_pretrained(root / "encoder")
    return root


def test_qwen2_audio_pads_to_3000_mel_frames_and_keeps_the_frames_of_real_audio(qwen2_folders):
    encoder = qwen2_audio(Qwen2AudioParams(model=str(qwen2_folders / "encoder")), "cpu")
    assert (encoder.window_frames, encoder.dim, encoder.frame_rate) == (3000, 16, 25.0)
    rng = np.random.default_rng(0)
    one_second = rng.standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
    features, n_mel = encoder.mel_windows([one_second])
    assert features.shape == (1, 128, 3000) and n_mel.tolist() == [100]
    five_seconds = rng.standard_normal(5 * SAMPLE_RATE).astype(np.float32) * 0.1
    alone, = encoder([one_second])
    batched = encoder([five_seconds, one_second])
    # 100 mel frames -> 50 after the stride-2 conv -> 25 after pooling: 40 ms frames, padding dropped
    assert alone.shape == (25, 16) and batched[0].shape == (125, 16)
    # the padding is masked: the frames do not depend on what else shares the batch
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)
    # longer than the 30 s window: encoded in windows, frames concatenated
    long_frames, = encoder([np.tile(one_second, 31)])
    assert long_frames.shape == (750 + 25, 16)


def test_qwen2_audio_loads_the_tower_from_a_full_checkpoint_or_alone(qwen2_folders):
    speech = np.sin(np.arange(SAMPLE_RATE) * 0.05).astype(np.float32)
    alone = qwen2_audio(Qwen2AudioParams(model=str(qwen2_folders / "encoder")), "cpu")
    from_full = qwen2_audio(Qwen2AudioParams(model=str(qwen2_folders / "full")), "cpu")
    assert alone.identity["weights"] == from_full.identity["weights"]  # the same tower, not a fresh init
    np.testing.assert_array_equal(alone([speech])[0], from_full([speech])[0])
    half = qwen2_audio(Qwen2AudioParams(model=str(qwen2_folders / "encoder"), dtype="bfloat16"), "cpu")
    assert half.model.conv1.weight.dtype == torch.bfloat16
    np.testing.assert_allclose(half([speech])[0], alone([speech])[0], atol=0.1)
    assert not half.model.training  # eval mode: no dropout


def test_qwen2_audio_refuses_a_folder_without_an_audio_tower(qwen2_folders, tiny_vits):
    with pytest.raises(UserError, match="no Qwen2-Audio audio tower"):
        qwen2_audio(Qwen2AudioParams(model=str(tiny_vits)), "cpu")
    with pytest.raises(UserError, match="cannot load Qwen2AudioEncoder"):
        qwen2_audio(Qwen2AudioParams(model=str(qwen2_folders / "nothing_here")), "cpu")


# ----------------------------------------------------------------------------------------------
# mms_tts: a tiny VITS and its tokenizer


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory):
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    root = tmp_path_factory.mktemp("vits")
    vocab = {c: i for i, c in enumerate(["<pad>", "<unk>", " ", "'", *"abcdefghijklmnopqrstuvwxyz"])}
    (root / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(str(root / "vocab.json"), language="eng", add_blank=True, normalize=True,
                              phonemize=False)
    config = VitsConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        ffn_dim=32, flow_size=16, spectrogram_bins=33, upsample_initial_channel=16,
                        upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],  # 16 samples per frame: fast
                        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                        duration_predictor_filter_channels=16, prior_encoder_num_wavenet_layers=1,
                        posterior_encoder_num_wavenet_layers=1, sampling_rate=16_000)
    torch.manual_seed(0)
    VitsModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_mms_tts_loads_a_saved_vits_and_is_seeded_per_sentence(tiny_vits):
    tts = mms_tts(MmsTtsParams(model=str(tiny_vits)), "cpu")
    together = tts(["hello there", "brain to text"])
    assert all(w.dtype == np.float32 and w.ndim == 1 and len(w) % 16 == 0 and np.abs(w).max() > 0 for w in together)
    # a sentence's audio depends on the sentence and the seed only, not on its batch or the global RNG
    torch.manual_seed(123)
    assert np.array_equal(tts(["brain to text"])[0], together[1])
    other_seed = mms_tts(MmsTtsParams(model=str(tiny_vits), seed=1), "cpu")
    assert not np.array_equal(other_seed(["brain to text"])[0], together[1])
    assert other_seed.identity["weights"] == tts.identity["weights"]


def test_mms_tts_and_qwen2_audio_make_targets_together(tiny_vits, qwen2_folders):
    maker = build_target_maker(TargetParams(
        tts=ComponentSpec("mms_tts", {"model": str(tiny_vits)}),
        encoder=ComponentSpec("qwen2_audio", {"model": str(qwen2_folders / "full")}), batch_size=2))
    assert (maker.name, maker.dim, maker.frame_rate) == ("mms_tts+qwen2_audio", 16, 25.0)
    frames = maker(["hello there", "brain to text", "one"])
    assert [f.shape[1] for f in frames] == [16, 16, 16] and all(len(f) >= 1 for f in frames)
    with pytest.raises(UserError, match="no character"):
        maker(["123"])  # nothing the tiny vocabulary can say


# ----------------------------------------------------------------------------------------------
# TargetMaker, config hash, errors


def test_default_maker_is_espeak_and_log_mel():
    maker = build_target_maker(TargetParams())
    assert (maker.name, maker.dim, maker.frame_rate) == ("espeak_ng+log_mel", 80, 25.0)
    short, long = maker([SHORT, LONG])
    assert short.dtype == np.float32 and short.shape[1] == 80 and 5 <= len(short) < len(long)
    with pytest.raises(UserError, match="empty sentence"):
        maker(["  "])


def _hash(**changes):
    params = {"tts": {"name": "espeak_ng", "params": {}}, "encoder": {"name": "log_mel", "params": {}}}
    for key, value in changes.items():
        section, name = key.split("__")
        if section in ("tts", "encoder"):
            params[section]["params"][name] = value
        else:
            params[name] = value
    return build_target_maker(resolve_target_params(params)).config_hash


def test_config_hash_follows_everything_that_changes_the_targets():
    base = _hash()
    assert base == _hash() and len(base) == 16
    changed = [_hash(tts__rate=200), _hash(tts__voice="en-us+Alex"), _hash(tts__seed=1), _hash(encoder__pool=2),
               _hash(encoder__n_mels=128), _hash(encoder__dim=40), _hash(encoder__normalize="mean")]
    assert len({base, *changed}) == len(changed) + 1
    # where and how fast they are computed does not change them
    assert _hash(top__batch_size=2) == base and _hash(top__device="auto") == base


@pytest.mark.parametrize("params, message", [
    ({"tts": {"name": "espeak"}}, r"model_params.targets.tts.name: unknown TTS engine 'espeak'; did you mean 'espeak_ng'\?"),
    ({"encoder": {"name": "logmel"}}, r"unknown audio encoder 'logmel'; did you mean 'log_mel'\?"),
    ({"tts": {"name": "espeak_ng", "params": {"vioce": "en-us"}}},
     r"model_params.targets.tts.params.vioce: unknown key; did you mean 'voice'\?"),
    ({"tts": {"name": "espeak_ng", "params": {"voice": "en-uss"}}},
     r"params.voice: unknown espeak-ng voice .en-uss.; did you mean .en-us.\?"),
    ({"tts": {"name": "espeak_ng", "params": {"voice": "en-us+storm"}}},
     r"unknown espeak-ng variant .storm.; did you mean .Storm.\?"),
    ({"tts": {"name": "espeak_ng", "params": {"rate": 20}}}, r"params.rate: 20 is outside 80..450"),
    ({"encoder": {"name": "log_mel", "params": {"n_mels": 64}}}, r"params.n_mels: 64 is not one of 80, 128"),
    ({"encoder": {"name": "log_mel", "params": {"pool": 0}}}, r"params.pool: is 0: it must be at least 1"),
    ({"batch_size": 0}, r"model_params.targets.batch_size: is 0: it must be at least 1"),
    ({"device": "gpu"}, r"model_params.targets.device: 'gpu' is not a device"),
])
def test_bad_names_and_params_are_user_errors(params, message):
    with pytest.raises(UserError, match=message):
        build_target_maker(resolve_target_params(params))


def test_config_loading_types_the_component_params():
    params = resolve_target_params({"tts": {"name": "espeak_ng", "params": {"rate": 200}}})
    assert isinstance(params.tts.params, EspeakParams) and params.tts.params.rate == 200
    assert isinstance(params.encoder.params, LogMelParams)
    assert resolve_target_params(params) == params  # idempotent: already typed params pass through


def test_precompute_benchmark_runs(tmp_path, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "target_precompute.py"
    spec = importlib.util.spec_from_file_location("target_precompute", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "figures.json"
    assert bench.main(["--skip-full", "--sentences", "4", "--repeats", "1", "--json", str(out)]) == 0
    assert "| espeak_ng+log_mel (80-d) | cpu | float32 | 4 x 1 |" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert row["end_to_end_per_s"] > 0 and row["read_per_s"] > 0 and row["frames_per_sentence"] > 5
