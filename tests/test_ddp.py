"""Data parallelism with real processes: 2 CPU ranks (gloo) train what 1 process trains.

Lightning's ``ddp`` launcher re-executes ``sys.argv``, so each DDP run is a dedicated script in
``tests/ddp_scripts`` started as a subprocess with a timeout; the one-process reference runs
here from the same code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "ddp_scripts"
TOLERANCE = 1e-5  # max abs weight difference, fp32


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"ddp_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


equivalence = load_script("equivalence")


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT)
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Every case trained once with 2 DDP ranks; ``<case>.rank<r>.pt`` per rank."""
    out = tmp_path_factory.mktemp("ddp")
    proc = run([sys.executable, str(SCRIPTS / "equivalence.py"), str(out), "2"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def compare(two_ranks: Path, case: str) -> tuple[float, dict, dict, dict]:
    module, resampler, _ = equivalence.train(case, 1)
    one = equivalence.summary(module, resampler)
    rank0, rank1 = (torch.load(two_ranks / f"{case}.rank{r}.pt") for r in (0, 1))
    return max_diff(one["state"], rank0["state"]), one, rank0, rank1


@pytest.mark.parametrize("case", list(equivalence.CASES))
def test_two_ranks_of_half_batch_equal_one_process(two_ranks: Path, case: str) -> None:
    diff, one, rank0, rank1 = compare(two_ranks, case)
    assert diff <= TOLERANCE, f"{case}: max |w_1proc - w_ddp| = {diff:.3g}"
    # Every rank holds bit-identical weights and buffers (counters, BatchTopK threshold),
    # including right after resampling, which rank 0 decides and broadcasts.
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    assert one["resampled"] == rank0["resampled"] == rank1["resampled"]
    if equivalence.CASES[case].resample:
        assert one["resampled"] >= equivalence.N_KILLED  # the killed latents, at least
    # The dead-latent counters saw the global batch on every rank.
    for key in one["state"]:
        if key.endswith("tokens_seen"):
            assert int(rank0["state"][key]) == equivalence.STEPS * equivalence.BATCH
    # ... and the host bounds how many can be dead as one process does (the global token
    # count of a step is the rank's own times the ranks), so AuxK selects as few latents.
    assert rank0["aux_widths"] == rank1["aux_widths"] == one["aux_widths"]
    if any(w > 0 for w in one["aux_widths"]):  # AuxK ran: first unneeded, then needed
        assert one["aux_widths"][0] == 0


@pytest.mark.parametrize("rank", [0, 1])
def test_a_failing_rank_stops_the_job_with_one_error(rank: int) -> None:
    start = time.monotonic()
    proc = run([sys.executable, str(SCRIPTS / "fail_on_rank.py"), str(rank)], timeout=90)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(f"RuntimeError: deliberate failure on rank {rank}") == 1, output[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_nan_weight_on_one_rank_is_reported_once_naming_the_rank(rank: int) -> None:
    proc = run([sys.executable, str(SCRIPTS / "fail_on_rank.py"), str(rank), "nan"], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("error: non-finite") == 1, output[-3000:]
    assert f"on rank(s) {rank}" in output, output[-3000:]


def test_cli_fit_on_two_cpu_processes(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    cli = [
        sys.executable,
        "-m",
        "sae_lightning.cli",
        "fit",
        "--config",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "20",
        "--trainer.val_check_interval",
        "10",
        "--trainer.enable_progress_bar",
        "false",
        "--data.val_samples",
        "1024",
        "--checkpoint.every_n_steps",
        "10",
        "--output_dir",
        str(out),
    ]
    proc = run(cli, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = out / "quickstart" / "version_0"
    assert not (out / "quickstart" / "version_1").exists()  # one run folder, written by rank 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainer/global_step"] == 20
    assert metrics["val/l0"] == pytest.approx(4.0)
    assert 0 < metrics["val/fvu"] < 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "sae.safetensors").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 20 steps of the global batch of 1024, split 512 + 512 over the two ranks.
    assert int(ckpt["state_dict"]["tokens_seen"]) == 20 * 1024


def test_e2e_logged_fvu_with_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """e2e mode logs the global FVU (pooled sums), not a mean of per-rank FVUs."""
    import socket

    e2e_fvu = load_script("e2e_fvu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = str(SCRIPTS / "e2e_fvu.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path), str(r), "2", port],
            cwd=str(ROOT),
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-4000:]
    one = e2e_fvu.step_metrics(0, 1)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["kept_rows"] != ranks[1]["kept_rows"]  # so a mean of rank FVUs would differ
    for got in ranks:
        assert abs(got["train/fvu"] - one["train/fvu"]) <= 1e-6
        assert got["tokens_seen"] == one["tokens_seen"] == one["kept_rows"]
    # The old rule, a mean of per-rank FVUs (each rank's share alone), is measurably different.
    local = [e2e_fvu.step_metrics(r, 2)["train/fvu"] for r in (0, 1)]
    assert abs(sum(local) / 2 - one["train/fvu"]) > 1e-4
