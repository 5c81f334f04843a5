"""Training: one loop for one CPU or many GPUs (``torchrun ... -m fractalgen train``).

The recipe follows the official one (SPEC §10): AdamW (0.9, 0.95), weight decay 0.05 except on
biases and 1-D tensors, lr = base_lr * global_batch / 256, linear warm-up then cosine decay,
gradient clipping at 3.0, label drop, red-channel weight; bf16 autocast on CUDA, float32 on CPU;
optional gradient checkpointing and EMA weights. ``micro_batches`` / ``lower_chunks`` > 1
back-propagate the batch, and the patches below level 0, in parts (``FractalGen.forward_backward``):
the same gradients with a fraction of the activations in memory and no recomputation.

Runs are exactly resumable: a checkpoint holds the weights (``config.json`` +
``model.safetensors``, loadable by ``FractalGen.from_pretrained``), EMA weights, optimizer,
scheduler, step and RNG state; the data order is a pure function of (seed, epoch), so the
position in it is derived from the step. Checkpoints are written to a temporary folder and
renamed into place, and ``latest`` is replaced atomically, so a killed run loses nothing saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import PRESETS, FractalConfig, get_preset
from .data import build_dataset, check_num_classes, collate
from .errors import CheckpointError, DataError, FractalGenError
from .model import FractalGen, _atomic_write
from .runtime import autocast, make_grid, resolve_device, save_image


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``train_config.json`` in the output folder."""

    model: str = "fractalmar_fmnist28"      # preset name or path to a config.json
    data: str = "fashion-mnist"             # built-in name, image folder, or .npz/.npy
    out: str = "runs/fractalgen"
    batch_size: int = 64                    # global batch (split across processes)
    steps: int = 1000                       # total optimizer steps
    base_lr: float = 5e-5                   # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 3.0
    ema_decay: float = 0.0                  # 0 disables EMA
    grad_checkpointing: bool = False
    micro_batches: int = 1                  # batch back-propagated in this many parts (less memory)
    lower_chunks: int = 1                   # patches below level 0 back-propagated in this many parts
    flip: bool = False
    seed: int = 0
    num_workers: int = 0
    save_every: int = 500
    eval_every: int = 0                     # 0: only at the end
    eval_images: int = 1000
    eval_batch_size: int = 100
    sample_every: int = 0
    device: str = "auto"
    dtype: str = "auto"                     # auto: bfloat16 autocast on CUDA, float32 elsewhere
    resume: bool = False
    allow_upscale: bool = False

    def model_config(self) -> FractalConfig:
        if self.model in PRESETS:
            return get_preset(self.model)
        if Path(self.model).is_file():
            return FractalConfig.load(self.model)
        raise FractalGenError(f"--model {self.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")


# ------------------------------------------------------------------------------------------------
# Distributed helpers
# ------------------------------------------------------------------------------------------------

