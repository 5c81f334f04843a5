"""Training: one loop for one CPU or many GPUs (``torchrun ... -m fractalgen train``).

The recipe follows the official one: AdamW (0.9, 0.95), weight decay 0.05 except on biases and
1-D tensors, lr = base_lr * global_batch / 256, linear warm-up then cosine decay, gradient
clipping at 3.0, label drop, red-channel weight; bf16 autocast on CUDA, float32 on CPU; optional
gradient checkpointing and EMA weights. ``micro_batches`` / ``lower_chunks`` > 1 back-propagate the
batch, and the patches below level 0, in parts (``FractalGen.forward_backward``): the same
gradients with a fraction of the activations in memory and no recomputation.

``train`` runs in three steps: set-up (folders, data, model, optimizer, resumed state), the loop
(one optimizer step per batch, logging, evaluation) and checkpoints (``fractalgen.resume``), which
make every run exactly resumable, also with several processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import PRESETS, FractalConfig, get_preset
from .data import SPLIT_LAYOUTS, build_dataset, check_num_classes, collate, training_splits
from .distributed import allreduce_grads, device_for_rank, from_rank0, gather, init_distributed, mean_and_any
from .errors import DataError, FractalGenError
from .model import FractalGen
from .resume import (check_out_folder, latest_checkpoint, load_state, rank_states, restore_rng, rng_state,
                     save_checkpoint)
from .runtime import DTYPES, autocast, make_grid, save_image


#: --resume: never (a new run), always (continue the run in --out), or whichever fits --out.
RESUME_MODES = ("no", "yes", "auto")
#: Options that say how a run is executed, logged and checkpointed, not what it trains: they may
#: change between its starts (every other one must match for --resume auto to continue it).
PER_START_OPTIONS = ("out", "resume", "device", "num_workers", "micro_batches", "lower_chunks", "grad_checkpointing",
                     "save_every", "eval_every", "eval_images", "eval_batch_size", "sample_every")


def _option(default: Any, help: str, **argparse_options: Any) -> Any:
    """A config field with its command-line help (``fractalgen train --help``)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``train_config.json`` in the output folder. Each
    field is the command-line option of the same name (``batch_size`` is ``--batch-size``)."""

    model: str = _option("fractalmar_fmnist28", "preset name (see `fractalgen info`) or a config.json file")
    data: str = _option("fashion-mnist", "fashion-mnist, photos32, an image folder (class sub-folders are the "
                                         "labels) or a .npz/.npy file")
    out: str = _option("runs/fractalgen", "output folder: checkpoints, metrics.jsonl, samples")
    batch_size: int = _option(64, "global batch size, split across the processes")
    steps: int = _option(1000, "total optimizer steps (also the length of the cosine schedule)")
    base_lr: float = _option(5e-5, "learning rate per 256 images: lr = base-lr x batch-size / 256")
    min_lr: float = _option(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = _option(100, "steps of linear learning-rate warm-up")
    weight_decay: float = _option(0.05, "AdamW weight decay (none on biases and 1-D tensors)")
    grad_clip: float = _option(3.0, "clip the gradient norm to this value")
    ema_decay: float = _option(0.0, "keep an exponential moving average of the weights with this decay, saved "
                                    "as ema/ in every checkpoint (0: off)")
    grad_checkpointing: bool = _option(False, "recompute block activations in the backward pass (less memory, "
                                              "slower)")
    micro_batches: int = _option(1, "back-propagate the batch in this many parts (same gradients, less memory)")
    lower_chunks: int = _option(1, "back-propagate the patches below level 0 in this many parts (same gradients, "
                                   "less memory)")
    flip: bool = _option(False, "flip training images horizontally at random")
    seed: int = _option(0, "seed of the weights, data order, masks and flips")
    num_workers: int = _option(0, "data-loading worker processes")
    save_every: int = _option(500, "write a checkpoint every N steps (and at the end)")
    eval_every: int = _option(0, "held-out bits/dim (test, or val with --val-fraction) every N steps "
                                 "(0: only at the end)")
    eval_images: int = _option(1000, "held-out images scored at each evaluation (0: no evaluation)")
    val_fraction: float = _option(0.0, "hold out this fraction of the training images (of the train split, when "
                                       "the data has one) and evaluate on it instead of the test split "
                                       "(`eval nll --val-fraction F --split val` scores the same part); 0: "
                                       "evaluate on the test split, or not at all for data without splits")
    eval_batch_size: int = _option(100, "batch size of the evaluation")
    sample_every: int = _option(0, "also write a sample grid at evaluations whose step is a multiple of N "
                                   "(0: only at the end)")
    device: str = _option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    dtype: str = _option("auto", "autocast precision; auto: bfloat16 on CUDA, float32 elsewhere",
                         choices=("auto", *DTYPES))
    resume: str = _option("no", "continue the run in --out from its latest checkpoint; --resume auto: continue it "
                                "if there is one (started with these options), else start one, so that the same "
                                "command serves a first start and every restart", nargs="?", const="yes",
                          choices=RESUME_MODES)
    allow_upscale: bool = _option(False, "upscale images smaller than the model (otherwise they are refused)")

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):  # resume=True / False, as the field once was
            self.resume = "yes" if self.resume else "no"

    def model_config(self) -> FractalConfig:
        if self.model in PRESETS:
            return get_preset(self.model)
        if Path(self.model).is_file():
            return FractalConfig.load(self.model)
        raise FractalGenError(f"--model {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")

    def validate(self) -> None:
        """Raise a FractalGenError naming the first option out of range."""
        minimum = {"batch_size": 1, "steps": 1, "save_every": 1, "micro_batches": 1, "lower_chunks": 1,
                   "eval_batch_size": 1, "warmup_steps": 0, "eval_every": 0, "eval_images": 0, "sample_every": 0,
                   "num_workers": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise FractalGenError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise FractalGenError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.val_fraction < 1:
            raise FractalGenError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.resume not in RESUME_MODES:
            raise FractalGenError(f"--resume must be one of {', '.join(RESUME_MODES)}, got {self.resume!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise FractalGenError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")


# ------------------------------------------------------------------------------------------------
# Data order and optimisation
# ------------------------------------------------------------------------------------------------

def batch_indices(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of every full global batch of one epoch (order from seed and epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[s: s + batch][rank::world] for s in range(0, n - batch + 1, batch)]


def _loader(dataset: Dataset, batches: list[list[int]], workers: int, seed: int) -> DataLoader:
    """A loader over ``batches`` whose worker seeds come from ``seed``: starting it (at an epoch, or
    mid-epoch when resuming) then draws nothing from the training's random stream."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def _random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2 (in the main process, reproducibly)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); no weight decay on biases and 1-D tensors. The fused kernel where this
    torch has one for the device (one pass over weights, gradients and moments: ~8x faster than the
    multi-tensor kernel on a 2-core CPU: 0.2 s against 1.7 s to update 419M parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state but keep this optimizer's kernel choice (fused or not), so that
    a checkpoint resumes on a device or torch whose kernels differ from the writer's."""
    kernel = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in opt.param_groups]
    groups = [{**saved, **mine} for saved, mine in zip(state["param_groups"], kernel)]
    opt.load_state_dict({**state, "param_groups": groups})


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to min_lr / lr over the remaining steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lr = cfg.base_lr * cfg.batch_size / 256
    floor = cfg.min_lr / lr if lr > 0 else 0.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of the parameters, with a warm-up: update ``k`` decays by
    ``min(decay, (1 + k) / (10 + k))``, so a short run's average is not still holding a share of
    the random initial weights (``0.999 ** 2000`` = 14% of them after 2,000 plain updates)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1 for the first)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def averaged(self, model: FractalGen, device: torch.device) -> FractalGen:
        """A copy of ``model`` (same config and buffers) on ``device`` holding the averaged weights.
        Building it draws nothing from the training's random stream (its initial weights are
        overwritten anyway), so checkpoints and evaluations leave a run's randomness unchanged."""
        with torch.random.fork_rng(devices=[]):
            net = FractalGen(model.config)
        net = net.to(device)
        net.load_state_dict(model.state_dict())
        for p, e in zip(net.parameters(), self.params):
            p.copy_(e)
        return net


