"""Latent sharding with real processes: a T = 2 mesh of CPU ranks (gloo) trains what 1 process
trains, with about half the parameter and optimizer bytes per rank.

Lightning's launcher re-executes ``sys.argv``, so the sharded runs are a dedicated script in
``tests/mp_scripts`` started as a subprocess; the one-process reference runs here from the
same code. The multi-node test starts two ``torchrun`` "nodes" on localhost.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lightning.cli import main
from sae_lightning.parallel.memory import state_bytes

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mp_scripts"
TOLERANCE = 1e-5  # relative: max |a - b| / max |b| per tensor, and per logged metric
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# pytest puts tests/ on sys.path (no __init__.py), so the script imports as a module.
equivalence = importlib.import_module("mp_scripts.equivalence")


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Every case trained once on a 1 x 2 mesh; ``<case>.rank<r>.pt`` per rank."""
    out = tmp_path_factory.mktemp("mp")
    cmd = [sys.executable, str(SCRIPTS / "equivalence.py"), str(out), "1", "2"]
    proc = run(cmd, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    """The cases of :data:`MESH_CASES` on a 2 (data) x 2 (tensor) mesh of 4 processes."""
    out = tmp_path_factory.mktemp("mp22")
    cmd = [sys.executable, str(SCRIPTS / "equivalence.py"), str(out), "2", "2", *MESH_CASES]
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


MESH_CASES = ["topk+auxk+resample", "batchtopk+auxk+resample", "relu", "jumprelu+resample"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {}


def reference(references: dict[str, dict], case: str) -> dict:
    if case not in references:
        references[case] = equivalence.summary(*equivalence.train(case, 1, 1))
    return references[case]


FP32_CASES = [name for name, case in equivalence.CASES.items() if case.precision == "32-true"]
BF16_CASES = [name for name, case in equivalence.CASES.items() if case.precision == "bf16-mixed"]


@pytest.mark.parametrize("case", FP32_CASES)
def test_two_shards_equal_one_process(two_ranks: Path, references: dict, case: str) -> None:
    check_equal(two_ranks, 2, reference(references, case), case)


@pytest.mark.parametrize("case", MESH_CASES)
def test_two_by_two_mesh_equals_one_process(four_ranks: Path, references: dict, case: str) -> None:
    check_equal(four_ranks, 4, reference(references, case), case)


BF16_ROUNDOFF = 2.0**-8
"""bf16's unit roundoff (8 significant bits)."""


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_shards_track_one_bf16_process(two_ranks: Path, references: dict, case: str) -> None:
    """``precision: bf16-mixed`` trains on shards, and its loss follows one bf16 process.

    The two runs round the same fp32 products to bf16 at different points (two partial
    reconstructions against one whole; the selection then sees different last bits), so they
    agree only to bf16 rounding: at the first step, where the weights are equal, within one
    roundoff per operand of the squared error (2 u, measured 2.9e-3 at most); over 20 steps
    Adam turns such differences into weight differences of 1-2 % (measured), which the loss
    follows: within 4 u = 1.6e-2 (measured 9.4e-3 at most, batchtopk). A lost or doubled shard
    moves the loss by tens of percent.
    """
    one = reference(references, case)
    ranks = [torch.load(two_ranks / f"{case}.rank{r}.pt", weights_only=False) for r in (0, 1)]
    losses = [m["train/loss"] for m in ranks[0]["metrics"]]
    want = [m["train/loss"] for m in one["metrics"]]
    assert len(losses) == len(want) == equivalence.STEPS
    assert losses[0] == pytest.approx(want[0], rel=2 * BF16_ROUNDOFF)
    for step, (got, ref) in enumerate(zip(losses, want, strict=True)):
        assert got == pytest.approx(ref, rel=4 * BF16_ROUNDOFF), step
    assert losses[-1] < 0.97 * losses[0]  # it trains
    for key, value in ranks[0]["state"].items():  # fp32 master weights, equal on both ranks
        assert value.dtype == one["state"][key].dtype, key
        assert torch.equal(value, ranks[1]["state"][key]), key


def check_equal(out: Path, world: int, one: dict, case: str) -> None:
    """Every rank's gathered state and logged metrics equal the one-process run's."""
    ranks = [torch.load(out / f"{case}.rank{r}.pt", weights_only=False) for r in range(world)]
    for section in ("state", "adam"):  # weights, buffers, Adam's moments: gathered whole
        assert ranks[0][section].keys() == one[section].keys()
        for key, value in one[section].items():
            diff = relative(ranks[0][section][key], value)
            assert diff <= TOLERANCE, f"{case} {section} {key}: relative difference {diff:.3g}"
            for rank in ranks[1:]:
                assert torch.equal(ranks[0][section][key], rank[section][key]), key
    assert len(ranks[0]["metrics"]) == len(one["metrics"]) == equivalence.STEPS
    for step, (got, want) in enumerate(zip(ranks[0]["metrics"], one["metrics"], strict=True)):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=TOLERANCE, abs=1e-7), (step, key)
    # The dead-latent counters are exact, the AuxK cases did exercise AuxK and the resampler
    # cases resampled the killed latents (at least), as many as one process did.
    assert torch.equal(ranks[0]["state"]["tokens_since_fired"], one["state"]["tokens_since_fired"])
    if equivalence.CASES[case].auxk:
        assert max(m["train/loss/auxk"] for m in one["metrics"]) > 0
    assert all(rank["resampled"] == one["resampled"] for rank in ranks)
    if equivalence.CASES[case].resampler is not None:
        assert one["resampled"] >= equivalence.N_KILLED


@pytest.mark.parametrize("case", ["topk", "batchtopk"])
def test_each_shard_holds_about_half_the_parameter_and_optimizer_bytes(
    two_ranks: Path, references: dict, case: str
) -> None:
    one = reference(references, case)["bytes"]
    for r in (0, 1):
        rank = torch.load(two_ranks / f"{case}.rank{r}.pt", weights_only=False)["bytes"]
        assert rank <= 0.55 * one, f"rank {r}: {rank} of {one} bytes"
        # ... and exactly what the memory table's formula says (without gradients).
        d_in, d_sae = equivalence.D_IN, equivalence.D_SAE
        assert rank == state_bytes(d_in, d_sae, 2, grads=False)
        assert one == state_bytes(d_in, d_sae, 1, grads=False)


def expected_traffic(case: str) -> dict[str, int]:
    """Bytes one rank sends per step, T = 2, dp = 1 (the formula of docs/multi-gpu.md)."""
    b, d_in, k = equivalence.BATCH, equivalence.D_IN, 3
    fp32, fp64 = 4, 8
    tp_reduce = b * d_in * fp32 + d_in * fp32 + 2 * fp64  # x_hat, b_dec's gradient, metrics
    if case in ("relu", "jumprelu"):
        return {"tp.all_reduce": tp_reduce + fp32}  # + the penalty's partial sum
    if case == "topk":
        return {"tp.all_reduce": tp_reduce, "tp.all_gather": b * k * fp32}
    assert case == "batchtopk"
    ties = (b + 3) * 8  # the tie counts: place in the mesh, count above, ties per row (int64)
    return {"tp.all_reduce": tp_reduce, "mesh.all_gather": k * b * fp32 + ties}


@pytest.mark.parametrize("case", ["topk", "batchtopk", "relu", "jumprelu"])
def test_bytes_communicated_per_step_match_the_formula(two_ranks: Path, case: str) -> None:
    counted = torch.load(two_ranks / f"{case}.rank0.pt", weights_only=False)["traffic"]
    per_step = {key: value / equivalence.STEPS for key, value in counted.items()}
    assert per_step == expected_traffic(case)


def test_data_parallel_bytes_per_step_match_the_formula(four_ranks: Path) -> None:
    """dp = 2: one all-reduce of the metrics pack and one of the shard's gradients."""
    counted = torch.load(four_ranks / "relu.rank0.pt", weights_only=False)["traffic"]
    d_in, shard, n_metrics = equivalence.D_IN, equivalence.D_SAE // 2, 3  # loss, recon., l1
    metrics = 8 * (n_metrics + 4 + shard + d_in)  # fp64: metrics, sums, fire counts, sum x
    grads = 4 * (2 * shard * d_in + shard + d_in)  # W_enc, W_dec shards, b_enc shard, b_dec
    assert counted["dp.all_reduce"] / equivalence.STEPS == metrics + grads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_args(out: Path, *extra: str) -> list[str]:
    """``sae-lightning fit`` of the quickstart recipe, small: 40 steps, a checkpoint every 10."""
    return [
        "fit",
        "--config",
        str(ROOT / "recipes" / "quickstart.yaml"),
        "--trainer.max_steps",
        "40",
        "--trainer.val_check_interval",
        "20",
        "--trainer.enable_progress_bar",
        "false",
        "--data.batch_size",
        "256",
        "--data.val_samples",
        "256",
        "--checkpoint.every_n_steps",
        "10",
        "--output_dir",
        str(out),
        *extra,
    ]


MP = ["--trainer.strategy", "model_parallel", "--trainer.tensor_parallel_size"]
CLI = [sys.executable, "-m", "sae_lightning.cli"]


def run_folder(out: Path) -> Path:
    return out / "quickstart" / "version_0"


def assert_same_run(got: Path, want: Path, tolerance: float) -> None:
    """Exported weights within ``tolerance`` (relative), metrics within 1e-5."""
    a, b = load_file(got / "sae.safetensors"), load_file(want / "sae.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert relative(a[key], b[key]) <= tolerance, key
    metrics_a = json.loads((got / "metrics.json").read_text())
    metrics_b = json.loads((want / "metrics.json").read_text())
    assert metrics_a["trainer/global_step"] == 40
    for key, value in metrics_b.items():
        if key.startswith("throughput/"):  # wall-clock rates, not results of the run
            continue
        assert metrics_a[key] == pytest.approx(value, rel=TOLERANCE, abs=1e-7), key


@pytest.fixture(scope="module")
def torchrun_fit(tmp_path_factory) -> tuple[Path, Path]:
    """``(sharded, plain)`` run folders: 2 "nodes" x 1 process (TCP rendezvous on 127.0.0.1),
    T = 2, through ``sae-lightning fit``; and, here, meanwhile, the same recipe on one process."""
    tmp = tmp_path_factory.mktemp("torchrun")
    assert main(fit_args(tmp / "plain")) == 0
    # The port is free when chosen but may be taken before the rendezvous binds it; a launch
    # whose rendezvous never completes is retried once on a fresh port, in a fresh folder.
    for attempt in range(2):
        out = tmp / f"sharded{attempt}"
        outputs, codes = launch_two_nodes(out)
        if codes is not None:
            break
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return run_folder(out), run_folder(tmp / "plain")


def launch_two_nodes(out: Path) -> tuple[list[str], list[int] | None]:
    """``sae-lightning fit`` on 2 "nodes" x 1 process; exit codes None when it hung."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    torchrun += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
    torchrun += ["--master-port", str(free_port())]
    fit = fit_args(out, "--trainer.devices", "1", "--trainer.num_nodes", "2", *MP, "2")
    fit += ["--checkpoint.keep", "-1"]
    nodes = [
        subprocess.Popen(
            [*torchrun, "--node-rank", str(node), "-m", "sae_lightning.cli", *fit],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=120)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        return [node.communicate()[0] for node in nodes], None
    return outputs, [node.returncode for node in nodes]


def test_two_node_torchrun_fit_equals_one_process(torchrun_fit: tuple[Path, Path]) -> None:
    sharded, plain = torchrun_fit
    assert not (sharded.parent / "version_1").exists()
    assert (sharded / "checkpoints" / "last.ckpt" / ".metadata").is_file()  # a DCP folder
    assert not list((sharded / "checkpoints").glob("*.partial"))
    # One ordinary sae.safetensors, gathered from the shards.
    assert_same_run(sharded, plain, 1e-6)


def test_a_sharded_checkpoint_continues_at_t1(
    torchrun_fit: tuple[Path, Path], tmp_path: Path
) -> None:
    """The T = 2 checkpoint of step 10, loaded by one process (T = 1), trains on to step 40
    as the one-process run did."""
    sharded, plain = torchrun_fit
    step10 = sharded / "checkpoints" / "step0000010.ckpt"
    proc = run([*CLI, *fit_args(tmp_path, *MP, "1"), "--ckpt_path", str(step10)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(run_folder(tmp_path), plain, TOLERANCE)


def test_sigkill_then_resume_is_bit_identical(
    torchrun_fit: tuple[Path, Path], tmp_path: Path
) -> None:
    """A T = 2 run killed after its first checkpoint, resumed with ``--ckpt_path last``, ends
    with exactly the weights of the unbroken T = 2 run."""
    cmd = [*CLI, *fit_args(tmp_path, "--trainer.devices", "2", *MP, "2")]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, start_new_session=True)
    first = run_folder(tmp_path) / "checkpoints" / "last.ckpt" / ".metadata"
    deadline = time.monotonic() + 180
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.1))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_folder(tmp_path) / "metrics.json").exists(), "the run ended before the kill"
    resumed = run([*cmd, "--ckpt_path", "last"], timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(run_folder(tmp_path) / "sae.safetensors")
    b = load_file(torchrun_fit[0] / "sae.safetensors")
    for key in b:
        assert torch.equal(a[key], b[key]), key


def test_recipe_errors_name_the_field_and_the_fix() -> None:
    from sae_lightning.errors import ConfigError
    from sae_lightning.parallel.module import ShardedSAEModule
    from sae_lightning.parallel.strategy import check_model_parallel, model_parallel_arguments
    from sae_lightning.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"trainer\.tensor_parallel_size.*model_parallel"):
        model_parallel_arguments({"strategy": "ddp", "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match=r"trainer\.tensor_parallel_size: 3 does not divide"):
        model_parallel_arguments({"strategy": "model_parallel", "tensor_parallel_size": 3})
    args = model_parallel_arguments(
        {"strategy": "model_parallel", "tensor_parallel_size": 2, "devices": 2, "num_nodes": 2}
    )
    assert (args["strategy"]._data_parallel_size, args["strategy"]._tensor_parallel_size) == (2, 2)
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    overrides = [("trainer.strategy", "model_parallel"), ("variants", "[{name: a}]")]
    recipe = load_recipe([quickstart], overrides)
    with pytest.raises(ConfigError, match=r"^variants: several SAEs"):
        check_model_parallel(recipe)
    with pytest.raises(ConfigError, match=r"model\.decoder: 'tied' cannot be sharded"):
        ShardedSAEModule(8, 16, {"name": "linear"}, {"name": "tied"}, {"name": "topk", "k": 2})
