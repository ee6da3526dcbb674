"""Synthetic ground truth: sparse superposition ``x = D z + noise`` with a known dictionary.

This is the model-recovery setting: ``n_atoms`` unit vectors in ``d`` dimensions (more atoms than
dimensions, so they are in superposition), used with Zipf-like frequencies, ``n_active`` at a
time with positive amplitudes. Because the true dictionary is known, training reports how well
the SAE recovers it (MMCS and the fraction of atoms found at cosine >= 0.9).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from sae_lightning.config import PluginConfig
from sae_lightning.data.stream import IndexedDataModule, seeded_generator
from sae_lightning.data.validation import BatchValidator, NonFinitePolicy
from sae_lightning.metrics import dictionary_recovery

_TRAIN, _VAL, _DICT = 0, 1, 2  # stream ids for seeded_generator


class SyntheticConfig(PluginConfig):
    d: int = Field(32, gt=0, description="input width (the SAE's d_in)")
    n_atoms: int | None = Field(
        None, gt=0, description="number of true atoms; default 4 x d (superposition)"
    )
    n_active: int = Field(4, gt=0, description="atoms active in every sample")
    zipf_exponent: float = Field(
        0.5, ge=0, description="atom i is drawn with probability proportional to (i+1)^-exponent"
    )
    amplitude_min: float = Field(0.5, gt=0, description="smallest amplitude of an active atom")
    amplitude_max: float = Field(1.5, gt=0, description="largest amplitude of an active atom")
    noise_std: float = Field(0.02, ge=0, description="std of the Gaussian noise per coordinate")
    batch_size: int = Field(1024, gt=0, description="global batch size (split across ranks)")
    val_samples: int = Field(8192, gt=0, description="size of the fixed validation set")
    val_batch_size: int = Field(4096, gt=0, description="validation batch size")
    seed: int | None = Field(None, ge=0, description="data seed; default the recipe's seed")
    nonfinite: NonFinitePolicy = Field(
        "fail", description="rows with NaN/Inf: fail the run, or drop them and count them"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticConfig:
        n_atoms = self.n_atoms if self.n_atoms is not None else 4 * self.d
        if self.n_active > n_atoms:
            raise ValueError(f"n_active={self.n_active} exceeds n_atoms={n_atoms}")
        if self.amplitude_min > self.amplitude_max:
            raise ValueError(
                f"amplitude_min={self.amplitude_min} exceeds amplitude_max={self.amplitude_max}"
            )
        return self


class AliasTable:
    """Walker's alias table: i.i.d. draws from fixed weights in O(1) each (Vose's construction).

    Draw: a uniform bin ``i``, kept with probability ``keep[i]``, else its ``alias[i]``.
    """

    def __init__(self, weights: Tensor) -> None:
        n = len(weights)
        scaled = (weights.double() * n / weights.double().sum()).tolist()
        keep, alias = [1.0] * n, list(range(n))
        small = [i for i, w in enumerate(scaled) if w < 1.0]
        large = [i for i, w in enumerate(scaled) if w >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            keep[s], alias[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        self.keep = np.array(keep)  # leftovers are exactly 1 (up to rounding)
        self.alias = np.array(alias, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keep)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> np.ndarray:
        """I.i.d. indices of ``shape``; the randomness comes from ``generator``."""
        u = torch.rand(*shape, generator=generator, dtype=torch.float64).numpy() * len(self)
        bins = np.minimum(u.astype(np.int64), len(self) - 1)
        return np.where(u - bins < self.keep[bins], bins, self.alias[bins])


def draw_distinct(table: AliasTable, n: int, k: int, generator: torch.Generator) -> Tensor:
    """``(n, k)`` indices, ``k`` distinct per row, drawn one after another, each with
    probability proportional to its weight among those not drawn yet.

    That is the law of ``torch.multinomial(..., replacement=False)``, computed much faster for
    ``k`` far below the number of items: each row draws i.i.d. with replacement (an alias
    table) and keeps the first ``k`` distinct values. The first new value after some draws is
    distributed as the weights restricted to the values not drawn yet, so this is exact. Rows
    that have not met ``k`` distinct values draw more, continuing their own sequence.

    Args:
        table: the weights (at least ``k`` of them nonzero).
        n: rows.
        k: distinct items per row.
        generator: the source of randomness; the result is a function of its state.
    """
    # NumPy: the loop's many small gathers and scatters would each enter a torch parallel region.
    out = np.empty((n, k), dtype=np.int64)
    found = np.zeros(n, dtype=np.int64)  # distinct values found so far, per row
    seen = np.zeros((n, len(table)), dtype=bool)
    todo = np.arange(n)
    extra = max(8, k // 2)
    while len(todo):
        block = table.draw((len(todo), k + extra), generator)
        local = np.arange(len(todo))
        for column in block.T:  # in draw order: the first k distinct values are kept
            new = ~seen[local, column] & (found[todo] < k)
            seen[local, column] = True
            rows = todo[new]
            out[rows, found[rows]] = column[new]
            found[rows] += 1
        more = found[todo] < k
        todo, seen = todo[more], seen[more]
        extra = 2 * extra
    return torch.from_numpy(out)


class SparseGenerativeModel:
    """The ground-truth dictionary and the sampler of sparse combinations of its atoms."""

    def __init__(self, config: SyntheticConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        n_atoms = config.n_atoms if config.n_atoms is not None else 4 * config.d
        g = seeded_generator(seed, _DICT)
        atoms = torch.randn(n_atoms, config.d, generator=g)
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)  # (n_atoms, d)
        ranks = torch.arange(1, n_atoms + 1, dtype=torch.float64)
        self.probs = (ranks**-config.zipf_exponent).float()  # (n_atoms,)
        self.table = AliasTable(ranks**-config.zipf_exponent)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``(n, d)`` samples, each a noisy sum of ``n_active`` scaled atoms."""
        c = self.config
        chosen = draw_distinct(self.table, n, c.n_active, generator)  # (n, n_active)
        amps = torch.rand(n, c.n_active, generator=generator)
        amps = c.amplitude_min + (c.amplitude_max - c.amplitude_min) * amps
        # A weighted sum of gathered rows, without materialising (n, n_active, d).
        x = F.embedding_bag(chosen, self.atoms, per_sample_weights=amps, mode="sum")
        if c.noise_std > 0:
            x = x + c.noise_std * torch.randn(n, c.d, generator=generator)
        return x

    def batch(self, t: int) -> Tensor:
        """Training batch ``t``: identical for the same seed and ``t``, whatever ran before."""
        return self.sample(self.config.batch_size, seeded_generator(self.seed, _TRAIN, t))