def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def allreduce_grads(model: nn.Module, world: int, bucket_elems: int = 1 << 24) -> None:
    """Average every parameter's gradient over the processes, in flat buckets (what DDP does
    during backward; used when gradients come from several backward passes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # every process must send the same buckets
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    start = 0
    while start < len(grads):
        end, size = start, 0
        while end < len(grads) and (end == start or size + grads[end].numel() <= bucket_elems):
            size += grads[end].numel()
            end += 1
        bucket = grads[start:end]
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        for g, v in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(v.view_as(g))
        start = end


def device_for_rank(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------------------------------------
# Data order
# ------------------------------------------------------------------------------------------------

def batch_indices(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of every full global batch of one epoch (order from seed and epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[s: s + batch][rank::world] for s in range(0, n - batch + 1, batch)]


def _loader(dataset: Dataset, indices: list[list[int]], workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=indices, num_workers=workers, collate_fn=collate)


def _random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2 (in the main process, reproducibly)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


# ------------------------------------------------------------------------------------------------
# Optimisation
# ------------------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); no weight decay on biases and 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to min_lr / lr over the remaining steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lr = cfg.base_lr * cfg.batch_size / 256
    floor = cfg.min_lr / lr if lr > 0 else 0.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of the parameters."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - self.decay)

    def copy_to(self, model: nn.Module) -> None:
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.params):
                p.copy_(e)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def save_checkpoint(out: Path, step: int, model: FractalGen, ema: EMA | None, opt, sched, flip_gen,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step_XXXXXXX`` atomically and point ``latest`` at it."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if ema is not None:
        ema_model = FractalGen(model.config)
        ema_model.load_state_dict(model.state_dict())
        ema.copy_to(ema_model)
        ema_model.save_pretrained(tmp / "ema")
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng_cpu": torch.get_rng_state(), "rng_flip": flip_gen.get_state(),
             "ema": ema.params if ema is not None else None}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write(out / "latest", lambda p: p.write_text(final.name + "\n"))
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {path / 'state.pt'}: {e}") from None


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def _prepare_out(cfg: TrainConfig, model_cfg: FractalConfig) -> Path | None:
    """Check the output folder; return the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FractalGenError(f"output folder {out} is not writable ({e.strerror}); choose another --out") from None
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        if cfg.resume:
            raise CheckpointError(f"--resume given but {out} has no checkpoint to resume from")
        return None
    if not cfg.resume:
        raise FractalGenError(f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue it "
                              "or choose another --out (nothing was overwritten)")
    saved = FractalConfig.load(ckpt / "config.json")
    if saved != model_cfg:
        diff = [f.name for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(model_cfg, f.name)]
        raise CheckpointError(f"checkpoint {ckpt} was trained with a different model config (differs in {diff}); "
                              f"resume with the same --model or choose another --out")
    return ckpt


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


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the folder of the final checkpoint."""
    model_cfg = cfg.model_config()
    device = device_for_rank(cfg.device)
    rank, world = init_distributed(device)
    if cfg.micro_batches < 1 or cfg.lower_chunks < 1:
        raise FractalGenError(f"--micro-batches and --lower-chunks must be >= 1, got {cfg.micro_batches} and "
                              f"{cfg.lower_chunks}")
    if cfg.batch_size % world:
        raise FractalGenError(f"batch size {cfg.batch_size} is not divisible by {world} processes")
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype
    out = Path(cfg.out)
    resume_from, problem = None, None
    if rank == 0:
        try:
            resume_from = _prepare_out(cfg, model_cfg)
        except FractalGenError as e:
            problem = e
    if world > 1:  # every rank learns where rank 0 resumes from, or that it refused to start
        box = [str(resume_from or ""), str(problem) if problem else None]
        dist.broadcast_object_list(box, src=0)
        resume_from = Path(box[0]) if box[0] else None
        if box[1] is not None and problem is None:
            problem = FractalGenError(box[1])
    if problem is not None:
        raise problem

    data = build_dataset(cfg.data, "train", model_cfg.image_size, model_cfg.channels, allow_upscale=cfg.allow_upscale)
    if model_cfg.conditional:
        if data.num_classes == 0:
            raise DataError(f"the model is class-conditional ({model_cfg.class_num} classes) but {cfg.data} has no "
                            "labels; use class sub-folders or an unconditional model (class_num=0)")
        check_num_classes(data, model_cfg.class_num)
    if len(data) < cfg.batch_size:
        raise DataError(f"the dataset has {len(data)} images, fewer than one batch of {cfg.batch_size}")
    test = None
    if rank == 0 and cfg.eval_images > 0:
        try:
            test = build_dataset(cfg.data, "test", model_cfg.image_size, model_cfg.channels, allow_upscale=cfg.allow_upscale)
        except DataError:
            test = None

    torch.manual_seed(cfg.seed + rank)
    model = FractalGen(model_cfg).to(device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    lr = cfg.base_lr * cfg.batch_size / 256
    opt = make_optimizer(model, lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    flip_gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume_from is not None:
        state = _load_state(resume_from)
        model.load_state_dict(FractalGen.from_pretrained(resume_from).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state["ema"] is not None:
            ema.params = [t.to(device) for t in state["ema"]]
        flip_gen.set_state(state["rng_flip"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        step = state["step"]
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    steps_per_epoch = len(data) // cfg.batch_size
    log = MetricsLog(out) if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    stop = {"now": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    saved_at = step
    try:
        while step < cfg.steps and not stop["now"]:
            epoch, offset = divmod(step, steps_per_epoch)
            batches = batch_indices(len(data), cfg.batch_size, cfg.seed, epoch, rank, world)[offset:]
            for images, labels in _loader(data, batches, cfg.num_workers):
                t0 = time.perf_counter()
                if cfg.flip:
                    images = _random_flip(images, flip_gen)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device) if model_cfg.conditional else None
                model.train()
                opt.zero_grad(set_to_none=True)  # before the forward: no stale gradients beside the activations
                loss = loss_and_grads(model, images, labels, device, dtype, cfg.micro_batches, cfg.lower_chunks,
                                      ddp, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                if world > 1:  # log the global mean, not this rank's share
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)
                    loss /= world
                if rank == 0:
                    speed = cfg.batch_size / (time.perf_counter() - t0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{speed:.1f}")
                    log.write({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                               "grad_norm": grad_norm.item(), "img_per_s": speed})
                if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
                    save_checkpoint(out, step, model, ema, opt, sched, flip_gen)
                    saved_at = step
                if rank == 0 and test is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    _eval_and_log(model, ema, test, cfg, device, dtype, step, log, out)
                if step >= cfg.steps or stop["now"]:
                    break
    except KeyboardInterrupt:
        stop["now"] = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    if rank == 0 and saved_at != step:  # interrupted: keep what was done
        save_checkpoint(out, step, model, ema, opt, sched, flip_gen)
    if rank == 0 and test is not None and step >= cfg.steps and not stop["now"]:
        _eval_and_log(model, ema, test, cfg, device, dtype, step, log, out)
    if log is not None:
        log.close()
    if world > 1:
        dist.barrier()
    return latest_checkpoint(out)


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


def _eval_and_log(model, ema, test, cfg, device, dtype, step, log: MetricsLog, out) -> None:
    """Test-set bits/dim (of the EMA weights when kept) and a PNG grid of samples."""
    net = model
    if ema is not None:
        net = FractalGen(model.config).to(device)
        net.load_state_dict(model.state_dict())
        ema.copy_to(net)
    from .evaluate import evaluate_nll

    bpd = evaluate_nll(net, test, cfg.eval_batch_size, limit=cfg.eval_images, dtype=dtype, progress=False).bits_per_dim
    log.write({"step": step, "test_bpd": bpd})
    tqdm.write(f"step {step}: test bits/dim {bpd:.4f}")
    if cfg.sample_every and step % cfg.sample_every == 0 or step == cfg.steps:
        with autocast(device, dtype):
            images = sample_grid(net, per_class=4, seed=step)
        save_image(make_grid(images, nrow=4), out / "samples" / f"step_{step:07d}.png", scale=2)


def sample_grid(model: FractalGen, per_class: int, seed: int, **settings) -> torch.Tensor:
    """``per_class`` samples of every class (one row per class), or a square of unconditional ones."""
    from .sampling import SamplingConfig

    if model.config.conditional:
        labels = torch.arange(model.config.class_num).repeat_interleave(per_class)
        return model.sample(labels=labels, settings=SamplingConfig(**settings), seed=seed)
    return model.sample(num_images=per_class * per_class, settings=SamplingConfig(**settings), seed=seed)
