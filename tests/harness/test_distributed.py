"""Several processes (torchrun, DDP on gloo) and gradient accumulation.

What "a two-process run matches one process" means here, and why each comparison must hold:
- Batches: N ranks at one step take N consecutive batches of the one-process stream, which are
  exactly the batches a one-process run with grad_accum_steps=N takes for that step.
- One update: DDP averages the ranks' gradients; one process on the union of their batches takes
  the gradient of the mean loss over all its trials. Same update, up to the order of float sums.
- Evaluation: the batches are made before they are shared out, each batch is decoded by the same
  weights with the same deterministic CPU kernels (one thread), and rank 0 puts the rows back in
  order: per_trial.csv must be byte-identical.
"""

import contextlib
import csv
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from config import TrainingParams
from harness import distributed
from harness.batching import Batch, TrainBatchSampler, TrialDataset, collate
from harness.data import FeatureStore, find_sessions, read_trials
from harness.errors import UserError
from harness.model_api import DecoderModel
from harness.train import backward, build_optimizer, loss_function
from tests.conftest import REPO_ROOT, TINY_CONFIG

SEED = 0


# ----------------------------------------------------------------------------------------------
# Batches per rank


def test_each_rank_takes_its_own_consecutive_batches_of_the_one_process_stream(small_dataset):
    trials = read_trials(small_dataset, find_sessions(small_dataset), "train", 512)
    args = dict(trials=trials, batch_size=4, days_per_batch=2, seed=3, num_steps=6)
    one = TrainBatchSampler(**args)
    stream = [one.batch_for_step(i) for i in range(24)]
    assert list(one) == stream[:6]

    ranks = [list(TrainBatchSampler(**args, rank=r, world_size=2, grad_accum_steps=2)) for r in range(2)]
    # update s, micro-batch k = micro-step m = 2s + k: rank r takes global batch 2m + r
    assert ranks[0] == stream[0::2] and ranks[1] == stream[1::2]
    for batch in ranks[0] + ranks[1]:  # days_per_batch holds for every rank's batch
        assert len({trials[i].day for i in batch}) == 2 and len(batch) == 4
    # 2 ranks see exactly the batches of one process accumulating 2 micro-batches per update
    two_ranks = [list(TrainBatchSampler(**args, rank=r, world_size=2)) for r in range(2)]
    assert [b for pair in zip(*two_ranks) for b in pair] == list(TrainBatchSampler(**args, grad_accum_steps=2))
    # resuming at update 2 continues where the uninterrupted sampler was
    resumed = TrainBatchSampler(**args, start_step=2, rank=1, world_size=2, grad_accum_steps=2)
    assert list(resumed) == ranks[1][4:] and len(resumed) == 8


# ----------------------------------------------------------------------------------------------
# One update: DDP on two ranks vs one process on the union; gradient accumulation


def ctc_setup(data_dir, model_seed=SEED):
    """The CTC baseline (its loss is a mean over trials) without dropout, its optimizer, the data."""
    from ctc_baseline.model import CTCBaseline, CTCBaselineParams

    sessions = find_sessions(data_dir)
    trials = read_trials(data_dir, sessions, "train", 512)
    dataset = TrialDataset(trials, FeatureStore(trials, "memory"))
    torch.manual_seed(model_seed)
    model = CTCBaseline(CTCBaselineParams(n_days=len(sessions), n_features=512, n_units=16, n_layers=1,
                                          patch_size=2, patch_stride=1, input_dropout=0.0, rnn_dropout=0.0))
    # AdamW's eps as in the baseline's recipe (0.1): with a tiny eps its first step is lr * sign(gradient),
    # which turns float-rounding noise in near-zero gradients into full-size differences
    tp = TrainingParams(lr_max=0.01, lr_min=0.01, eps=0.1)
    optimizer, _ = build_optimizer(model, tp)
    return model, tp, optimizer, dataset, trials


def batch_of(dataset, indices) -> Batch:
    return collate([dataset[i] for i in indices])