class SyntheticDataModule(IndexedDataModule):
    """Sparse superposition x = D z + noise with a known dictionary; reports MMCS recovery."""

    Config = SyntheticConfig
    split_validation = False  # every rank validates the whole set

    def __init__(self, config: SyntheticConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.generative = SparseGenerativeModel(
            config, config.seed if config.seed is not None else seed
        )
        self.validator = BatchValidator(config.d, config.nonfinite, source="synthetic data")
        self._val: Tensor | None = None

    @property
    def d_in(self) -> int:
        """Width of every sample; the recipe's ``model.d_in`` must match it."""
        return self.config.d

    def setup(self, stage: str | None = None) -> None:
        self.check_batch_size()
        if self._val is None:
            self._val = self.generative.sample(
                self.config.val_samples, seeded_generator(self.generative.seed, _VAL)
            )

    def rank_batch(self, t: int) -> Tensor:
        """This rank's contiguous slice of global batch ``t``."""
        rank, world = self.rank_and_world()
        per_rank = self.config.batch_size // world
        return self.generative.batch(t)[rank * per_rank : (rank + 1) * per_rank]

    def validation_data(self) -> Tensor:
        assert self._val is not None, "call setup() first"
        return self._val

    def reference_atoms(self) -> Tensor:
        """The true ``(n_atoms, d)`` dictionary (drawn by the ``AtomImages`` callback)."""
        return self.generative.atoms

    def reference_metrics(self, sae: torch.nn.Module) -> dict[str, float]:
        """Recovery of the true dictionary by ``sae.atoms()`` (MMCS, fraction at cos >= 0.9)."""
        return dictionary_recovery(self.generative.atoms, sae.atoms())
