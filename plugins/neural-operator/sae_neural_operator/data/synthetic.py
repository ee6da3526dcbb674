"""The sparse functional generative model: model recovery in function space, at any resolution.

A sample is a ``C``-channel function on the periodic domain ``[0, 1)^d`` (``d`` = 1 or 2)::

    u(x) = sum_{j in S} a_j d_j(x - s_j) + eta(x)

- ``d_1 ... d_n`` (``n_atoms``) are the true atoms: continuous functions of unit L2 norm,
  band-limited random Fourier series (``family: fourier``) or localised sums of periodised
  Gaussian bumps (``family: bumps``), see :mod:`sae_neural_operator.data.functions`;
- ``S`` holds ``n_active`` distinct atoms drawn uniformly without replacement (the support);
- ``a_j ~ U[amplitude_min, amplitude_max]``, times an independent random sign when
  ``sign: random`` (as Tolooshams & Ba 2022). The default ``positive`` suits SAEs whose codes are
  non-negative (ReLU, TopK), which would otherwise need a concept for ``d_j`` and for ``-d_j``;
- ``s_j`` is uniform on ``[0, 1)^d`` with ``shifts: random``: the convolutional model
  ``u = sum_j d_j * z_j`` with impulse codes ``z_j = a_j delta_{s_j}``, recoverable by
  convolutional SAEs (SAE-FNO, SAE-CNN) and compared up to translation. With ``shifts: none``
  every atom sits at its canonical position: the vector model ``u = D z`` in function space,
  recoverable by SAE-MLP and lifted SAEs too;
- ``eta`` is band-limited Gaussian noise (frequencies ``|k|_inf <= noise_bandwidth``) with mean
  square ``noise_std^2`` per channel, itself a continuous function.

Every term is a closed-form continuous function, so one sample (one seed and index) can be
rendered exactly on any grid ``(N,)`` or ``(N, N)`` (point ``i`` at ``i / N``): renderings at
``N`` and ``2N`` agree at the shared points to float rounding. Training batch ``t`` is a pure
function of ``(seed, t)``, which makes resumed runs and DDP ranks exact, as in
:mod:`sae_lightning.data.synthetic`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor

from sae_lightning.config import PluginConfig
from sae_lightning.data.stream import IndexedDataModule, seeded_generator
from sae_lightning.data.validation import BatchValidator, NonFinitePolicy
from sae_neural_operator.data.functions import (
    MAX_BUMP_WIDTH,
    AtomFamily,
    BandLimitedNoise,
    BumpAtoms,
    FourierAtoms,
    Grid,
)
from sae_neural_operator.recovery import (
    concept_support,
    functional_mmcs,
    support_precision_recall,
    utilization,
)

_TRAIN, _VAL, _DICT = 0, 1, 2  # stream ids for seeded_generator


class FunctionSyntheticConfig(PluginConfig):
    """``function_synthetic``: the sparse functional generative model (module docstring)."""

    n_atoms: int = Field(16, gt=0, description="number of true atoms (concepts)")
    family: Literal["fourier", "bumps"] = Field(
        "fourier",
        description="true atoms: band-limited random Fourier series, or localised Gaussian bumps",
    )
    dims: Literal[1, 2] = Field(1, description="dimension of the domain [0, 1)^dims")
    grid: int = Field(64, ge=4, description="training grid points per axis")
    channels: int = Field(1, gt=0, description="channels C of every function (the SAE's d_in)")
    n_active: int = Field(3, gt=0, description="atoms active in every sample")
    amplitude_min: float = Field(1.0, gt=0, description="smallest amplitude of an active atom")
    amplitude_max: float = Field(2.0, gt=0, description="largest amplitude of an active atom")
    sign: Literal["positive", "random"] = Field(
        "positive", description="amplitude signs: all positive, or random +-1 per active atom"
    )
    shifts: Literal["random", "none"] = Field(
        "random",
        description="random: each active atom at a uniform random translation (convolutional "
        "model); none: atoms at their canonical positions (vector model u = D z)",
    )
    max_bandwidth: int = Field(
        6, gt=0, description="fourier atoms: largest frequency per axis (|k|_inf)"
    )
    spectral_decay: float = Field(
        1.0, ge=0, description="fourier atoms: coefficient std (1 + |k|^2)^(-decay/2)"
    )
    bump_width: float = Field(
        0.05, gt=0, le=MAX_BUMP_WIDTH, description="bumps: largest Gaussian width (std)"
    )
    bumps_per_atom: int = Field(2, gt=0, description="bumps: Gaussians summed in each atom")
    noise_std: float = Field(
        0.02, ge=0, description="root mean square of the band-limited noise per channel"
    )
    noise_bandwidth: int = Field(16, gt=0, description="largest noise frequency per axis")
    batch_size: int = Field(64, gt=0, description="functions per global batch (split across ranks)")
    val_samples: int = Field(256, gt=0, description="size of the fixed validation set")
    val_batch_size: int = Field(64, gt=0, description="validation batch size")
    support_threshold: float = Field(
        0.0,
        ge=0,
        description="reference metrics: a concept is active in a sample when |z_j| (vector "
        "codes) or its L1 mass int |z_j| (concept maps) exceeds this; 0 = nonzero anywhere",
    )
    seed: int | None = Field(None, ge=0, description="data seed; default the recipe's seed")
    nonfinite: NonFinitePolicy = Field(
        "fail", description="samples with NaN/Inf: fail the run, or drop them and count them"
    )

    @model_validator(mode="after")
    def _consistent(self) -> FunctionSyntheticConfig:
        if self.n_active > self.n_atoms:
            raise ValueError(f"n_active={self.n_active} exceeds n_atoms={self.n_atoms}")
        if self.amplitude_min > self.amplitude_max:
            raise ValueError(
                f"amplitude_min={self.amplitude_min} exceeds amplitude_max={self.amplitude_max}"
            )
        if self.family == "fourier" and self.grid <= 2 * self.max_bandwidth:
            raise ValueError(
                f"grid={self.grid} does not resolve max_bandwidth={self.max_bandwidth} "
                f"(needs grid > 2 x max_bandwidth = {2 * self.max_bandwidth}); raise grid or "
                "lower max_bandwidth"
            )
        if self.family == "bumps" and self.bump_width * self.grid < 1:
            raise ValueError(
                f"bump_width={self.bump_width} is under one grid step at grid={self.grid}; "
                f"use bump_width >= {1 / self.grid:.4g} or a finer grid"
            )
        return self


class SampleParams(NamedTuple):
    """Everything that defines a batch of samples, independent of any grid."""

    atoms: Tensor
    """``(B, n_active)`` int64 ids of the active atoms."""
    amplitudes: Tensor
    """``(B, n_active)`` float64 signed amplitudes ``a_j``."""
    shifts: Tensor
    """``(B, n_active, d)`` float64 translations ``s_j`` (zeros with ``shifts: none``)."""
    noise: Tensor
    """``(B, C, F)`` complex128 coefficients of the noise function."""


class FunctionGenerativeModel:
    """The true atoms and the sampler of sparse shifted combinations of them.

    Args:
        config: the DataModule's parameters.
        seed: the data seed; the atoms depend on it alone.
    """

    def __init__(self, config: FunctionSyntheticConfig, seed: int) -> None:
        c = config
        self.config, self.seed = c, seed
        g = seeded_generator(seed, _DICT)
        self.family: AtomFamily
        if c.family == "fourier":
            self.family = FourierAtoms(
                c.n_atoms, c.channels, c.dims, c.max_bandwidth, c.spectral_decay, g
            )
        else:
            self.family = BumpAtoms(
                c.n_atoms, c.channels, c.dims, c.bump_width, c.bumps_per_atom, g
            )
        self.noise = BandLimitedNoise(c.channels, c.dims, c.noise_bandwidth, c.noise_std)

    def sample(self, n: int, generator: torch.Generator) -> SampleParams:
        """Parameters of ``n`` samples (atoms, amplitudes, shifts, noise)."""
        c, f64 = self.config, torch.float64
        keys = torch.rand(n, c.n_atoms, generator=generator, dtype=f64)
        atoms = keys.argsort(dim=1)[:, : c.n_active]  # uniform subsets without replacement
        amps = torch.rand(n, c.n_active, generator=generator, dtype=f64)
        amps = c.amplitude_min + (c.amplitude_max - c.amplitude_min) * amps
        if c.sign == "random":
            flip = torch.randint(0, 2, (n, c.n_active), generator=generator)
            amps = amps * (1 - 2 * flip).to(f64)
        shifts = torch.rand(n, c.n_active, c.dims, generator=generator, dtype=f64)
        if c.shifts == "none":
            shifts = torch.zeros_like(shifts)
        return SampleParams(atoms, amps, shifts, self.noise.draw(n, generator))

    def render(self, params: SampleParams, grid: Grid, noise: bool = True) -> Tensor:
        """``(B, C, *grid)`` float64 point values of the samples ``params`` on ``grid``."""
        u = self.family.render(params.atoms, params.amplitudes, params.shifts, grid)
        if noise and self.config.noise_std > 0:
            u = u + self.noise.render(params.noise, grid)
        return u

    def support(self, params: SampleParams) -> Tensor:
        """``(B, n_atoms)`` bool: which atoms are active in each sample."""
        out = torch.zeros(len(params.atoms), self.config.n_atoms, dtype=torch.bool)
        return out.scatter_(1, params.atoms, True)

    def batch_params(self, t: int) -> SampleParams:
        """Parameters of global training batch ``t``: the same for the same seed and ``t``."""
        return self.sample(self.config.batch_size, seeded_generator(self.seed, _TRAIN, t))

    def val_params(self) -> SampleParams:
        """Parameters of the fixed validation set."""
        return self.sample(self.config.val_samples, seeded_generator(self.seed, _VAL))


def _rows(params: SampleParams, start: int, stop: int) -> SampleParams:
    return SampleParams(*(p[start:stop] for p in params))


class FunctionSyntheticDataModule(IndexedDataModule):
    """Sparse shifted combinations of continuous atoms (1-D/2-D); reports functional recovery.

    Batches are ``(B, C, *train_grid)`` float32. ``reference_metrics`` (logged under ``val/``)
    scores the SAE's decoder concepts against the true atoms: ``mmcs``, ``recovered_frac``,
    ``support_precision``, ``support_recall`` and ``utilization`` (see
    :mod:`sae_neural_operator.recovery`).
    """

    Config = FunctionSyntheticConfig

    def __init__(self, config: FunctionSyntheticConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.generative = FunctionGenerativeModel(
            config, config.seed if config.seed is not None else seed
        )
        self.validator = BatchValidator(
            config.channels, config.nonfinite, source="function_synthetic data"
        )
        self._val: Tensor | None = None

    @property
    def d_in(self) -> int:
        """Channels of every function; the recipe's ``model.d_in`` must match it."""
        return self.config.channels

    @property
    def train_grid(self) -> Grid:
        """The training grid, ``(grid,)`` or ``(grid, grid)``."""
        return (self.config.grid,) * self.config.dims

    def setup(self, stage: str | None = None) -> None:
        self.check_batch_size()
        if self._val is None:
            self._val = self.validation_set(self.train_grid)[0]

    def rank_batch(self, t: int) -> Tensor:
        """This rank's rows of global batch ``t``, rendered at the training grid (float32)."""
        rank, world = self.rank_and_world()
        per_rank = self.config.batch_size // world
        params = _rows(self.generative.batch_params(t), rank * per_rank, (rank + 1) * per_rank)
        return self.generative.render(params, self.train_grid).float()

    def validation_data(self) -> Tensor:
        assert self._val is not None, "call setup() first"
        return self._val

    # ---- ground truth at any resolution -------------------------------------------------------

    def true_concepts(self, grid: Grid, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(n_atoms, C, *grid)`` the true atoms at their canonical position, unit L2 norm.

        Args:
            grid: points per axis, ``(N,)`` or ``(H, W)`` (any resolution).
            dtype: the result's dtype (computed in float64).
        """
        return self.generative.family.atoms(self._check_grid(grid)).to(dtype)

    def validation_set(
        self, grid: Grid, *, noise: bool = True, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """The fixed validation samples rendered on ``grid``, with their true support.

        The samples are the same functions at every grid (the ones validated at the training
        grid), so errors at several resolutions are comparable.

        Args:
            grid: points per axis, ``(N,)`` or ``(H, W)`` (any resolution).
            noise: include the noise term (False: the clean signal ``sum_j a_j d_j(x - s_j)``).
            dtype: dtype of ``u`` (computed in float64).

        Returns:
            u: ``(val_samples, C, *grid)``.
            support: ``(val_samples, n_atoms)`` bool, which atoms are active in each sample.
        """
        grid = self._check_grid(grid)
        params = self.generative.val_params()
        step = self.config.val_batch_size  # render in chunks: float64 temporaries stay small
        u = torch.cat(
            [
                self.generative.render(_rows(params, i, i + step), grid, noise).to(dtype)
                for i in range(0, len(params.atoms), step)
            ]
        )
        return u, self.generative.support(params)

    def _check_grid(self, grid: Grid) -> Grid:
        grid = tuple(int(n) for n in grid)
        if len(grid) != self.config.dims or min(grid) < 1:
            raise ValueError(
                f"grid {grid} does not fit the {self.config.dims}-D domain of this data; pass "
                f"{self.config.dims} positive sizes, e.g. {self.train_grid}"
            )
        return grid

    @torch.no_grad()
    def reference_metrics(self, sae: torch.nn.Module) -> dict[str, float]:
        """Functional recovery at the training grid: ``mmcs``, ``recovered_frac``,
        ``support_precision``, ``support_recall``, ``utilization``.

        Uses ``sae.decoder.concept_functions(grid)`` (shift-aware matching when the decoder is
        ``convolutional``) and ``sae.encode_codes`` on the validation set. A concept is active in
        a sample when its code exceeds ``support_threshold`` (see
        :func:`sae_neural_operator.recovery.concept_support`). Point-wise ReLU concept maps are
        rarely exactly zero everywhere, so at the default 0 they count as active in every
        sample; with unit-norm decoder concepts a map's L1 mass estimates the amplitude of the
        atom it explains (true amplitudes are at least ``amplitude_min``), which makes a
        threshold such as ``0.1 * amplitude_min`` meaningful.

        Raises:
            TypeError: the SAE's decoder does not describe its concepts as functions.
        """
        decoder = sae.decoder
        if not hasattr(decoder, "concept_functions"):
            raise TypeError(
                f"decoder {type(decoder).__name__} has no concept_functions(grid); "
                "function_synthetic data needs a function decoder (sae_mlp, lifted, fno, "
                "lifted_fno, cnn)"
            )
        grid = self.train_grid
        learned = decoder.concept_functions(grid)
        recovery = functional_mmcs(
            self.true_concepts(grid, torch.float64),
            learned,
            shift_aware=bool(getattr(decoder, "convolutional", False)),
        )
        u, support = self.validation_set(grid)
        device = learned.device
        active = torch.cat(
            [
                concept_support(
                    sae.encode_codes(chunk.to(device)).dense(), self.config.support_threshold
                ).cpu()
                for chunk in u.split(self.config.val_batch_size)
            ]
        )
        precision, recall = support_precision_recall(active, support, recovery.assignment)
        return {
            "mmcs": recovery.mmcs,
            "recovered_frac": recovery.recovered_frac,
            "support_precision": precision,
            "support_recall": recall,
            "utilization": utilization(active),
        }
