"""Training: CLI on real files, exact resume after SIGKILL, DDP equals one process, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fractalgen import FractalConfig, FractalGen
from fractalgen.cli import main
from fractalgen.data import build_dataset
from fractalgen.evaluate import evaluate_nll
from fractalgen.train import EMA

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture()
def tiny_config(tmp_path) -> Path:
    """A deterministic (no dropout, no label drop) tiny AR model for 8x8 grey images, 2 classes."""
    cfg = FractalConfig((8, 2, 1), (16, 16, 16), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), channels=1,
                        class_num=2, num_conds=1, attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0)
    path = tmp_path / "tiny.json"
    cfg.save(path)
    return path


@pytest.fixture()
def tiny_npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    images = (rng.integers(0, 4, (64, 8, 8)) * 60).astype(np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=rng.integers(0, 2, 64))
    return path


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fractalgen", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def train_args(config: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--model", str(config), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--batch-size", "8", "--base-lr", "0.05", "--warmup-steps", "2", "--eval-images", "0", *extra]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "model.safetensors"))


def test_sigkill_and_resume_equals_uninterrupted_run(tiny_config, tiny_npz, tmp_path):
    steps = 40
    run_cli(*train_args(tiny_config, tiny_npz, tmp_path / "full", steps, "--save-every", "2"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fractalgen",
                             *train_args(tiny_config, tiny_npz, killed, steps, "--save-every", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    def saved_step() -> int:  # ``latest`` is written after the checkpoint folder is renamed into place
        latest = killed / "latest"
        return int(latest.read_text().strip().split("_")[1]) if latest.exists() else 0

    deadline = time.time() + 120
    while time.time() < deadline and saved_step() < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = saved_step()
    assert 4 <= stopped_at < steps, "the run must be killed mid-way"
    run_cli(*train_args(tiny_config, tiny_npz, killed, steps, "--save-every", "2", "--resume"))
    full, resumed = final_weights(tmp_path / "full"), final_weights(killed)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


@pytest.mark.parametrize("parts", [(), ("--micro-batches", "2", "--lower-chunks", "3")], ids=["ddp", "ddp-in-parts"])
def test_ddp_two_processes_equal_one_process(tiny_config, tiny_npz, tmp_path, parts):
    """Also with the batch back-propagated in parts, where gradients are averaged outside DDP."""
    args = train_args(tiny_config, tiny_npz, tmp_path / "single", 6)
    run_cli(*args)
    ddp_args = train_args(tiny_config, tiny_npz, tmp_path / "ddp", 6, *parts)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fractalgen", *ddp_args], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-4, rtol=1e-3)  # Adam amplifies rounding


def test_ddp_stop_and_resume_equals_uninterrupted_run(tmp_path):
    """Two processes, stopped by SIGTERM mid-run (as a scheduler preempts a job) and resumed: the
    same weights as an uninterrupted run. Label drop and flips draw random numbers on every
    process, so this holds only if each process gets its own random state back, and only if
    checkpoints and evaluations (with EMA weights, after every step) draw none."""
    config = FractalConfig((8, 2, 1), (16, 16, 16), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"), channels=1,
                           class_num=2, num_conds=1, attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.5)
    config.save(tmp_path / "drop.json")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=(rng.integers(0, 4, (64, 8, 8)) * 60).astype(np.uint8),
             labels=rng.integers(0, 2, 64))
    steps = 60
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fractalgen"]

    def args(out: str, *extra: str) -> list[str]:
        return train_args(tmp_path / "drop.json", tmp_path / "data.npz", tmp_path / out, steps, "--save-every", "2",
                          "--flip", "--ema-decay", "0.9", "--eval-every", "1", "--eval-images", "8",
                          "--eval-batch-size", "8", *extra)

    full = subprocess.run([*torchrun, *args("full")], capture_output=True, text=True, env=ENV, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([*torchrun, *args("stopped")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, start_new_session=True)
    latest = stopped / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_0000004"):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole job, as a scheduler does
    proc.wait(timeout=120)
    stopped_at = int(latest.read_text().strip().split("_")[1])
    assert 4 <= stopped_at < steps, "the run must be stopped mid-way"
    state = torch.load(stopped / "checkpoints" / latest.read_text().strip() / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    resumed = subprocess.run([*torchrun, *args("stopped", "--resume")], capture_output=True, text=True, env=ENV,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {stopped_at} of {steps}" in resumed.stdout
    want, got = final_weights(tmp_path / "full"), final_weights(stopped)
    for key in want:
        assert torch.equal(want[key], got[key]), key


def _worker_pid(agent: int, rank: int, timeout: float = 30) -> int:
    """The pid of the worker of ``rank`` that torchrun's agent (process ``agent``) started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                environ = (stat.parent / "environ").read_bytes().split(b"\0") if parent == agent else []
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
            if f"RANK={rank}".encode() in environ:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"torchrun started no worker of rank {rank} within {timeout} s")


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds torchrun's workers in /proc (Linux)")
def test_torchrun_restarts_a_killed_worker_and_the_run_completes(tiny_config, tiny_npz, tmp_path):
    """One command for every start (--resume auto) under torchrun --max-restarts=1: a worker killed
    with SIGKILL after a checkpoint is restarted with the others, which form their group again and
    continue from that checkpoint; the job ends by itself with an uninterrupted run's weights.
    Bounded: each torchrun job gets 60 s (about 8 s and 20 s on an idle 2-core machine)."""
    steps = 60
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=1", "-m", "fractalgen"]

    def command(out: str) -> list[str]:
        return [*torchrun, *train_args(tiny_config, tiny_npz, tmp_path / out, steps, "--save-every", "2",
                                       "--resume", "auto")]

    full = subprocess.run(command("full"), capture_output=True, text=True, env=ENV, timeout=60)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "--resume auto: no checkpoint" in full.stdout and "resuming" not in full.stdout
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command("killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        victim = _worker_pid(proc.pid, rank=1)
        latest = killed / "latest"
        deadline = time.time() + 30
        while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_0000006"):
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        killed_at = int(latest.read_text().strip().split("_")[1])
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert 6 <= killed_at < steps, "the worker must be killed mid-run"
    assert proc.returncode == 0, stderr[-3000:]
    resumed_at = int(stdout.split("resuming from step ")[1].split()[0])  # printed by the restarted rank 0
    assert killed_at <= resumed_at < steps
    want, got = final_weights(tmp_path / "full"), final_weights(killed)
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_each_torchrun_attempt_meets_under_keys_of_its_own(monkeypatch):
    """torchrun's agent keeps its store across restarts: what the processes of attempt 0 wrote there
    (their addresses) must be invisible to attempt 1, and nothing changes without an agent store."""
    import torch.distributed as dist

    from fractalgen.distributed import attempt_store

    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert attempt_store() is None  # init_process_group makes its own store
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    attempt_store().set("rank_1", "address of a process that was killed")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = attempt_store()
    assert not restarted.check(["rank_1"])
    restarted.set("rank_1", "new address")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert attempt_store().get("rank_1") == b"address of a process that was killed"


def test_resume_auto_starts_continues_and_never_takes_another_run(tiny_config, tiny_npz, tmp_path, capsys):
    """--resume auto starts a run where there is none and continues the one there (saying which),
    as exactly as --resume does; a run started with other options is refused and left untouched."""
    out = tmp_path / "run"
    base = ["--model", str(tiny_config), "--data", str(tiny_npz), "--out", str(out), "--steps", "4",
            "--batch-size", "8", "--base-lr", "0.05", "--warmup-steps", "2", "--eval-images", "0"]
    assert main(["train", *base, "--steps", "2", "--resume", "auto"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert main(["train", *base, "--steps", "2", "--resume", "auto", "--save-every", "7"]) == 0  # per-start option
    assert "continuing the run" in capsys.readouterr().out
    assert main(["train", *base, "--resume", "auto"]) == 2
    assert "--steps 2 (now 4)" in capsys.readouterr().err
    assert (out / "latest").read_text().strip() == "step_0000002"
    assert main(["train", *base, "--resume"]) == 0  # explicit --resume continues with the new options
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    assert main(["train", *base, "--seed", "1", "--resume", "auto"]) == 2
    assert "--seed 0 (now 1)" in capsys.readouterr().err
    assert main(["train", *base, "--out", str(tmp_path / "straight")]) == 0  # steps 0, 1 warm up under either --steps
    for key, value in final_weights(tmp_path / "straight").items():
        assert torch.equal(final_weights(out)[key], value), key


def test_random_state_round_trip_and_checkpoints_without_per_process_states(tmp_path):
    """Every stream comes back through a weights-only torch.load; checkpoints written before the
    states were kept per process hold rank 0's torch and flip states, resumed as one process."""
    import random

    from fractalgen.resume import rank_states, restore_rng, rng_state

    flips = torch.Generator().manual_seed(5)
    torch.save({"rng": [rng_state(flips)]}, tmp_path / "state.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=flips))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    restore_rng(rank_states(state)[0], flips)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=flips))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
    legacy = {"rng_cpu": torch.get_rng_state(), "rng_flip": flips.get_state()}
    [only] = rank_states(legacy)
    assert only.keys() == {"torch", "flip"} and torch.equal(only["torch"], legacy["rng_cpu"])


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(1)
    for cls, mode in (("cats", "RGB"), ("dogs", "L")):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate([(13, 17), (30, 9), (8, 8), (21, 40), (11, 11), (9, 25)]):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
            image.save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG this is not an image")


def test_train_on_a_folder_with_a_corrupt_file_then_resume(tiny_config, tmp_path):
    data = tmp_path / "folder"
    _image_folder(data)
    out = tmp_path / "run"
    first = run_cli(*train_args(tiny_config, data, out, 2, "--batch-size", "4", "--flip", "--allow-upscale"))
    assert "broken.png" in first.stderr
    assert (out / "checkpoints" / "step_0000002" / "model.safetensors").is_file()
    run_cli(*train_args(tiny_config, data, out, 4, "--batch-size", "4", "--flip", "--allow-upscale", "--resume"))
    assert (out / "latest").read_text().strip() == "step_0000004"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if '"loss"' in l]) == 4


def test_bad_training_input_gives_one_line_errors(tiny_config, tiny_npz, tmp_path, capsys):
    def error_of(*args: str) -> str:
        assert main(list(args)) == 2
        return capsys.readouterr().err.strip()

    base = ["--eval-images", "0", "--steps", "1", "--batch-size", "8"]
    assert "does not exist" in error_of("train", "--model", str(tiny_config), "--data", str(tmp_path / "none"),
                                        "--out", str(tmp_path / "o1"), *base)
    (tmp_path / "empty").mkdir()
    assert "no image files" in error_of("train", "--model", str(tiny_config), "--data", str(tmp_path / "empty"),
                                   "--out", str(tmp_path / "o2"), *base).lower()
    many = tmp_path / "many.npz"
    np.savez(many, images=np.zeros((16, 8, 8), np.uint8), labels=np.arange(16) % 5)
    assert "5 classes but the model only 2" in error_of("train", "--model", str(tiny_config), "--data", str(many),
                                                      "--out", str(tmp_path / "o3"), *base)
    assert "--lower-chunks must be >= 1, got 0" in error_of("train", "--model", str(tiny_config), "--data", str(tiny_npz),
                                                    "--out", str(tmp_path / "o4"), "--lower-chunks", "0", *base)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "not writable" in error_of("train", "--model", str(tiny_config), "--data", str(tiny_npz),
                                      "--out", str(blocker / "sub"), *base)
    # a finished run is never overwritten; a resume with another architecture is refused
    out = tmp_path / "done"
    assert main(["train", "--model", str(tiny_config), "--data", str(tiny_npz), "--out", str(out), *base]) == 0
    before = (out / "checkpoints" / "step_0000001" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert "pass --resume" in error_of("train", "--model", str(tiny_config), "--data", str(tiny_npz),
                                       "--out", str(out), *base)
    other = FractalConfig.load(tiny_config)
    other.embed_dim_list = (32, 16, 16)
    other.save(tmp_path / "other.json")
    assert "different model config" in error_of("train", "--model", str(tmp_path / "other.json"), "--data",
                                                str(tiny_npz), "--out", str(out), "--resume", *base)
    assert (out / "checkpoints" / "step_0000001" / "model.safetensors").read_bytes() == before


def test_data_without_splits_never_evaluates_on_training_images(tiny_config, tiny_npz, tmp_path, capsys):
    """A .npz without splits trains in full without evaluation (and says so), or with --val-fraction
    evaluates on the held-out part only, the part `eval nll --val-fraction` scores."""
    common = ["--model", str(tiny_config), "--data", str(tiny_npz), "--steps", "2", "--batch-size", "8",
              "--eval-images", "100"]
    assert main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    assert "no evaluation: " in capsys.readouterr().out
    assert "_bpd" not in (tmp_path / "full" / "metrics.jsonl").read_text()
    assert main(["train", *common, "--out", str(tmp_path / "held"), "--val-fraction", "0.25", "--ema-decay",
                 "0.5"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "held" / "metrics.jsonl").read_text().splitlines()]
    assert not any("test_bpd" in r for r in logged)
    held_out = build_dataset(str(tiny_npz), "val", 8, 1, val_fraction=0.25)
    assert len(held_out) == 16
    for key, folder in [("val_bpd", "step_0000002"), ("val_bpd_ema", "step_0000002/ema")]:
        model = FractalGen.from_pretrained(tmp_path / "held" / "checkpoints" / folder)
        logged_bpd = [r[key] for r in logged if key in r]
        assert logged_bpd == [pytest.approx(evaluate_nll(model, held_out, progress=False).bits_per_dim)], key


def test_ema_warm_up_leaves_little_of_the_initial_weights():
    """Update k folds in the new weights with weight 1 - min(decay, (1 + k) / (10 + k)): 9/11 at the
    first update, then the plain decay once the warm-up has caught up with it."""
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.999)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    torch.testing.assert_close(ema.params[0], start + 9 / 11)
    ema.update(model, step=10**6)  # the plain decay: 0.1% of the way to the (unchanged) weights
    torch.testing.assert_close(ema.params[0], start + 9 / 11 + (1 - 9 / 11) * 0.001)


def _adamw_pair(kernel: dict) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    """A small seeded model and AdamW over make_optimizer's groups with an explicit kernel."""
    from fractalgen.train import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")}
              for g in make_optimizer(model, 1e-2, 0.05).param_groups]
    return model, torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), **kernel)


