"""One training step of the SAE (``run`` + ``auxiliary_losses`` + backward) reads nothing from the
device on the host: no ``.item()``, no ``nonzero``, no shape that depends on values.

On an accelerator each such read waits for the device. The step is counted on CPU, where the
same calls happen, by wrapping every Tensor method that hands a device value to Python.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch

from sae_lightning.components.base import DeadLatents
from sae_lightning.sae import SparseAutoencoder

READS = ("item", "tolist", "__bool__", "cpu", "nonzero", "__int__", "__float__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """A Counter of ``"<method> @ <file>:<line>"`` for every host read while it is active."""
    found: collections.Counter[str] = collections.Counter()

    def counting(name, real):
        def wrapper(*args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            found[f"{name} @ {caller.filename.rsplit('/', 2)[-1]}:{caller.lineno}"] += 1
            return real(*args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counting("torch.nonzero", torch.nonzero))
    return found


SPARSITIES = {
    "relu": {"name": "relu"},
    "jumprelu": {"name": "jumprelu", "init_threshold": 0.05},
    "topk": {"name": "topk", "k": 4, "aux_k": 6},
    "batchtopk": {"name": "batchtopk", "k": 4, "aux_k": 6},
}


def one_step(
    sparsity: dict, fused: bool, host_reads: collections.Counter, dead_at_forward: bool = False
) -> dict[str, int]:
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, {"name": "linear"}, {"name": "linear"}, sparsity)
    sae.fused = fused
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::5] = True  # AuxK has work
    host_reads.clear()
    out = sae.run(x, step=3, dead=DeadLatents(dead) if dead_at_forward else None)
    aux = sae.auxiliary_losses(out.aux_source, x, (x - out.x_hat).detach(), dead)
    terms = [(x - out.x_hat).pow(2).sum(), *out.penalties.values(), *aux.values()]
    torch.stack(terms).sum().backward()
    reads = dict(host_reads)
    host_reads.clear()
    assert all(p.grad is not None for p in sae.encoder.parameters())  # the step really ran
    has_aux = sparsity["name"] in ("topk", "batchtopk") and sparsity.get("aux_coefficient") != 0
    assert ("auxk" in aux) == has_aux
    return reads


@pytest.mark.parametrize("name", list(SPARSITIES))
def test_dense_path_step_reads_nothing_on_the_host(name, host_reads) -> None:
    assert one_step(SPARSITIES[name], False, host_reads) == {}


@pytest.mark.parametrize("name", ["relu", "jumprelu"])
def test_plugins_without_a_fused_path_read_nothing_with_fusing_on(name, host_reads) -> None:
    assert one_step(SPARSITIES[name], True, host_reads) == {}


def test_fused_topk_without_auxk_reads_nothing(host_reads) -> None:
    assert one_step({**SPARSITIES["topk"], "aux_coefficient": 0}, True, host_reads) == {}


@pytest.mark.parametrize("dead_at_forward", [False, True])
@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_fused_topk_family_with_auxk_reads_nothing(name, dead_at_forward, host_reads) -> None:
    assert one_step(SPARSITIES[name], True, host_reads, dead_at_forward) == {}


def test_the_counter_sees_a_host_read(host_reads) -> None:
    t = torch.ones(3)
    t.sum().item()
    t.nonzero()
    assert sum(host_reads.values()) == 2