def loss_and_grads(model: FractalGen, images: torch.Tensor, labels: torch.Tensor | None, device: torch.device,
                   dtype: str, micro_batches: int = 1, lower_chunks: int = 1, ddp: nn.Module | None = None,
                   world: int = 1) -> torch.Tensor:
    """Loss of one batch with its gradients left in ``.grad`` (averaged over ``world`` processes):
    one backward through ``ddp`` (or the model), or ``FractalGen.forward_backward`` in parts."""
    if micro_batches == lower_chunks == 1:
        with autocast(device, dtype):
            loss = (model if ddp is None else ddp)(images, labels).loss
        loss.backward()
        return loss
    with autocast(device, dtype):
        loss = model.forward_backward(images, labels, micro_batches, lower_chunks)
    if world > 1:  # several backward passes, outside DDP's hooks: average afterwards
        allreduce_grads(model, world)
    return loss


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A training run in progress: what the loop and the checkpoint steps share."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    dtype: str                      # autocast precision actually used
    rank: int
    world: int
    data: Dataset
    test: Dataset | None            # scored by rank 0 at evaluations
    model: FractalGen
    ddp: nn.Module                  # the model wrapped in DistributedDataParallel, or the model itself
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    flip_gen: torch.Generator
    log: MetricsLog | None          # rank 0 only
    step: int = 0


