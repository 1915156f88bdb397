"""The training loop: one readable file, every knob in `TrainingParams`.

AdamW over the parameter groups the model names, a per-group LambdaLR (linear warmup, then cosine
or linear decay to lr_min, flat after), gradient-norm clipping, optional bf16 autocast and
torch.compile, validation every `val_every` steps with the best checkpoint kept, resumable
checkpoints every `checkpoint_every` steps, scalars and validation panels for the experiment trackers
(harness/trackers.py; TensorBoard by default), a progress bar, optional early stop,
gradient accumulation (`grad_accum_steps`), an optional exponential moving average of the weights
(`ema_decay`: validation and best.pt on the average).

Under torchrun (harness/distributed.py) every rank runs this loop on its own batches, the model
wrapped in DistributedDataParallel so that gradients are averaged before each update; validation
is shared out across the ranks; rank 0 alone logs, writes checkpoints and decides early stopping,
and tells the others.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import operator
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import to_data
from harness import distributed
from harness.batching import TrainBatchSampler, TrialDataset, collate
from harness.errors import UserError, brief
from harness.evaluation import apply_preprocessors, autocast, evaluate_split
from harness.plugins import plugin_records
from harness.results import atomic_write_bytes, partial_writes
from harness.trackers import FIGURE_RESAMPLES, Trackers, is_number, log_validation

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_lambda(lr_max: float, lr_min: float, warmup: int, decay: int, kind: str):
    """Multiplier of lr_max at a step: warmup 0 -> 1 over `warmup` steps, then down to lr_min/lr_max
    at step `decay`, flat after (the reference's cosine schedule; linear and constant as options)."""
    ratio = lr_min / lr_max if lr_max > 0 else 1.0

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, decay - warmup))
        if kind == "linear":
            return max(ratio, 1.0 - (1.0 - ratio) * progress)
        return max(ratio, ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


def group_setting(tp, group_name: str):
    """key -> the group's override from training_params.param_groups, else the training_params value."""
    override = tp.param_groups.get(group_name)

    def setting(key: str):
        value = getattr(override, key) if override is not None else None
        return getattr(tp, key) if value is None else value

    return setting


def build_optimizer(model, tp):
    """AdamW with one group per name the model gives its parameters; groups take their settings from
    training_params.param_groups.<name>, falling back to the training_params values."""
    grouped: dict[str, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grouped.setdefault(model.param_group(name), []).append(param)
    unknown = set(tp.param_groups) - set(grouped)
    if unknown:
        log.warning("training_params.param_groups names groups the model does not use: %s", sorted(unknown))
    groups, lambdas = [], []
    for group_name, params in grouped.items():
        setting = group_setting(tp, group_name)
        lr_max, decay = setting("lr_max"), setting("lr_decay_steps") or tp.num_steps
        groups.append({"params": params, "lr": lr_max, "weight_decay": setting("weight_decay"), "name": group_name})
        lambdas.append(lr_lambda(lr_max, setting("lr_min"), setting("lr_warmup_steps"), decay, tp.lr_scheduler))
    # fused: one kernel for all parameters, as the reference trainer; same update as the loop version
    optimizer = torch.optim.AdamW(groups, betas=tuple(tp.betas), eps=tp.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]  # plain data: weights_only loads it


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: a kill during the write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """Checkpoint writes that a kill cut short; the checkpoints they were to replace are intact."""
    for partial in partial_writes(ckpt_dir):
        log.warning("removing %s, a checkpoint write that did not finish", partial)
        partial.unlink(missing_ok=True)


def restore_rng(saved: dict) -> None:
    """Each rank takes back its own RNG state."""
    by_rank = saved["rng_by_rank"]
    if len(by_rank) != distributed.world_size():
        log.warning("the checkpoint was written by %d ranks and is resumed by %d: training goes on, but neither "
                    "the batches nor the random draws are those of an uninterrupted run", len(by_rank),
                    distributed.world_size())
    if distributed.rank() < len(by_rank):
        set_rng_state(by_rank[distributed.rank()])


# ----------------------------------------------------------------------------------------------
# Exponential moving average of the weights


class WeightAverage:
    """training_params.ema_decay: torch's AveragedModel with get_ema_multi_avg_fn, updated after every
    optimizer step (after step 1 it holds the weights; after each later step decay * average +
    (1 - decay) * weights). Every rank keeps its own; they agree, as the weights do.

    AveragedModel deep-copies the module it is given, so it is given a module holding only what is
    averaged, under the model's names, not the model: the trainable parameters and the floating-point
    buffers saved with the weights that hold finite values (running statistics such as BatchNorm's).
    The whole model would also copy what training never changes or cannot be copied (llm_decoder's
    frozen language model, a word decoder's worker pool), and use_buffers=True on it would turn a
    buffer holding -inf (an additive attention mask) into NaN. The rest is the model's own.

    Validation and best.pt take the average by copying it into the model's tensors and back
    (`swapped_in`): the model API and a compiled forward are untouched, the trained weights come back
    bit for bit, and best.pt's "model" is a plain state dict of the model that `evaluate` loads."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = model
        saved = set(model.state_dict())
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        named += [(n, b) for n, b in model.named_buffers()
                  if n in saved and b.is_floating_point() and bool(b.isfinite().all())]
        holder = nn.Module()  # the averaged tensors as buffers, in submodules named as the model's
        for name, tensor in named:
            *path, leaf = name.split(".")
            node = holder
            for part in path:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]
            node.register_buffer(leaf, tensor.detach())
        self.average = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.names = [name for name, _ in self.average.module.named_buffers()]  # the order update reads

    def update(self) -> None:
        """After an optimizer step: the first copies the weights, each later one moves the average."""
        self.average.update_parameters(_Tensors(self.model, self.names))

    def _model_tensors(self) -> list[torch.Tensor]:
        return list(_Tensors(self.model, self.names).buffers())

    def copy_to_model(self) -> None:
        with torch.no_grad():
            for mine, averaged in zip(self._model_tensors(), self.average.module.buffers(), strict=True):
                mine.copy_(averaged)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the model holds the average; after: its own weights again, bit for bit."""
        kept = [t.detach().clone() for t in self._model_tensors()]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for mine, own in zip(self._model_tensors(), kept, strict=True):
                    mine.copy_(own)

    def state_dict(self) -> dict:
        return self.average.state_dict()  # n_averaged and module.<the model's name> per tensor

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


class _Tensors:
    """The model's averaged tensors as AveragedModel.update_parameters reads a module (parameters(),
    then buffers()), looked up by name on every call, so a buffer the model reassigns is followed."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, names

    def parameters(self):
        return iter(())

    def buffers(self):
        return (operator.attrgetter(name)(self.model) for name in self.names)


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainState:
    step: int = 0
    best_value: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    validations_without_improvement: int = 0
    history: list = field(default_factory=list)  # one dict per validation


def is_better(value, loss, state: TrainState, mode: str) -> bool:
    """Better metric wins; on a tie the lower validation loss wins (reference: PER, then loss)."""
    if value is None:
        return False
    if state.best_value is None:
        return True
    if value != state.best_value:
        return value < state.best_value if mode == "min" else value > state.best_value
    return loss is not None and (state.best_loss is None or loss < state.best_loss)


class LossOf(nn.Module):
    """forward(batch) = model.loss(batch). DistributedDataParallel averages the gradients of what
    runs through its wrapper's forward, and models are trained through loss(), not forward()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def loss_function(model, tp, device: torch.device):
    """(batch -> loss parts, context that skips the gradient all-reduce). One process: the model's
    own loss and nothing to skip. Several: DDP around LossOf(model); it starts by broadcasting rank
    0's parameters and buffers, so every rank starts from the same weights."""
    if distributed.world_size() == 1:
        return model.loss, contextlib.nullcontext
    ddp = DistributedDataParallel(LossOf(model), device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=tp.find_unused_parameters)
    return ddp, ddp.no_sync


def _losses(loss_fn, batch) -> dict:
    try:
        return loss_fn(batch)
    except RuntimeError as error:  # DDP's way of saying a step left parameters without gradients
        if "find_unused_parameters" in str(error):
            raise UserError("a training step left some model parameters without gradients, which DDP refuses: "
                            "set training_params.find_unused_parameters: true") from None
        raise


def backward(loss_fn, no_sync, batch, accum: int = 1, final: bool = True,
             amp=contextlib.nullcontext) -> dict[str, float]:
    """Forward and backward of one of the `accum` micro-batches of an update; returns its loss parts
    averaged over the ranks. The loss is scaled by 1/accum: each micro-batch loss is a mean over its
    trials, so the summed gradients are those of the mean over all of them. Under DDP the gradients
    are all-reduced (averaged) only on the final micro-batch; no_sync skips it on the others."""
    with contextlib.nullcontext() if final else no_sync():  # forward and backward inside, as DDP asks
        with amp():
            parts = _losses(loss_fn, batch)
        (parts["loss"] / accum).backward()
    return distributed.mean_across_ranks(parts)


def train(model, config, trials: dict, stores: dict, preprocessors, device: torch.device, run_dir: Path,
          resume: bool = False, trackers: Trackers | None = None) -> TrainState:
    """Train `model` in place; leaves checkpoints/{last,best}.pt in run_dir and returns the state. The
    scalars and validation panels go to `trackers` (started here, left open for the caller's final
    metrics), else to trackers of config.output opened and closed here. With
    training_params.ema_decay the model ends holding the average of the weights (last.pt: the trained ones)."""
    tp, dp = config.training_params, config.data_params
    accum = tp.grad_accum_steps  # at least 1: TrainingParams.problems
    ckpt_dir, last = run_dir / "checkpoints", run_dir / "checkpoints" / "last.pt"
    optimizer, scheduler = build_optimizer(model, tp)
    ema = WeightAverage(model, tp.ema_decay) if tp.ema_decay is not None else None  # before compile: copies
    state = resume_from(last, model, optimizer, scheduler, ema) if resume else TrainState()
    save = checkpoint_writer(model, optimizer, scheduler, state, to_data(config), ema)
    if tp.compile:
        model.compile()  # in place: forward is compiled, so loss()/decode() that call self(...) use it
    loss_fn, no_sync = loss_function(model, tp, device)
    own_trackers = trackers is None
    trackers = (Trackers.for_run(config, run_dir) if own_trackers else trackers).start(state.step)  # rank 0's
    loader = train_loader(trials["train"], stores["train"], dp, tp, state.step, device)
    has_val = bool(trials.get("val"))
    bar = tqdm(total=tp.num_steps, initial=state.step, dynamic_ncols=True, desc="train",
               disable=None if tp.progress_bar and distributed.is_main() else True)  # None: only on a terminal
    model.train()
    speed, losses = StepRate(state.step), {}
    for micro_step, batch in enumerate(loader):
        if micro_step % accum == 0:
            optimizer.zero_grad(set_to_none=True)
        final = micro_step % accum == accum - 1  # the last micro-batch of an update: gradients all-reduced
        batch = apply_preprocessors(batch.to(device), preprocessors, training=True)
        values = backward(loss_fn, no_sync, batch, accum, final, lambda: autocast(device, tp.amp_bf16))
        if not math.isfinite(values["loss"]):  # the mean over ranks: every rank stops here together
            raise UserError(f"step {state.step + 1}: the training loss is {values['loss']}; stopping before "
                            "it turns the weights into NaN (check the data and the learning rate)")
        for key, value in values.items():
            losses.setdefault(key, []).append(value)
        if not final:
            continue
        grad_norm = _clip(model, tp.grad_norm_clip)
        optimizer.step()
        if ema is not None:
            ema.update()  # once per optimizer step, not per micro-batch
        scheduler.step()
        state.step += 1
        bar.update(1)

        if state.step % tp.log_every == 0 or state.step == tp.num_steps:
            log_step(losses, grad_norm, optimizer, state, speed, trackers, bar, tp)
            losses = {}
        stop = False
        if has_val and ((tp.val_every and state.step % tp.val_every == 0) or state.step == tp.num_steps):
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # validate the average
                improved, stop = _validate(model, config, trials, stores, preprocessors, device, state, trackers)
                if improved:
                    save(ckpt_dir / "best.pt", resumable=False)  # "model": the average, with EMA
            bar.set_postfix(loss=f"{values['loss']:.3f}", **_best_postfix(state, tp))
        if (tp.checkpoint_every and state.step % tp.checkpoint_every == 0) or state.step == tp.num_steps or stop:
            save(last)
        if stop:
            log.info("early stop at step %d: %d validations without improvement", state.step,
                     state.validations_without_improvement)
            break
    bar.close()
    if own_trackers:
        trackers.close()
    if ema is not None:
        ema.copy_to_model()  # the final decoding without best.pt (or use_best_checkpoint: false) uses the average
    distributed.barrier()  # rank 0's last checkpoints are on disk before any rank reads them
    return state


def resume_from(last: Path, model, optimizer, scheduler, ema: WeightAverage | None = None) -> TrainState:
    """`--resume`: drop what a killed checkpoint write left, then load the last checkpoint (weights,
    optimizer, schedule, step, every rank's RNG, the average of the weights); a fresh state when there
    is none yet. With ema_decay set, a checkpoint without an average is refused: starting the average
    anew from the resumed weights would validate and pick best.pt on weights no uninterrupted run has."""
    if distributed.is_main():
        remove_partial_checkpoints(last.parent)
    if not last.is_file():
        log.info("--resume: no checkpoint in %s yet, starting from step 0", last.parent)
        return TrainState()
    try:
        saved = load_checkpoint(last)
        if ema is not None and "ema" not in saved:
            raise UserError(f"{last}: holds no average of the weights, and training_params.ema_decay is set: "
                            "resume with ema_decay: null in the run's config.yaml, or start a new run")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["train_state"])
        restore_rng(saved)
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        elif "ema" in saved:
            log.warning("%s holds an average of the weights, and training_params.ema_decay is not set: validation "
                        "and best.pt use the trained weights from here on", last)
    except UserError:
        raise
    except Exception as error:  # a truncated file, a crafted pickle (weights_only refuses it), another model's
        raise UserError(f"{last}: cannot resume from it ({brief(error)}); move it away to resume from step 0, "
                        "or start a new run") from None
    log.info("resumed from %s at step %d", last, state.step)
    return state


def checkpoint_writer(model, optimizer, scheduler, state: TrainState, config_data: dict,
                      ema: WeightAverage | None = None):
    """save(path, resumable=True): every rank calls it (rank 0's checkpoint holds every rank's RNG state);
    rank 0 writes. A resumable one (last.pt) holds the average of the weights as "ema" too; best.pt is
    written while the average is swapped into the model, so its "model" is the average."""

    plugins = plugin_records()

    def save(path: Path, resumable: bool = True) -> None:
        rngs = distributed.gather_object(rng_state())
        if distributed.is_main():
            averaged = {"ema": ema.state_dict()} if ema is not None and resumable else {}
            save_checkpoint(path, {
                "config": config_data,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "train_state": vars(state),
                "rng_by_rank": rngs,
                "plugins": plugins,  # so that `evaluate` can say which plugin made this model
                **averaged,
            })

    return save


def train_loader(trials, store, dp, tp, start_step: int, device: torch.device) -> DataLoader:
    """This rank's training batches from `start_step` on (harness/batching.py)."""
    sampler = TrainBatchSampler(trials, dp.batch_size, dp.days_per_batch, dp.seed, tp.num_steps, start_step,
                                rank=distributed.rank(), world_size=distributed.world_size(),
                                grad_accum_steps=tp.grad_accum_steps)
    return DataLoader(TrialDataset(trials, store), batch_sampler=sampler,
                      collate_fn=functools.partial(collate, pad_to_multiple=dp.pad_to_multiple),
                      num_workers=dp.num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator())  # own generator: creating the iterator must not draw
                                                    # from the global RNG, or resume would shift it


class StepRate:
    """Optimizer steps per second since this process started training."""

    def __init__(self, first_step: int):
        self.first_step, self.started = first_step, time.monotonic()

    def __call__(self, step: int) -> float:
        return (step - self.first_step) / max(1e-9, time.monotonic() - self.started)


def log_step(losses: dict, grad_norm: float, optimizer, state: TrainState, speed: StepRate, trackers: Trackers,
             bar, tp) -> None:
    """The mean of each loss part since the last log line, to the trackers, the bar and run.log."""
    means = {k: float(np.mean(v)) for k, v in losses.items()}
    scalars = {f"train/{key}": value for key, value in means.items()}
    scalars["train/grad_norm"] = grad_norm
    scalars.update({f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups})
    trackers.scalars(state.step, scalars)
    bar.set_postfix(loss=f"{means['loss']:.3f}", **_best_postfix(state, tp))
    log.info("step %d loss %.4f grad_norm %.3f %.1f steps/s", state.step, means["loss"], grad_norm, speed(state.step))


def _clip(model, max_norm) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))


