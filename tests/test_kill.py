"""SIGKILL at a random moment: files stay whole, and a resumed run equals an unbroken one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lightning.checkpoint_io import AtomicCheckpointIO
from sae_lightning.io import load_sae

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
WRITER = Path(__file__).parent / "kill_scripts" / "writer.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kill_after_writes(cmd: list[str], min_writes: int, rng: random.Random) -> int:
    """Start ``cmd``, wait for ``min_writes`` 'wrote' lines, SIGKILL at a random moment after."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        if line.startswith("wrote"):
            seen = int(line.split()[1])
            if seen >= min_writes:
                break
    time.sleep(rng.uniform(0.0, 0.08))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return seen


@pytest.mark.parametrize("kind", ["checkpoint", "export", "shard"])
def test_kill_mid_write_leaves_a_whole_previous_file(tmp_path, kind):
    rng = random.Random()
    for attempt in range(3):
        out = tmp_path / f"{kind}{attempt}"
        out.mkdir()
        seen = kill_after_writes(
            [sys.executable, str(WRITER), kind, str(out)], rng.randint(1, 3), rng
        )
        if kind == "checkpoint":
            ckpt = AtomicCheckpointIO().load_checkpoint(out / "last.ckpt")
            assert ckpt["i"] >= seen
            assert torch.equal(ckpt["t"], torch.full_like(ckpt["t"], ckpt["i"]))
        elif kind == "export":
            sae = load_sae(out)
            i = json.loads((out / "sae_config.json").read_text())["iteration"]
            weights = {k: v for k, v in sae.state_dict().items() if v.is_floating_point()}
            values = {float(v.flatten()[0]) for v in weights.values()}
            assert len(values) == 1, "weights from two different writes were mixed"
            assert values.pop() >= seen and i >= seen
            assert all(torch.all(v == v.flatten()[0]) for v in weights.values())
        else:
            data = (out / "shard.bin").read_bytes()
            assert len(data) == 8_000_000 and len(set(data)) == 1


def fit_cmd(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sae_lightning.cli",
        "fit",
        "--config",
        str(RECIPE),
        f"--name={name}",
        f"--output_dir={tmp_path}",
        "--data.d=16",
        "--data.n_atoms=64",
        "--data.batch_size=256",
        "--data.val_samples=512",
        "--model.d_sae=128",
        "--trainer.max_steps=300",
        "--trainer.val_check_interval=100",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.every_n_steps=7",
        *extra,
    ]


RESAMPLER = [
    "--callbacks=[{name: resampler, every_n_steps: 40, n_candidates: 1024}]",
    "--model.loss.dead_window_tokens=1024",
    "--model.d_sae=512",  # far more latents than atoms: many die, so resampling has work
]


@pytest.mark.parametrize("extra", [[], RESAMPLER], ids=["plain", "resampler"])
def test_sigkill_at_a_random_step_then_resume_matches_unbroken_run(tmp_path, extra):
    rng = random.Random()
    subprocess.run(fit_cmd(tmp_path, "unbroken", *extra), check=True, env=ENV, cwd=ROOT)

    proc = subprocess.Popen(fit_cmd(tmp_path, "killed", *extra), env=ENV, cwd=ROOT)
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_dir = tmp_path / "killed" / "version_0"
    assert not (killed_dir / "sae.safetensors").exists()
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 300

    subprocess.run(
        [*fit_cmd(tmp_path, "killed", *extra), "--ckpt_path", "last"], check=True, env=ENV, cwd=ROOT
    )
    a = load_file(str(tmp_path / "unbroken" / "version_0" / "sae.safetensors"))
    b = load_file(str(killed_dir / "sae.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming from step {step}"
    if extra:  # the resampler really acted before and after the kill
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(killed_dir)).Reload()
        resampled = [e.value for e in events.Scalars("train/resampled")]
        assert max(resampled) > 0, resampled
    ma = json.loads((tmp_path / "unbroken" / "version_0" / "metrics.json").read_text())
    mb = json.loads((killed_dir / "metrics.json").read_text())
    assert ma["val/fvu"] == mb["val/fvu"]


def test_sigkill_under_two_process_ddp_then_resume_matches_unbroken_run(tmp_path):
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    extra = ["--trainer.max_steps=120", "--trainer.val_check_interval=60", *ddp]
    subprocess.run(fit_cmd(tmp_path, "unbroken", *extra), check=True, env=ENV, cwd=ROOT)

    # A new session, so the SIGKILL reaches both ranks (Lightning's launcher forks rank 1).
    proc = subprocess.Popen(
        fit_cmd(tmp_path, "killed", *extra), env=ENV, cwd=ROOT, start_new_session=True
    )
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_dir = tmp_path / "killed" / "version_0"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 120

    subprocess.run(
        [*fit_cmd(tmp_path, "killed", *extra), "--ckpt_path", "last"],
        check=True,
        env=ENV,
        cwd=ROOT,
    )
    a = load_file(str(tmp_path / "unbroken" / "version_0" / "sae.safetensors"))
    b = load_file(str(killed_dir / "sae.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming from step {step}"