def _start(cfg: TrainConfig, model_cfg: FractalConfig) -> tuple[torch.device, int, int, Path | None]:
    """Device, rank, world size, and the checkpoint to resume from (checked by rank 0, which tells
    the others, so that every process starts or refuses together)."""
    device = device_for_rank(cfg.device)
    rank, world = init_distributed(device)
    if cfg.batch_size % world:
        raise FractalGenError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    resume_from, problem = None, None
    if rank == 0:
        try:
            resume_from = check_out_folder(Path(cfg.out), cfg.resume, model_cfg)
            if cfg.resume == "auto":
                _check_same_run(cfg, resume_from)
        except FractalGenError as e:
            problem = str(e)
    resume_from, problem = from_rank0((resume_from, problem), world)
    if problem is not None:
        raise FractalGenError(problem)
    return device, rank, world, resume_from


def _check_same_run(cfg: TrainConfig, checkpoint: Path | None) -> None:
    """For --resume auto: say whether the run starts or continues, and refuse to continue a run in
    --out that was started with other options (it is another run)."""
    out = Path(cfg.out)
    if checkpoint is None:
        print(f"--resume auto: no checkpoint in {out}, starting a new run", flush=True)
        return
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise FractalGenError(f"{out} holds a checkpoint but no readable train_config.json, so --resume auto cannot "
                              "tell whether it is this run; pass --resume to continue it or choose another --out")
    ours = dataclasses.asdict(cfg)
    differ = [k for k, v in ours.items() if k not in PER_START_OPTIONS and saved.get(k, v) != v]
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {ours[k]})" for k in differ)
        raise FractalGenError(f"{out} holds a run started with other options ({shown}); --resume auto continues only "
                              "the same run: pass --resume to continue it with the new options, or choose another "
                              "--out (nothing was overwritten)")
    print(f"--resume auto: continuing the run in {out}", flush=True)


def _datasets(cfg: TrainConfig, model_cfg: FractalConfig, rank: int) -> tuple[Dataset, Dataset | None]:
    """The training set (checked against the model), and the held-out set rank 0 evaluates on, if
    any: the data's test split or the --val-fraction part, never images it trains on."""
    def build(split: str) -> Dataset:
        return build_dataset(cfg.data, split, model_cfg.image_size, model_cfg.channels,
                             allow_upscale=cfg.allow_upscale, val_fraction=cfg.val_fraction)

    train_split, test_split = training_splits(cfg.data, cfg.val_fraction)
    data = build(train_split)
    if model_cfg.conditional:
        if data.num_classes == 0:
            raise DataError(f"the model is class-conditional ({model_cfg.class_num} classes) but {cfg.data} has no "
                            "labels; use class sub-folders or an unconditional model (class_num=0)")
        check_num_classes(data, model_cfg.class_num)
    if len(data) < cfg.batch_size:
        raise DataError(f"the dataset has {len(data)} images, fewer than one batch of {cfg.batch_size}")
    test = None
    if rank == 0 and cfg.eval_images > 0:
        if test_split is None:
            print(f"no evaluation: {cfg.data} has no test split ({SPLIT_LAYOUTS}); pass --val-fraction F to hold "
                  "out a fraction F of its images", flush=True)
        else:
            test = build(test_split)
    return data, test