def _validate(model, config, trials, stores, preprocessors, device, state, trackers: Trackers) -> tuple[bool, bool]:
    """Validate (shared out across ranks), log; returns (improved, early stop). Rank 0 decides and
    every rank gets its decision and its TrainState, so all of them stop at the same step. Rank 0 also
    gives the trackers the validation's panels (example decodes, figures)."""
    tp, dp, ev = config.training_params, config.data_params, config.evaluation
    rows, metrics, loss = evaluate_split(
        model, "val", trials["val"], stores["val"], preprocessors, device=device,
        eval_batch_size=dp.eval_batch_size, amp=tp.amp_bf16,
        bootstrap_resamples=FIGURE_RESAMPLES if trackers.active else 0,  # the error bars of the trackers' figure
        bootstrap_seed=ev.bootstrap_seed, with_loss=True, decode_words=tp.val_decode_words,
        pad_to_multiple=dp.pad_to_multiple, name="validate", show_progress=tp.progress_bar)
    improved = False
    if distributed.is_main():
        improved = _record_validation(metrics, loss, state, trackers, tp)
        log_validation(trackers, state.step, rows, metrics, model=model, trials=trials["val"], store=stores["val"],
                       preprocessors=preprocessors, device=device, config=config)
    improved, decided = distributed.broadcast_object((improved, vars(state)))
    vars(state).update(decided)
    stop = bool(tp.early_stop_patience) and state.validations_without_improvement >= tp.early_stop_patience
    return improved, stop


