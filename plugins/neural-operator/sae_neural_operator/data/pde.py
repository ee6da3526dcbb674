"""``pde_fields``: PDE input/solution fields as function batches, generated in torch or read.

Sources (``equation``):

- ``darcy``: 2-D Darcy flow, permeability ``a`` (input) and pressure ``u`` (solution), see
  :mod:`sae_neural_operator.data.darcy`;
- ``burgers``: 1-D viscous Burgers, ``u_0`` (input) and ``u(., T)`` (solution), see
  :mod:`sae_neural_operator.data.burgers`;
- ``navier_stokes``: 2-D vorticity, ``w_0`` (input) and ``w(., T)`` (solution), see
  :mod:`sae_neural_operator.data.navier_stokes`;
- ``file``: an existing dataset (``.pt`` dict of tensors or ``.h5``), see
  :mod:`sae_neural_operator.data.loaders`.

``field`` picks what the SAE sees: ``input``, ``solution``, or ``both`` as two channels.

**Resolutions.** Generated samples are solved once at ``solve_resolution`` (default: the largest
requested) and subsampled (``[::r]`` per axis, points ``i / N`` nest) to the training
``resolution`` and to each of ``eval_resolutions``, so every resolution shows the same
underlying sample. The training set is kept at ``resolution``; the validation set at every
resolution (:meth:`PDEFieldDataModule.validation_set`). Sample ``i`` of a split depends only on
``(seed, split, i)``, so adding samples keeps the earlier ones.

**Normalisation.** ``normalize: unit`` multiplies each channel by one factor so that its mean
square over the training set is 1 (the same factors at every resolution and for validation),
kept in :attr:`PDEFieldDataModule.channel_scale` and the checkpoint. The SAE trains on normalised
fields; its export records the factors and applies them itself, so the exported SAE takes raw
fields (:meth:`~sae_lightning.sae.SparseAutoencoder.set_input_scale`).

**Caching.** With ``cache_dir`` set, generated fields are stored there with a manifest of every
generation parameter (:mod:`sae_neural_operator.data.cache`), reused while the parameters match
and regenerated, with a message naming what changed, when they differ.

**Batches.** An endless stream: global batch ``t`` holds positions ``[t B, (t + 1) B)`` of the
sequence whose epoch ``e`` visits the training samples in a seeded permutation of its own, so
batch ``t`` is a pure function of ``(seed, t)``; a resumed run continues exactly, and each DDP
rank takes its own contiguous slice of every global batch (disjoint across ranks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from sae_lightning.config import PluginConfig
from sae_lightning.data.stream import IndexedDataModule, seeded_generator
from sae_lightning.data.validation import BatchValidator, NonFinitePolicy
from sae_lightning.errors import ConfigError
from sae_neural_operator.data import cache
from sae_neural_operator.data.burgers import Burgers, BurgersConfig
from sae_neural_operator.data.darcy import Darcy, DarcyConfig
from sae_neural_operator.data.functions import Grid
from sae_neural_operator.data.generator import PDEGenerator
from sae_neural_operator.data.loaders import load_fields
from sae_neural_operator.data.navier_stokes import NavierStokes, NavierStokesConfig

_TRAIN, _VAL, _ORDER = 20, 21, 22  # stream ids for seeded_generator
Equation = Literal["darcy", "burgers", "navier_stokes", "file"]
Split = dict[int, dict[str, Tensor]]
"""``{resolution: {"input": (n, 1, *grid), "solution": (n, 1, *grid)}}``."""


class PDEFieldConfig(PluginConfig):
    """``pde_fields``: which PDE (or file), which field, how many samples at which grids."""

    equation: Equation = Field("darcy", description="darcy, burgers, navier_stokes, or file")
    darcy: DarcyConfig = Field(default_factory=DarcyConfig, description="Darcy parameters")
    burgers: BurgersConfig = Field(default_factory=BurgersConfig, description="Burgers parameters")
    navier_stokes: NavierStokesConfig = Field(
        default_factory=NavierStokesConfig, description="Navier-Stokes parameters"
    )
    field: Literal["input", "solution", "both"] = Field(
        "solution", description="what the SAE sees: the input, the solution, or both as channels"
    )
    n_samples: int = Field(256, gt=0, description="training samples to generate")
    val_samples: int = Field(64, gt=0, description="validation samples to generate")
    resolution: int = Field(64, ge=4, description="training grid points per axis")
    eval_resolutions: list[int] = Field(
        default_factory=list, description="further validation resolutions (points per axis)"
    )
    solve_resolution: int | None = Field(
        None, ge=4, description="grid the PDE is solved on (default: the largest resolution)"
    )
    generation_batch: int = Field(16, gt=0, description="samples solved together")
    normalize: Literal["none", "unit"] = Field(
        "unit", description="unit: scale each channel to mean square 1 over the training set"
    )
    cache_dir: str | None = Field(
        None, description="folder caching generated data (reused while parameters match)"
    )
    verify_checksums: bool = Field(True, description="check cached files' sha256 before reuse")
    path: str | None = Field(None, description="file: the dataset (.pt dict or .h5)")
    val_path: str | None = Field(
        None, description="file: a validation file (default: the last val_samples of path)"
    )
    val_paths: dict[int, str] = Field(
        default_factory=dict,
        description="file: one validation file per resolution, {resolution: path}; a "
        "resolution without one is subsampled from val_path (or path)",
    )
    input_key: str = Field("x", description="file: key of the input field")
    solution_key: str = Field("y", description="file: key of the solution field")
    dims: Literal[1, 2] | None = Field(
        None, description="file: grid dimension (needed to read [N, C, L] arrays)"
    )
    channels_last: bool = Field(False, description="file: arrays store channels last")
    batch_size: int = Field(32, gt=0, description="functions per global batch (split across ranks)")
    val_batch_size: int = Field(64, gt=0, description="validation batch size")
    seed: int | None = Field(None, ge=0, description="data seed; default the recipe's seed")
    nonfinite: NonFinitePolicy = Field(
        "fail", description="samples with NaN/Inf: fail the run, or drop them and count them"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PDEFieldConfig:
        if self.equation == "file":
            if self.path is None:
                raise ValueError("equation: file needs path (a .pt or .h5 dataset)")
            extra = sorted(set(self.val_paths) - set(self.resolutions))
            if extra:
                raise ValueError(
                    f"val_paths has files for resolutions {extra} that are neither resolution "
                    f"nor in eval_resolutions {self.eval_resolutions}; add them there"
                )
            return self
        if self.path is not None or self.val_path is not None or self.val_paths:
            raise ValueError(f"path/val_path/val_paths are for equation: file, not {self.equation}")
        solve = self.solve_at
        for n in self.resolutions:
            if solve % n:
                raise ValueError(
                    f"resolution {n} does not divide solve_resolution={solve}; choose "
                    "resolutions that divide it (e.g. powers of two)"
                )
        return self

    @property
    def resolutions(self) -> list[int]:
        """The training resolution, then the further validation resolutions."""
        return list(dict.fromkeys([self.resolution, *self.eval_resolutions]))

    @property
    def solve_at(self) -> int:
        return self.solve_resolution or max(self.resolutions)


def make_generator(config: PDEFieldConfig) -> PDEGenerator:
    """The generator of ``config.equation`` (not ``file``)."""
    if config.equation == "darcy":
        return Darcy(config.darcy)
    if config.equation == "burgers":
        return Burgers(config.burgers)
    return NavierStokes(config.navier_stokes)


def generation_identity(config: PDEFieldConfig, seed: int) -> dict[str, Any]:
    """What determines the generated data (the cache identity); not the field choice or scale."""
    params = getattr(config, config.equation).model_dump()
    return {
        "equation": config.equation,
        config.equation: params,
        "seed": seed,
        "n_samples": config.n_samples,
        "val_samples": config.val_samples,
        "resolutions": sorted(config.resolutions),
        "train_resolution": config.resolution,
        "solve_resolution": config.solve_at,
    }


def _subsample(u: Tensor, stride: int) -> Tensor:
    index = (slice(None),) * 2 + (slice(None, None, stride),) * (u.ndim - 2)
    return u[index]


def generate_split(
    config: PDEFieldConfig,
    seed: int,
    split: int,
    n: int,
    resolutions: list[int],
    progress: Any = None,
) -> Split:
    """Solve samples ``0 .. n - 1`` of ``split`` at the solve resolution and subsample them.

    Args:
        config: the DataModule's parameters (a generated equation).
        seed: the data seed.
        split: stream id of the split (training or validation).
        n: samples.
        resolutions: the resolutions to keep.
        progress: ``(rich Progress, task id)`` to advance per solved chunk, or None.

    Returns:
        ``{resolution: {"input": (n, 1, *grid), "solution": (n, 1, *grid)}}`` float32.
    """
    generator = make_generator(config)
    solve = config.solve_at
    parts: dict[int, dict[str, list[Tensor]]] = {
        r: {name: [] for name in generator.fields} for r in resolutions
    }
    for start in range(0, n, config.generation_batch):
        stop = min(n, start + config.generation_batch)
        noise = torch.stack(
            [generator.noise(seeded_generator(seed, split, i)) for i in range(start, stop)]
        )
        fields = dict(zip(generator.fields, generator.solve(noise, solve), strict=True))
        for r in resolutions:
            for name, value in fields.items():
                parts[r][name].append(_subsample(value[:, None], solve // r).float())
        if progress is not None:
            progress[0].advance(progress[1], stop - start)
    out = {r: {k: torch.cat(v) for k, v in d.items()} for r, d in parts.items()}
    for r, d in out.items():
        for name, value in d.items():
            if not torch.isfinite(value).all():
                raise ConfigError(
                    f"data.{config.equation}",
                    f"the generated {name} field at resolution {r} has NaN/Inf values",
                    "lower dt or check the parameters",
                )
    return out


def _file_resolution(fields: dict[str, Tensor], r: int, path: str, field: str) -> dict[str, Tensor]:
    """Subsample the file's grid ``N`` to ``r`` points per axis: stride ``N / r`` (periodic
    grids) or ``(N - 1) / (r - 1)`` (grids with both end points, e.g. 421 -> 85).

    Raises:
        ConfigError: naming ``field``, the recipe entry that asked for ``r``.
    """
    n = next(iter(fields.values())).shape[2]
    if n < r:
        raise ConfigError(
            field,
            f"asks for {r} points per axis, but {path} holds only {n}",
            f"give a file with at least {r} points per axis, or use a resolution <= {n}",
        )
    if n % r == 0:
        stride = n // r
    elif r > 1 and (n - 1) % (r - 1) == 0:
        stride = (n - 1) // (r - 1)
    else:
        raise ConfigError(
            field,
            f"{r} points per axis cannot be subsampled from the {n} of {path}",
            f"use a resolution dividing {n} (or {n - 1} plus one)",
        )
    return {k: _subsample(v, stride).float() for k, v in fields.items()}


class PDEFieldDataModule(IndexedDataModule):
    """PDE fields (Darcy, Burgers, Navier-Stokes, or a .pt/.h5 file) as function batches.

    Batches are ``(B, C, *grid)`` float32 at the training resolution, ``C`` = 1 (``input`` or
    ``solution``) or 2 (``both``).
    """

    Config = PDEFieldConfig

    def __init__(self, config: PDEFieldConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = config.seed if config.seed is not None else seed
        self._resumed: dict[str, Any] | None = None
        self.channel_scale: Tensor | None = None
        """``(C,)`` float64 factors the channels were multiplied by (after ``setup``); the export
        records them in the SAE, which then takes raw fields."""
        self._train: Tensor | None = None
        self._val: dict[Grid, Tensor] = {}
        self._file: dict[str, dict[int, dict[str, Tensor]]] | None = None
        self._files: cache.Files | None = None

    # ---- shapes ---------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Channels of every function: 2 for ``field: both``, else 1 (or the file's channels)."""
        if self.config.equation != "file":
            return 2 if self.config.field == "both" else 1
        train = self._file_splits()["train"][self.config.resolution]
        return sum(train[k].shape[1] for k in self._field_names())

    @property
    def dims(self) -> int:
        if self.config.equation == "file":
            train = self._file_splits()["train"][self.config.resolution]
            return next(iter(train.values())).ndim - 2
        return make_generator(self.config).dims

    @property
    def train_grid(self) -> Grid:
        """The training grid, ``(N,)`` or ``(N, N)``."""
        if self.config.equation == "file":
            train = self._file_splits()["train"][self.config.resolution]
            return tuple(next(iter(train.values())).shape[2:])
        return (self.config.resolution,) * self.dims

    def _field_names(self) -> list[str]:
        return ["input", "solution"] if self.config.field == "both" else [self.config.field]

    # ---- data -----------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        from rich.console import Console

        Console(stderr=True).print(f"pde_fields: {message}", soft_wrap=True)

    def _generate(self) -> cache.Files:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        c = self.config
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} samples"),
            TimeRemainingColumn(),
        )
        files: cache.Files = {}
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            for name, split, n, res in (
                ("train", _TRAIN, c.n_samples, [c.resolution]),
                ("val", _VAL, c.val_samples, c.resolutions),
            ):
                task = progress.add_task(
                    f"solving {c.equation} ({name}, {c.solve_at} points per axis)", total=n
                )
                for r, fields in generate_split(
                    c, self.seed, split, n, res, (progress, task)
                ).items():
                    files[f"{name}_{r}"] = fields
        return files

    def _generated_files(self) -> cache.Files:
        """The generated fields, from the cache when there is one (once per instance)."""
        c = self.config
        if self._files is None:
            if c.cache_dir is None:
                self._files = self._generate()
            else:
                self._files = cache.load_or_generate(
                    Path(c.cache_dir).expanduser(),
                    generation_identity(c, self.seed),
                    self._generate,
                    verify=c.verify_checksums,
                    log=self._log,
                )
        return self._files

    def _file_splits(self) -> dict[str, dict[int, dict[str, Tensor]]]:
        """``{"train"|"val": {resolution: fields}}`` read from ``path`` (and ``val_path``)."""
        if self._file is None:
            c = self.config
            assert c.path is not None
            all_keys = {"input": c.input_key, "solution": c.solution_key}
            keys = {name: all_keys[name] for name in self._field_names()}
            kwargs = {"dims": c.dims, "channels_last": c.channels_last}
            train = load_fields(c.path, keys, **kwargs)
            if c.val_path is not None:
                val = load_fields(c.val_path, keys, **kwargs)
            else:
                n = next(iter(train.values())).shape[0]
                if n <= c.val_samples:
                    raise ConfigError(
                        "data.val_samples",
                        f"is {c.val_samples}, but {c.path} holds only {n} samples",
                        "lower val_samples or give a val_path",
                    )
                val = {k: v[n - c.val_samples :] for k, v in train.items()}
                train = {k: v[: n - c.val_samples] for k, v in train.items()}
            train_field = "data.resolution"
            self._file = {
                "train": {c.resolution: _file_resolution(train, c.resolution, c.path, train_field)},
                "val": {},
            }
            for r in c.resolutions:
                field = "data.resolution" if r == c.resolution else "data.eval_resolutions"
                if r in c.val_paths:
                    own = load_fields(c.val_paths[r], keys, **kwargs)
                    fields = _file_resolution(own, r, c.val_paths[r], f"data.val_paths.{r}")
                else:
                    fields = _file_resolution(val, r, c.val_path or c.path, field)
                self._file["val"][r] = fields
        return self._file

    def _load(self) -> tuple[Tensor, dict[int, Tensor]]:
        """``(train (n, C, *grid), {resolution: val})`` unnormalised, fields selected."""
        c = self.config
        names = self._field_names()
        if c.equation == "file":
            splits = self._file_splits()
            train_fields = splits["train"][c.resolution]
            val_fields = splits["val"]
        else:
            files = self._generated_files()
            train_fields = files[f"train_{c.resolution}"]
            val_fields = {r: files[f"val_{r}"] for r in c.resolutions}
        train = torch.cat([train_fields[k] for k in names], dim=1)
        val = {r: torch.cat([f[k] for k in names], dim=1) for r, f in val_fields.items()}
        return train, val

    def prepare_data(self) -> None:
        """Generate and cache the data once per machine (Lightning calls this on local rank 0)."""
        if self.config.cache_dir is not None and self.config.equation != "file":
            self._generated_files()

    def setup(self, stage: str | None = None) -> None:
        c = self.config
        self.check_batch_size()
        if self._train is not None:
            return
        train, val = self._load()
        self._files = None  # the selected fields below are all that is kept
        if c.normalize == "unit":
            ms = train.double().pow(2).transpose(0, 1).flatten(1).mean(dim=1)  # (C,)
            self.channel_scale = ms.clamp_min(1e-30).rsqrt()
        else:
            self.channel_scale = torch.ones(train.shape[1], dtype=torch.float64)
        resumed = self._resumed
        if resumed is not None and "channel_scale" in resumed:
            # recomputed identically from the same data, but taking the saved value keeps a
            # resumed run exact where float rounding differs (another thread count)
            self.channel_scale = torch.tensor(resumed["channel_scale"], dtype=torch.float64)
        shape = (1, -1) + (1,) * (train.ndim - 2)
        factor = self.channel_scale.float().reshape(shape)
        self._train = train * factor
        self._val = {tuple(v.shape[2:]): v * factor for v in val.values()}
        self.validator = BatchValidator(self.d_in, c.nonfinite, source=f"pde_fields ({c.equation})")
        if resumed is not None:
            self.validator.load_state_dict(resumed)

    def batch_indices(self, t: int) -> Tensor:
        """Training-sample ids of global batch ``t`` (see the module docstring)."""
        assert self._train is not None, "call setup() first"
        n, b = len(self._train), self.config.batch_size
        position = t * b + torch.arange(b)
        epoch, within = position // n, position % n
        out = torch.empty_like(position)
        for e in epoch.unique().tolist():
            order = torch.randperm(n, generator=seeded_generator(self.seed, _ORDER, e))
            sel = epoch == e
            out[sel] = order[within[sel]]
        return out

    def rank_batch(self, t: int) -> Tensor:
        """This rank's contiguous slice of global batch ``t``."""
        assert self._train is not None, "call setup() first"
        rank, world = self.rank_and_world()
        per_rank = self.config.batch_size // world
        ids = self.batch_indices(t)[rank * per_rank : (rank + 1) * per_rank]
        return self._train[ids]

    def validation_data(self) -> Tensor:
        return self._val[self.train_grid]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.channel_scale is not None:
            state["channel_scale"] = self.channel_scale.tolist()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._resumed = dict(state_dict)  # setup() builds the validator and may need the scale

    # ---- other resolutions ----------------------------------------------------------------------

    @property
    def validation_grids(self) -> list[Grid]:
        """The grids :meth:`validation_set` serves (after ``setup``)."""
        return sorted(self._val, key=math.prod)

    def validation_set(self, grid: Grid) -> tuple[Tensor, None]:
        """The validation samples at ``grid``, normalised like the training data.

        The same underlying samples at every grid (solved once, subsampled). There is no true
        support for PDE data, so the second item is None (the signature matches
        ``function_synthetic``'s).

        Raises:
            ValueError: ``grid`` is not one of :attr:`validation_grids` (add its size to
                ``data.eval_resolutions``).
        """
        if not self._val:
            self.setup()
        grid = tuple(int(n) for n in grid)
        if grid not in self._val:
            raise ValueError(
                f"pde_fields has no validation data at grid {grid}; it holds "
                f"{self.validation_grids}; add {grid[0]} to data.eval_resolutions"
            )
        return self._val[grid], None