def _setup(cfg: TrainConfig) -> Run:
    """Everything the loop needs, resumed from the latest checkpoint with ``--resume``."""
    model_cfg = cfg.model_config()
    device, rank, world, resume_from = _start(cfg, model_cfg)
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype
    data, test = _datasets(cfg, model_cfg, rank)
    torch.manual_seed(cfg.seed + rank)
    model = FractalGen(model_cfg).to(device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    opt = make_optimizer(model, cfg.base_lr * cfg.batch_size / 256, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    out = Path(cfg.out)
    run = Run(cfg, out, device, dtype, rank, world, data, test, model, model, opt, sched, ema,
              flip_gen=torch.Generator().manual_seed(cfg.seed), log=MetricsLog(out) if rank == 0 else None)
    if resume_from is not None:
        _restore(run, resume_from)
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if world > 1:
        run.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


# ------------------------------------------------------------------------------------------------
# Checkpoint steps
# ------------------------------------------------------------------------------------------------

def _save(run: Run) -> None:
    """Checkpoint the run; every process hands rank 0 its random state, rank 0 writes."""
    states = gather(rng_state(run.flip_gen), run.world)
    if run.rank == 0:
        state = {"step": run.step, "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                 "ema": run.ema.params if run.ema is not None else None, "rng": states}
        ema_model = run.ema.averaged(run.model, torch.device("cpu")) if run.ema is not None else None
        save_checkpoint(run.out, run.step, run.model, ema_model, state)


def _restore(run: Run, path: Path) -> None:
    """Continue from checkpoint ``path``: weights, optimizer, schedule, EMA, step and this
    process's own random state."""
    state = load_state(path)
    run.model.load_state_dict(FractalGen.from_pretrained(path).state_dict())
    load_optimizer_state(run.opt, state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.params = [t.to(run.device) for t in state["ema"]]
    run.step = state["step"]
    states = rank_states(state)
    if len(states) == run.world:
        restore_rng(states[run.rank], run.flip_gen)
    elif run.rank == 0:
        print(f"warning: {path} was written by {len(states)} process(es) and is resumed by {run.world}: weights, "
              "optimizer and data order continue, but the random masks, label drops and flips restart from "
              "--seed, so the run will not match an uninterrupted one exactly", flush=True)
    if run.rank == 0:
        print(f"resuming from step {run.step} of {run.cfg.steps} ({path})", flush=True)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def _train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns this process's loss and the gradient norm."""
    cfg = run.cfg
    if cfg.flip:
        images = _random_flip(images, run.flip_gen)
    images = images.to(run.device, non_blocking=True)
    labels = labels.to(run.device) if run.model.config.conditional else None
    run.model.train()
    run.opt.zero_grad(set_to_none=True)  # before the forward: no stale gradients beside the activations
    loss = loss_and_grads(run.model, images, labels, run.device, run.dtype, cfg.micro_batches, cfg.lower_chunks,
                          run.ddp, run.world)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.sched.step()
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.model, run.step)
    return loss, grad_norm


def _loop(run: Run, stop: dict) -> tuple[int, bool]:
    """Train until ``cfg.steps`` or until a process is asked to stop (``stop["now"]``, set by
    SIGTERM). The processes agree after every step, so all of them stop after the same one.
    Returns the step of the last checkpoint and whether the run was stopped early."""
    cfg, rank = run.cfg, run.rank
    steps_per_epoch = len(run.data) // cfg.batch_size
    bar = tqdm(total=cfg.steps, initial=run.step, disable=rank != 0, desc="train", dynamic_ncols=True)
    saved_at, stopping = run.step, False
    try:
        while run.step < cfg.steps and not stopping:
            epoch, offset = divmod(run.step, steps_per_epoch)
            batches = batch_indices(len(run.data), cfg.batch_size, cfg.seed, epoch, rank, run.world)[offset:]
            for images, labels in _loader(run.data, batches, cfg.num_workers, seed=cfg.seed * 100_003 + epoch):
                t0 = time.perf_counter()
                loss, grad_norm = _train_step(run, images, labels)
                loss, stopping = mean_and_any(loss, stop["now"], run.world)  # log the global mean
                if rank == 0:
                    speed = cfg.batch_size / (time.perf_counter() - t0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{speed:.1f}")
                    run.log.write({"step": run.step, "loss": loss.item(), "lr": run.sched.get_last_lr()[0],
                                   "grad_norm": grad_norm.item(), "img_per_s": speed})
                if run.step % cfg.save_every == 0 or run.step == cfg.steps:
                    _save(run)
                    saved_at = run.step
                if rank == 0 and run.test is not None and cfg.eval_every and run.step % cfg.eval_every == 0:
                    _eval_and_log(run)
                if run.step >= cfg.steps or stopping:
                    break
    except KeyboardInterrupt:
        stopping = True
    finally:
        bar.close()
    return saved_at, stopping


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the folder of the final checkpoint."""
    cfg.validate()
    run = _setup(cfg)
    stop = {"now": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        saved_at, stopped = _loop(run, stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if saved_at != run.step:  # interrupted: keep what was done
        _save(run)
    if run.rank == 0 and run.test is not None and run.step >= cfg.steps and not (stopped or stop["now"]):
        _eval_and_log(run)
    if run.log is not None:
        run.log.close()
    if run.world > 1:
        torch.distributed.barrier()
    return latest_checkpoint(run.out)


# ------------------------------------------------------------------------------------------------
# Logging and evaluation
# ------------------------------------------------------------------------------------------------

class MetricsLog:
    """Metrics as JSON lines in ``metrics.jsonl``, and TensorBoard scalars when it is installed."""

    def __init__(self, out: Path):
        self.file = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.board = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _eval_and_log(run: Run) -> None:
    """Held-out bits/dim (val with --val-fraction, else test) of the weights and of their EMA when
    kept, and a PNG grid of samples (of the EMA weights when kept)."""
    from .evaluate import evaluate_nll

    cfg, step = run.cfg, run.step
    split = "val" if cfg.val_fraction else "test"
    nets = {"": run.model}
    if run.ema is not None:
        nets["_ema"] = run.ema.averaged(run.model, run.device)
    record = {"step": step}
    for suffix, net in nets.items():
        result = evaluate_nll(net, run.test, cfg.eval_batch_size, limit=cfg.eval_images, dtype=run.dtype,
                              progress=False)
        record[f"{split}_bpd{suffix}"] = result.bits_per_dim
        tqdm.write(f"step {step}: {split}{' (EMA weights)' if suffix else ''} {result.summary()}")
    run.log.write(record)
    if cfg.sample_every and step % cfg.sample_every == 0 or step == cfg.steps:
        with autocast(run.device, run.dtype):
            images = sample_grid(nets.get("_ema", run.model), per_class=4, seed=step)
        save_image(make_grid(images, nrow=4), run.out / "samples" / f"step_{step:07d}.png", scale=2)


def sample_grid(model: FractalGen, per_class: int, seed: int, **settings) -> torch.Tensor:
    """``per_class`` samples of every class (one row per class), or a square of unconditional ones."""
    from .sampling import SamplingConfig

    if model.config.conditional:
        labels = torch.arange(model.config.class_num).repeat_interleave(per_class)
        return model.sample(labels=labels, settings=SamplingConfig(**settings), seed=seed)
    return model.sample(num_images=per_class * per_class, settings=SamplingConfig(**settings), seed=seed)