def _record_validation(metrics: dict, loss, state: TrainState, trackers: Trackers, tp) -> bool:
    """Log a validation, update the state; True when it is the best so far."""
    value = metrics.get(tp.best_metric)
    record = {"step": state.step, "loss": loss, tp.best_metric: value}
    state.history.append(record)
    scalars = {"val/loss": loss} if loss is not None else {}
    scalars.update({f"val/{key}": metric for key, metric in metrics.items() if is_number(metric)})
    for session, sm in (metrics.get("by_session") or {}).items():
        scalars.update({f"val_by_session/{key}/{session}": metric for key, metric in sm.items() if is_number(metric)})
    trackers.scalars(state.step, scalars)
    if value is None:
        raise RuntimeError(f"training_params.best_metric '{tp.best_metric}' is not among the validation metrics "
                           f"({', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))})")
    improved = is_better(value, loss, state, tp.best_mode)
    if improved:
        state.best_value, state.best_loss, state.best_step = value, loss, state.step
        state.validations_without_improvement = 0
    else:
        state.validations_without_improvement += 1
    log.info("validation at step %d: %s %.4f, loss %s (best %.4f at step %d)", state.step, tp.best_metric, value,
             f"{loss:.4f}" if loss is not None else "n/a", state.best_value, state.best_step)
    return improved


def _best_postfix(state: TrainState, tp) -> dict:
    return {f"best_{tp.best_metric}": f"{state.best_value:.3f}"} if state.best_value is not None else {}