class HalfUsed(DecoderModel):
    """A model whose loss leaves one layer without gradients."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(2, 1), nn.Linear(2, 1)

    def loss(self, batch):
        return {"loss": self.used(batch).pow(2).mean()}


def unused_parameter_errors() -> list:
    """Two steps of HalfUsed under DDP, without and with find_unused_parameters: the errors."""
    errors = []
    for find in (False, True):
        loss_fn, no_sync = loss_function(HalfUsed(), TrainingParams(find_unused_parameters=find), torch.device("cpu"))
        try:
            for _ in range(2):
                backward(loss_fn, no_sync, torch.ones(3, 2))
            errors.append(None)
        except UserError as error:
            errors.append(str(error))
    return errors


def ddp_worker(rank, data_dir, port, out_file):
    """One of two gloo ranks, joined the way torchrun joins them (env://): one DDP update."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu")):
        # rank 1 starts from other weights: DDP must give it rank 0's before the step
        model, tp, optimizer, dataset, trials = ctc_setup(data_dir, model_seed=SEED + rank)
        sampler = TrainBatchSampler(trials, 4, 2, seed=1, num_steps=1, rank=rank, world_size=2)
        loss_fn, no_sync = loss_function(model, tp, torch.device("cpu"))
        optimizer.zero_grad()
        values = backward(loss_fn, no_sync, batch_of(dataset, next(iter(sampler))))
        optimizer.step()
        gathered = distributed.gather_object({"values": values, "model": model.state_dict(),
                                              "unused_errors": unused_parameter_errors()})
        if distributed.is_main():
            torch.save(gathered, out_file)


def moved(initial: dict, model) -> set:
    """Names of the tensors a step moved well beyond the tolerance of the comparisons."""
    return {k for k, v in model.state_dict().items() if (v - initial[k]).abs().max() > 1e-3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_make_the_update_of_one_process_on_the_union_of_their_batches(small_dataset, tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(ddp_worker, args=(str(small_dataset), free_port(), str(out)), nprocs=2)
    ranks = torch.load(out, weights_only=True)

    model, tp, optimizer, dataset, trials = ctc_setup(small_dataset)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = TrainBatchSampler(trials, 4, 2, seed=1, num_steps=2)  # the ranks' batches, in one stream
    with torch.no_grad():
        halves = [float(model.loss(batch_of(dataset, b))["loss"]) for b in (first, second)]
    optimizer.zero_grad()
    backward(model.loss, contextlib.nullcontext, batch_of(dataset, first + second))
    optimizer.step()

    for key, value in model.state_dict().items():
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key  # the ranks agree exactly
        torch.testing.assert_close(ranks[0]["model"][key], value, rtol=1e-5, atol=1e-6)  # float sums reorder
    assert {"h0", "day_weights.0", "gru.weight_ih_l0", "out.weight"} <= moved(initial, model)
    # the logged loss is the mean over the ranks, the same on both
    assert ranks[0]["values"] == ranks[1]["values"]
    assert ranks[0]["values"]["loss"] == pytest.approx(sum(halves) / 2, rel=1e-5)
    # a step that leaves parameters without gradients: a plain error naming the knob, which fixes it
    assert "training_params.find_unused_parameters: true" in ranks[0]["unused_errors"][0]
    assert ranks[0]["unused_errors"][1] is None


def test_accumulating_two_batches_is_one_step_on_their_concatenation(small_dataset):
    accumulated, _, optimizer_a, dataset, trials = ctc_setup(small_dataset)
    concatenated, _, optimizer_b, _, _ = ctc_setup(small_dataset)
    initial = {k: v.clone() for k, v in accumulated.state_dict().items()}
    first, second = TrainBatchSampler(trials, 4, 2, seed=1, num_steps=2)

    optimizer_a.zero_grad()
    backward(accumulated.loss, contextlib.nullcontext, batch_of(dataset, first), accum=2, final=False)
    backward(accumulated.loss, contextlib.nullcontext, batch_of(dataset, second), accum=2, final=True)
    optimizer_a.step()
    optimizer_b.zero_grad()
    backward(concatenated.loss, contextlib.nullcontext, batch_of(dataset, first + second))
    optimizer_b.step()

    for key, value in concatenated.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert {"h0", "day_weights.0", "gru.weight_ih_l0", "out.weight"} <= moved(initial, concatenated)


# ----------------------------------------------------------------------------------------------
# torchrun end to end: main.py run and main.py evaluate


def cli(*args, nproc=1, timeout=300):
    """main.py in one process, or under torchrun (torch.distributed.run is torchrun's entry point)."""
    env = dict(os.environ, B2T_PLUGINS="tests.tiny_plugin", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 else [])
    return subprocess.run([*launch, str(REPO_ROOT / "main.py"), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate_as_one(small_dataset, tmp_path):
    """2 ranks vs 1 process accumulating 2 batches per update (the same batches, see above), on the
    tiny model (no dropout, no augmentation: no random draws) with one CPU thread per process.
    The weights must be bit-identical, not merely close: each rank's gradient is halved (exact, a
    power of two) and the two are summed (the same in either order), which is also what one process
    does with grad_accum_steps=2. Hence identical predictions. eval_batch_size 2 makes several
    evaluation batches per session, so the ranks' shares interleave."""
    common = ["--config", TINY_CONFIG, "--set", f"data_params.data_dir={small_dataset}",
              "--set", "data_params.eval_batch_size=2", "--set", "training_params.num_steps=6",
              "--set", "training_params.val_every=3", "--set", "training_params.checkpoint_every=3"]
    two = cli("run", *common, "--out", tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = cli("run", *common, "--set", "training_params.grad_accum_steps=2", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]

    # rank 0 alone logs and writes: one "finished" line, one TensorBoard file, rank 1 silent
    output = two.stdout + two.stderr
    assert output.count("finished: ") == 1 and output.count("validation at step 6") == 1 and "[rank 1]" not in output
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert json_of(tmp_path / "two" / "meta.json")["world_size"] == 2

    a = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    assert a["train_state"] == b["train_state"] and len(a["rng_by_rank"]) == 2
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = read_rows(tmp_path / "two" / "per_trial.csv")
    keys = [(r["split"], r["session"], r["block_num"], r["trial_num"]) for r in rows]
    assert len(keys) == len(set(keys)) == 10  # 6 val + 4 test trials, each once
    assert (tmp_path / "two" / "per_trial.csv").read_text() == (tmp_path / "one" / "per_trial.csv").read_text()

    # evaluate: the same checkpoint decoded by 2 ranks and by 1 process
    evals = {}
    for n in (2, 1):
        result = cli("evaluate", "--checkpoint", tmp_path / "two", "--data-dir", small_dataset, "--split", "val",
                     "--out", tmp_path / f"eval{n}", nproc=n)
        assert result.returncode == 0, result.stderr[-3000:]
        evals[n] = (tmp_path / f"eval{n}" / "per_trial.csv").read_text()
    assert evals[2] == evals[1]
    assert json_of(tmp_path / "eval2" / "metrics.json")["val"] == json_of(tmp_path / "eval1" / "metrics.json")["val"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["predicted_phonemes"] for r in read_rows(tmp_path / "eval2" / "per_trial.csv")] == \
        [r["predicted_phonemes"] for r in val_rows]


def json_of(path):
    import json

    return json.loads(path.read_text())
