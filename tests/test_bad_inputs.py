"""The real CLI, in subprocesses, on bad inputs: exit code 2, no traceback, the field named.

Every case runs ``python -m sae_lightning.cli ...`` as a user would. The cases run concurrently
(a small thread pool) so the file stays fast; most fail before Lightning is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
SMALL = [
    "--data.d", "8", "--data.n_atoms", "16", "--data.batch_size", "32",
    "--data.val_samples", "32", "--model.d_sae", "32", "--trainer.max_steps", "2",
    "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


@dataclass
class Case:
    """One bad input: the CLI arguments (``{tmp}`` is the case's folder) and what must be named."""

    id: str
    args: list[str]
    names: list[str]
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def recipe(tmp: Path, text: str, name: str = "recipe.yaml") -> None:
    (tmp / name).write_text(text)


def quickstart_with(**changes: object) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        data = yaml.safe_load(RECIPE.read_text())
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        recipe(tmp, yaml.safe_dump(data))

    return write


def native_sae_with_missing_plugin(tmp: Path) -> None:
    """A native export whose encoder comes from a distribution that is not installed."""
    config = {
        "format_version": 1,
        "d_in": 4,
        "d_sae": 8,
        "encoder": {"name": "fancy_encoder"},
        "decoder": {"name": "linear"},
        "sparsity": {"name": "topk", "k": 2},
        "plugins": {"encoder": {"name": "fancy_encoder", "distribution": "sae-fancy",
                                "version": "1.2.3", "state_version": 1}},
    }  # fmt: skip
    folder = tmp / "sae"
    folder.mkdir()
    (folder / "sae_config.json").write_text(json.dumps(config))
    save_file({"encoder.W_enc": torch.zeros(8, 4)}, str(folder / "sae.safetensors"))


def truncated_cache(tmp: Path) -> None:
    """An activation cache whose training shard lost its tail (verify_checksums off)."""
    from sae_lightning.data.cache_format import FORMAT_VERSION, MANIFEST

    cache = tmp / "cache"
    cache.mkdir()
    shards = []
    for split, rows in (("train", 64), ("val", 16)):
        file = f"{split}-00000.safetensors"
        save_file({"activations": torch.randn(rows, 8)}, str(cache / file))
        shards.append({"file": file, "split": split, "rows": rows, "sha256": "0" * 64})
    train = cache / shards[0]["file"]
    train.write_bytes(train.read_bytes()[:-100])
    manifest = {"format_version": FORMAT_VERSION, "model": "m", "hook": "h", "d_in": 8,
                "storage_dtype": "float32", "shards": shards}  # fmt: skip
    (cache / MANIFEST).write_text(json.dumps(manifest))
    recipe(
        tmp,
        "name: cached\ndata: {name: activation_cache, path: " + str(cache) + ", model: m, "
        "hook: h, verify_checksums: false, batch_size: 16}\nmodel: {d_sae: 32, sparsity: "
        "{name: topk, k: 2}}\ntrainer: {max_steps: 2, accelerator: cpu}\n",
    )


def coarse_eval_file(tmp: Path) -> None:
    """A PDE dataset of 9 points per axis, asked to validate at 17."""
    torch.save({"x": torch.randn(8, 9, 9), "y": torch.randn(8, 9, 9)}, tmp / "fields.pt")
    recipe(
        tmp,
        "name: coarse\ndata: {name: pde_fields, equation: file, path: "
        + str(tmp / "fields.pt")
        + ", resolution: 9, eval_resolutions: [17], val_samples: 2, batch_size: 2}\n"
        "model: {d_sae: 16, encoder: {name: fno, modes: [2, 2]}, decoder: fno, "
        "sparsity: {name: joint_topk, k: 2}}\n"
        "trainer: {max_steps: 2, accelerator: cpu}\n",
    )


FIT = ["fit", "--config", "{tmp}/recipe.yaml"]
QUICK = ["fit", "--config", str(RECIPE), "--output_dir", "{tmp}/runs"]

CASES = [
    Case("empty recipe", FIT, ["recipe.yaml", "name:"], lambda t: recipe(t, "")),
    Case("comment-only recipe", FIT, ["recipe.yaml"], lambda t: recipe(t, "# nothing\n")),
    Case("malformed yaml", FIT, ["recipe.yaml", "line 3"],
         lambda t: recipe(t, "name: x\nmodel: {d_sae: 4\n")),
    Case("yaml tab indentation", FIT, ["recipe.yaml"],
         lambda t: recipe(t, "name: x\nmodel:\n\td_sae: 4\n")),
    Case("top level is a list", FIT, ["recipe.yaml", "mapping"], lambda t: recipe(t, "- a\n")),
    Case("python tag", FIT, ["recipe.yaml"],
         lambda t: recipe(t, "name: !!python/object/apply:os.system ['true']\n")),
    Case("missing name", FIT, ["name", "required"], lambda t: recipe(t, "seed: 1\n")),
    Case("bad run name", FIT, ["name"], lambda t: recipe(t, "name: a b/c\n")),
    Case("both widths", [*QUICK, "--model.expansion_factor", "4"], ["d_sae", "expansion_factor"]),
    Case("config file missing", ["fit", "--config", "{tmp}/nope.yaml"], ["--config", "nope.yaml"]),
    Case("no config", ["fit"], ["--config"]),
    Case("positional override", [*QUICK, "stray"], ["stray"]),
    Case("override without value", [*QUICK, "--model.d_sae"], ["model.d_sae"]),
    Case("unknown top-level key", FIT, ["modle", "model"],
         quickstart_with(modle={"d_sae": 4})),
    Case("unknown model key", [*QUICK, "--model.dd_sae", "5"], ["model.dd_sae", "d_sae"]),
    Case("unknown sparsity plugin", [*QUICK, "--model.sparsity.name", "topkk"],
         ["model.sparsity.name", "topk"]),
    Case("unknown encoder plugin", [*QUICK, "--model.encoder.name", "linaer"],
         ["model.encoder.name", "linear"]),
    Case("negative k", [*QUICK, "--model.sparsity.k", "-4"], ["model.sparsity.k"]),
    Case("unknown sparsity parameter", [*QUICK, "--model.sparsity.kk", "4"],
         ["model.sparsity.kk"]),
    Case("sparsity not a mapping", FIT, ["model.sparsity"],
         quickstart_with(model__sparsity=[1, 2])),
    Case("negative learning rate", [*QUICK, "--model.optimizer.lr", "-1"],
         ["model.optimizer.lr"]),
    Case("bad betas", [*QUICK, "--model.optimizer.betas", "[0.9, 1.5]"],
         ["model.optimizer.betas"]),
    Case("unknown loss mode", [*QUICK, "--model.loss.mode", "global"], ["model.loss.mode"]),
    Case("kl coefficient in local mode", [*QUICK, "--model.loss.kl_coefficient", "1"],
         ["model.loss", "kl_coefficient"]),
    Case("bad variant name", [*QUICK, "--variants", "[{name: 'a b'}]"], ["variants.0.name"]),
    Case("repeated variant name", [*QUICK, "--variants", "[{name: a}, {name: a}]"],
         ["variants.1.name"]),
    Case("reserved trainer key", [*QUICK, "--trainer.logger", "true"], ["trainer.logger"]),
    Case("unknown trainer key", [*QUICK, "--trainer.max_stepz", "5"],
         ["trainer.max_stepz", "max_steps"]),
    Case("zero steps", [*QUICK, "--trainer.max_steps", "0"], ["trainer.max_steps"]),
    Case("fractional validation interval", [*QUICK, "--trainer.val_check_interval", "0.5"],
         ["trainer.val_check_interval"]),
    Case("unknown data plugin", [*QUICK, "--data.name", "synthetik"], ["data.name", "synthetic"]),
    Case("unknown data key", [*QUICK, "--data.n_activ", "5"], ["data.n_activ", "n_active"]),
    Case("d_in disagrees with data", [*QUICK, "--model.d_in", "31"], ["model.d_in"]),
    Case("k above d_sae", [*QUICK, "--model.sparsity.k", "100000"], ["model.sparsity.k"]),
    Case("resume last with no runs", [*QUICK, "--ckpt_path", "last"], ["--ckpt_path"]),
    Case("resume from a missing file", [*QUICK, "--ckpt_path", "{tmp}/x.ckpt"],
         ["--ckpt_path", "x.ckpt"]),
    Case("unknown callback", [*QUICK, "--callbacks", "[{name: resampler_x}]"],
         ["callbacks.0.name", "resampler"]),
    Case("distribute_saes without variants",
         [*QUICK, "--trainer.distribute_saes", "true", "--trainer.devices", "2"],
         ["trainer.distribute_saes", "variants"]),
    Case("distribute_saes with latent sharding",
         [*QUICK, "--variants", "[{name: a}, {name: b}]", "--trainer.distribute_saes", "true",
          "--trainer.strategy", "model_parallel", "--trainer.devices", "2"],
         ["trainer.distribute_saes", "model_parallel"]),
    Case("truncated cache shard", FIT, ["train-00000.safetensors", "verify_checksums"],
         truncated_cache),
    Case("pde eval file too coarse", FIT, ["data.eval_resolutions", "fields.pt"],
         coarse_eval_file),
    Case("export a missing source", ["export", "{tmp}/none", "--format", "saelens", "--out",
                                     "{tmp}/out"], ["source"]),
    Case("export unknown format", ["export", "{tmp}", "--format", "onnx", "--out", "{tmp}/o"],
         ["--format"]),
    Case("load a plugin that is not installed",
         ["export", "{tmp}/sae", "--format", "native", "--out", "{tmp}/out"],
         ["sae-fancy", "1.2.3", "fancy_encoder"], native_sae_with_missing_plugin),
    Case("plugins with a stray argument", ["plugins", "extra"], ["extra"]),
    Case("DDP batch size not divisible by ranks",
         QUICK + SMALL + ["--data.batch_size", "33", "--trainer.devices", "2",
                          "--trainer.strategy", "ddp"],
         ["data.batch_size"]),
]  # fmt: skip
ONCE_PER_JOB = {"DDP batch size not divisible by ranks"}


def trained_run(tmp: Path) -> None:
    """Train the small quickstart for 2 steps into ``tmp/runs``, to be resumed."""
    base = ["fit", "--config", str(RECIPE), "--output_dir", str(tmp / "runs"), *SMALL]
    done = subprocess.run([sys.executable, "-m", "sae_lightning.cli", *base], capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]


CASES.append(
    Case(
        "resume with a changed width",
        [*QUICK, *SMALL, "--model.d_sae", "64", "--ckpt_path", "last"],
        ["error: model.d_sae:", "last.ckpt", "(32", "(64"],
        trained_run,
    )
)


def run_case(case: Case, tmp: Path) -> subprocess.CompletedProcess[str]:
    tmp.mkdir(parents=True)
    if case.setup is not None:
        case.setup(tmp)
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **case.env}
    return subprocess.run(
        [sys.executable, "-m", "sae_lightning.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=240,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c.id: pool.submit(run_case, c, root / f"case{i}") for i, c in enumerate(CASES)}
        return {key: f.result() for key, f in futures.items()}


def test_there_are_at_least_30_distinct_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_naming_the_field(results, case: Case) -> None:
    done = results[case.id]
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err[-2000:])
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-2000:]
    for name in case.names:
        assert name in err, (name, err[-2000:])
    assert len(err.strip().splitlines()) <= 3, err[-2000:]
    if case.id in ONCE_PER_JOB:
        assert err.count("error: ") == 1, err