def _adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    """One update on a batch that depends on k."""
    opt.zero_grad()
    x = torch.linspace(-1, 1, 24).view(3, 8) * (k + 1)
    model(x).square().sum().backward()
    opt.step()


@pytest.mark.skipif(torch.__version__ < "2.4", reason="fused AdamW on CPU needs torch 2.4")
def test_optimizer_is_fused_and_resumes_across_kernels():
    """make_optimizer takes the fused AdamW kernel on CPU and updates as the multi-tensor one does;
    a state saved by either resumes in the other with the same later updates, keeping the loader's
    kernel (a checkpoint moves between devices and torch versions)."""
    import copy

    from fractalgen.train import load_optimizer_state, make_optimizer

    model, opt = _adamw_pair({"foreach": True})
    assert make_optimizer(model, 1e-2, 0.05).param_groups[0]["fused"] is True
    fused_model, fused = _adamw_pair({"fused": True})
    for k in range(3):
        _adamw_step(model, opt, k), _adamw_step(fused_model, fused, k)
    for a, b in zip(model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for source, (target_model, target) in ((opt, _adamw_pair({"fused": True})), (fused, _adamw_pair({"foreach": True}))):
        target_model.load_state_dict(model.state_dict())
        load_optimizer_state(target, copy.deepcopy(source.state_dict()))
        assert bool(target.param_groups[0]["fused"]) == (source is opt)  # the loader's kernel, not the writer's
        reference, reference_opt = copy.deepcopy((model, opt))  # one deepcopy: the copy steps the copied model
        for k in range(3, 6):
            _adamw_step(target_model, target, k), _adamw_step(reference, reference_opt, k)
        for a, b in zip(reference.parameters(), target_model.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
