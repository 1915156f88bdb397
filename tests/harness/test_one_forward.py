"""One encoder forward per evaluation batch: every shipped model's `evaluate` gives the loss and the
rows of the two-forward path (the base class's loss() then decode()) from one pass, and
`decode_words=False` skips the word decoder and nothing else."""

import functools
import logging

import pytest
import torch

from config import load_config
from harness import runner
from harness.batching import collate, eval_batches
from harness.data import FeatureStore
from harness.evaluation import apply_preprocessors, evaluate_split
from harness.model_api import DecoderModel
from harness.plugins import load_plugins
from tests.conftest import REPO_ROOT

load_plugins()  # the models, word decoders and preprocessors the configs name

EVAL_BATCH = 16  # several batches per session of the synthetic val split
N_VAL = 40  # val trials decoded: a few batches (generation is the slow part of llm_decoder)
# the tiny LM needs not be good here, nor its (untrained) generations long
QUICK = {"llm_decoder": ["model_params.lm.tiny.steps=60", "model_params.generation.max_new_tokens=8"]}


def build(name: str, dataset, *sets):
    """The model of configs/<name>/tiny.yml (untrained), its val trials, their store, the preprocessors."""
    config = load_config(REPO_ROOT / "configs" / name / "tiny.yml", [f"data_params.data_dir={dataset}", *sets])
    trials, preprocessors = runner.prepare_data(config, ["train", "val"])
    torch.manual_seed(0)
    model = runner.build_model(config, list(config.data_params.sessions), trials, torch.device("cpu"))
    val = runner.drop_short_trials(trials, model.min_time_steps, "skip")[0]["val"][:N_VAL]
    return model, val, FeatureStore(val), preprocessors


class Encodes:
    """Counts the shared encoder's passes (GRUEncoder.encode, what every forward of these models runs;
    a hook on the nn.GRU would miss the packed CPU path, which reads the GRU's weights directly) and
    records the padded length each one saw."""

    def __init__(self, model):
        self.lengths = []
        encode = model.encode

        def counted(features, lengths, day_indices):
            self.lengths.append(features.shape[1])
            return encode(features, lengths, day_indices)

        model.encode = counted  # an instance attribute: self.encode(...) inside the model finds it first

    @property
    def n(self) -> int:
        return len(self.lengths)

    def reset(self):
        self.lengths.clear()


def two_forward(model):
    """Makes `model.evaluate` the base class's: loss() then decode()."""
    model.evaluate = functools.partial(DecoderModel.evaluate, model)


def one_forward(model):
    vars(model).pop("evaluate", None)


def split(model, val, store, preprocessors, **kwargs):
    return evaluate_split(model, "val", val, store, preprocessors, device=torch.device("cpu"),
                          eval_batch_size=EVAL_BATCH, bootstrap_resamples=0, **kwargs)


def first_batch(val, store, preprocessors):
    items = [(val[i], store[i]) for i in eval_batches(val, EVAL_BATCH)[0]]
    return apply_preprocessors(collate(items), preprocessors, training=False)


@pytest.mark.parametrize("name", ["ctc_baseline", "gru_align", "llm_decoder"])
def test_one_forward_gives_the_loss_and_rows_of_two(name, synthetic_dataset):
    model, val, store, preprocessors = build(name, synthetic_dataset, *QUICK.get(name, []))
    assert type(model).evaluate is not DecoderModel.evaluate  # every shipped model shares its forward
    n_batches = len(eval_batches(val, EVAL_BATCH))
    assert n_batches > 1
    encodes = Encodes(model)

    two_forward(model)
    rows_two, metrics_two, loss_two = split(model, val, store, preprocessors, with_loss=True)
    assert encodes.n == 2 * n_batches  # the counter sees what it must: loss() and decode() each encode
    one_forward(model)
    encodes.reset()
    rows_one, metrics_one, loss_one = split(model, val, store, preprocessors, with_loss=True)
    assert encodes.n == n_batches
    assert rows_one == rows_two and len(rows_one) == len(val)
    assert loss_two is not None and abs(loss_one - loss_two) <= 1e-6 * max(1.0, abs(loss_two))
    assert metrics_one == metrics_two

    # every loss part of a batch, not only the total; no loss asked (the final decoding): none given
    model.eval()
    with torch.no_grad():
        batch = first_batch(val, store, preprocessors)
        encodes.reset()
        parts_one, batch_rows_one = model.evaluate(batch, with_loss=True)
        assert encodes.n == 1
        parts_two, batch_rows_two = DecoderModel.evaluate(model, batch, with_loss=True)
        assert batch_rows_one == batch_rows_two and set(parts_one) == set(parts_two) and "loss" in parts_one
        for key in parts_two:
            assert abs(float(parts_one[key]) - float(parts_two[key])) <= 1e-6 * max(1.0, abs(float(parts_two[key]))), key
        assert model.evaluate(batch, with_loss=False)[0] is None
        assert model.decode(batch) == batch_rows_one  # decode() keeps its behaviour (words decoded)


def test_decode_words_false_skips_only_the_word_decoder(synthetic_dataset, caplog):
    model, val, store, preprocessors = build("ctc_baseline", synthetic_dataset)
    assert type(model.word_decoder).__name__ == "LexiconNgramDecoder"  # the tiny config's lexicon + 3-gram
    encodes = Encodes(model)
    with caplog.at_level(logging.INFO, logger="b2t.progress"):
        words, words_metrics, words_loss = split(model, val, store, preprocessors, with_loss=True)
        greedy, greedy_metrics, greedy_loss = split(model, val, store, preprocessors, with_loss=True,
                                                    decode_words=False, name="validate")
    assert encodes.n == 2 * len(eval_batches(val, EVAL_BATCH))
    assert all(isinstance(r["predicted_text"], str) for r in words)
    assert all(r["predicted_text"] is None for r in greedy)  # no search ran
    assert [r["predicted_phonemes"] for r in greedy] == [r["predicted_phonemes"] for r in words]
    assert greedy_metrics["per"] == words_metrics["per"] and greedy_metrics["wer"] is None
    assert words_metrics["wer"] is not None and greedy_loss == words_loss
    # one log line per pass, under its name
    lines = [r.getMessage() for r in caplog.records if r.name == "b2t.progress"]
    assert [line.split(":")[0] for line in lines] == ["decode val", "validate"], lines


def test_pad_to_multiple_reaches_the_model_and_changes_no_row(synthetic_dataset):
    model, val, store, preprocessors = build("ctc_baseline", synthetic_dataset)
    encodes = Encodes(model)
    plain = split(model, val, store, preprocessors, decode_words=False)[0]
    assert any(n % 64 for n in encodes.lengths)
    encodes.reset()
    padded = split(model, val, store, preprocessors, decode_words=False, pad_to_multiple=64)[0]
    assert encodes.lengths and all(n % 64 == 0 for n in encodes.lengths)
    assert padded == plain  # lengths stay true: padding never reaches a valid output
