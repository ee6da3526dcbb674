"""``model.compile``: the compiled SAE trains the step the eager SAE trains."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run, eager_sae

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"

# Inductor's CPU backend writes and builds C++; without a compiler torch.compile cannot run.
needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH",
)


def run_for(tmp_path: Path, compile: bool):
    over = [
        ("output_dir", str(tmp_path)),
        ("data.d", "16"),
        ("data.n_atoms", "48"),
        ("data.batch_size", "64"),
        ("model.d_sae", "32"),
        ("model.sparsity", "{name: topk, k: 3, aux_coefficient: 0.03125}"),
        ("model.compile", str(compile).lower()),
    ]
    return build_run(load_recipe([RECIPE], over), log=False)


@needs_cxx
def test_compiled_and_eager_agree_on_a_step(tmp_path: Path) -> None:
    torch._dynamo.reset()
    eager, compiled = run_for(tmp_path, False), run_for(tmp_path, True)
    assert "run" not in vars(eager.module.sae)
    assert "run" in vars(compiled.module.sae)  # model.compile wrapped the forward
    for a, b in zip(eager.module.parameters(), compiled.module.parameters(), strict=True):
        assert torch.equal(a, b)  # same seed, same initial weights
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 0.7
    with torch.no_grad():  # a few dead latents, so the AuxK term takes part
        for module in (eager.module, compiled.module):
            module.tokens_since_fired[:4] = 10**9
    steps = [m.compute_step(x, step=0) for m in (eager.module, compiled.module)]
    for out in steps:
        out.loss.backward()
    assert set(steps[0].terms) == set(steps[1].terms) == {"reconstruction", "auxk"}
    for key in steps[0].terms:
        torch.testing.assert_close(steps[1].terms[key], steps[0].terms[key], rtol=1e-5, atol=1e-6)
    named = zip(eager.module.named_parameters(), compiled.module.parameters(), strict=True)
    for (name, a), b in named:
        assert a.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Undoing it restores the plain method (what export writes and deep-copies).
    assert "run" not in vars(eager_sae(compiled.module.sae))
