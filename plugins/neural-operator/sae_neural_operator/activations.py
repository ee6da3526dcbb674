"""Function-valued activations of a trained neural operator: SAE data for interpreting an FNO.

A forward hook on one module of the operator (by module path, e.g. ``blocks.1``: the output of the
second Fourier block of :class:`~sae_neural_operator.fno_model.FNO2d`) records its output
``(batch, width, H, W)`` while the operator runs on Darcy permeability fields ``a(x)``. Each
activation is a ``width``-channel function on the grid, so an SAE-FNO trained on them finds
concepts that are functions in the operator's hidden space ("mechanistic interpretability of
neural operators"); ``d_in`` is the hooked channel count.

Inputs are drawn from the Darcy distribution the FNO was trained on (read from its
``fno_config.json``; override with ``darcy:``), from random streams disjoint from the FNO's own
training and test data. Training batch ``t`` depends only on ``(seed, t)``, so a resumed run sees
the batches an uninterrupted run would (``state_dict`` stores the number consumed), and each DDP
rank runs the operator only on its slice. The permeability is a continuous field sampled on the
grid, so :meth:`FNOActivationsDataModule.validation_set` renders the *same* validation inputs at
any resolution and returns the operator's activations there (for ``resolution_transfer``).

Two backends:

- ``project`` (default): a directory written by ``sae-no-train-fno --out DIR``.
- ``neuralop``: a neuraloperator model saved with ``model.save_checkpoint(folder, name)``, loaded
  by ``FNO.from_checkpoint``; needs the ``neuraloperator`` package. Its blocks are one module,
  ``fno_blocks``, called once per layer: pick the layer with ``hook_call``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.config import PluginConfig
from sae_lightning.data.stream import IndexedDataModule, seeded_generator
from sae_lightning.data.validation import BatchValidator, NonFinitePolicy
from sae_lightning.errors import ConfigError
from sae_lightning.lm.hooks import StopForward, first_tensor, resolve_hooks
from sae_neural_operator.data.darcy import Darcy, DarcyConfig

# seeded_generator stream ids; sae-no-train-fno uses 0 and 1 (one sample per key), so these
# streams never repeat the FNO's training or test inputs.
_TRAIN, _VAL = 10, 11


class FNOActivationsConfig(PluginConfig):
    fno_path: str = Field(
        description="backend project: the directory written by `sae-no-train-fno --out DIR`; "
        "backend neuralop: the folder given to model.save_checkpoint(folder, name)"
    )
    backend: Literal["project", "neuralop"] = Field(
        "project", description="project: this package's FNO2d; neuralop: a neuraloperator model"
    )
    neuralop_name: str = Field(
        "model", description="backend neuralop: the save_name given to model.save_checkpoint"
    )
    hook: str = Field(
        "blocks.1",
        description="module whose output is recorded, a path from model.named_modules() "
        "(project: blocks.0 .. blocks.<n_layers-1>; neuralop: fno_blocks)",
    )
    hook_call: int = Field(
        0,
        ge=0,
        description="which call of the hooked module to record (neuralop's fno_blocks runs "
        "once per layer: 1 is the second block)",
    )
    resolution: int | None = Field(
        None, ge=4, description="grid points per axis; default the FNO's training resolution"
    )
    darcy: dict[str, Any] | None = Field(
        None,
        description="Darcy input distribution (DarcyConfig fields); default the one the FNO "
        "was trained on (project backend), else the DarcyConfig defaults",
    )
    batch_size: int = Field(16, gt=0, description="global batch size (split across ranks)")
    val_samples: int = Field(64, gt=0, description="size of the fixed validation set")
    val_batch_size: int = Field(32, gt=0, description="validation batch size")
    device: str = Field(
        "cpu", description="device the operator runs on (e.g. cpu, cuda); batches stay there"
    )
    seed: int | None = Field(None, ge=0, description="data seed; default the recipe's seed")
    nonfinite: NonFinitePolicy = Field(
        "fail", description="samples with NaN/Inf: fail the run, or drop them and count them"
    )


# ---- loading the operator -------------------------------------------------------------------


def load_project_fno(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """``(FNO2d, its fno_config.json record)``.

    Raises:
        ConfigError: naming ``fno_path`` when the directory holds no saved FNO.
    """
    from sae_neural_operator.fno_model import load_fno, read_fno_record

    try:
        return load_fno(path), read_fno_record(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(
            "fno_path", str(err), "train one with `sae-no-train-fno --out DIR`"
        ) from None


def load_neuralop_fno(folder: str, name: str) -> nn.Module:
    """A neuraloperator model from ``model.save_checkpoint(folder, name)``.

    ``from_checkpoint`` unpickles the saved constructor arguments: load only checkpoints you
    trust.

    Raises:
        ConfigError: naming ``backend`` when neuraloperator is not installed, or ``fno_path``
            when the checkpoint files are missing.
    """
    try:
        from neuralop.models import FNO  # optional: only this backend needs it
    except ImportError as err:
        raise ConfigError(
            "backend",
            f"is 'neuralop' but the neuraloperator package cannot be imported ({err})",
            "pip install neuraloperator, or set backend: project with fno_path pointing to a "
            "directory from `sae-no-train-fno`",
        ) from None
    state = Path(folder) / f"{name}_state_dict.pt"
    if not state.is_file():
        raise ConfigError(
            "fno_path",
            f"{state} not found",
            "pass the folder and neuralop_name given to model.save_checkpoint(folder, name)",
        )
    return FNO.from_checkpoint(folder, name, map_location="cpu")


# ---- recording activations ------------------------------------------------------------------


@torch.no_grad()
def record(model: nn.Module, module_path: str, call: int, inputs: Tensor) -> Tensor:
    """Output of ``module_path``'s ``call``-th call while ``model(inputs)`` runs.

    The forward pass stops right after it (:class:`StopForward`), so later layers never run.

    Raises:
        RuntimeError: the module was called fewer than ``call + 1`` times.
    """
    module = dict(model.named_modules())[module_path]
    seen: list[Tensor | None] = []

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        seen.append(first_tensor(out) if len(seen) == call else None)
        if len(seen) > call:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        with contextlib.suppress(StopForward):
            model(inputs)
    finally:
        handle.remove()
    if len(seen) <= call:
        raise RuntimeError(
            f"module {module_path!r} ran {len(seen)} time(s) in the forward pass, so "
            f"hook_call {call} never happened; use hook_call < {len(seen)}"
        )
    out = seen[call]
    assert out is not None
    return out


class FNOActivationsDataModule(IndexedDataModule):
    """Hooked FNO activations (batch, width, H, W) on Darcy inputs (see the module doc).

    Raises:
        ConfigError: the operator cannot be loaded, the hook names no module, or the hooked
            output is not a 2-D function batch.
    """

    Config = FNOActivationsConfig
    split_validation = False  # every rank validates the whole set

    def __init__(self, config: FNOActivationsConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = config.seed if config.seed is not None else seed
        saved: dict[str, Any] = {}
        if config.backend == "project":
            self.model, saved = load_project_fno(config.fno_path)
        else:
            self.model = load_neuralop_fno(config.fno_path, config.neuralop_name)
        self.model = self.model.to(config.device).eval().requires_grad_(False)
        self.hook = self._resolve_hook()
        darcy = config.darcy if config.darcy is not None else saved.get("darcy", {})
        try:
            self.darcy = Darcy(DarcyConfig.model_validate(darcy))
        except ValueError as err:
            raise ConfigError("darcy", str(err), "use DarcyConfig fields") from None
        trained_at = saved.get("training", {}).get("resolution")
        self.resolution = int(config.resolution or trained_at or 32)
        try:
            probe = self.activations(self._render(self._validation_noise()[:1], self.resolution))
        except RuntimeError as err:
            raise ConfigError("hook_call", str(err)) from None
        except ValueError as err:  # e.g. a grid too coarse for the operator's Fourier modes
            raise ConfigError("resolution", f"is {self.resolution}: {err}") from None
        if probe.ndim != 4:
            raise ConfigError(
                "hook",
                f"{config.hook!r} outputs shape {tuple(probe.shape)}, not a 2-D function batch "
                "(batch, channels, H, W)",
                "hook a Fourier block (project: blocks.<i>; neuralop: fno_blocks)",
            )
        self._d_in = int(probe.shape[1])
        self.validator = BatchValidator(self._d_in, config.nonfinite, source="fno activations")
        self._val: Tensor | None = None

    def _resolve_hook(self) -> str:
        found = resolve_hooks(self.model, self.config.hook, field="hook")
        if len(found) != 1:
            raise ConfigError(
                "hook",
                f"{self.config.hook!r} matches {len(found)} modules ({', '.join(found[:6])})",
                "name exactly one module, e.g. blocks.1",
            )
        return found[0]

    @property
    def d_in(self) -> int:
        """Channels of the hooked activation (the FNO's width for a Fourier block)."""
        return self._d_in

    @property
    def train_grid(self) -> tuple[int, int]:
        """The grid of the training and validation batches."""
        return (self.resolution, self.resolution)

    # ---- data -----------------------------------------------------------------------------

    def _noise(self, generator: torch.Generator, n: int) -> Tensor:
        return torch.stack([self.darcy.noise(generator) for _ in range(n)])  # (n, K, K)

    def _render(self, xi: Tensor, n: int) -> Tensor:
        """``(B, 1, n, n)`` float32 permeability of noise ``xi`` on the ``n x n`` grid."""
        return self.darcy.coefficient(xi, n)[:, None, :n, :n].float()

    @torch.no_grad()
    def activations(self, a: Tensor) -> Tensor:
        """Hooked activations ``(B, C, H, W)`` of permeabilities ``a (B, 1, H, W)`` (float32)."""
        a = a.to(self.config.device)
        return record(self.model, self.hook, self.config.hook_call, a).float()

    def batch_inputs(self, t: int, rank: int = 0, world: int = 1) -> Tensor:
        """This rank's slice of training batch ``t``'s permeabilities ``(B, 1, N, N)``:
        identical for the same seed and ``t``, whatever ran before."""
        xi = self._noise(seeded_generator(self.seed, _TRAIN, t), self.config.batch_size)
        per_rank = self.config.batch_size // world
        return self._render(xi[rank * per_rank : (rank + 1) * per_rank], self.resolution)

    def batch(self, t: int, rank: int = 0, world: int = 1) -> Tensor:
        """This rank's slice of training batch ``t``: the activations of :meth:`batch_inputs`."""
        return self.activations(self.batch_inputs(t, rank, world))

    def _validation_noise(self) -> Tensor:
        return self._noise(seeded_generator(self.seed, _VAL), self.config.val_samples)

    def validation_set(self, grid: tuple[int, ...]) -> tuple[Tensor, None]:
        """The validation inputs rendered on ``grid`` and their activations there.

        Returns:
            ``(activations (val_samples, C, H, W), None)`` (no ground-truth support).

        Raises:
            ValueError: ``grid`` is not square 2-D, or the operator cannot run on it.
        """
        grid = tuple(int(n) for n in grid)
        if len(grid) != 2 or grid[0] != grid[1]:
            raise ValueError(f"fno_activations renders square 2-D grids (N, N), got {grid}")
        if grid == self.train_grid and self._val is not None:
            return self._val, None
        a = self._render(self._validation_noise(), grid[0])
        acts = [self.activations(chunk) for chunk in a.split(self.config.val_batch_size)]
        return torch.cat(acts), None

    def rank_batch(self, t: int) -> Tensor:
        """This rank's slice of training batch ``t`` (:meth:`batch` for this process)."""
        return self.batch(t, *self.rank_and_world())

    def setup(self, stage: str | None = None) -> None:
        self.check_batch_size()
        if self._val is None:
            self._val = self.validation_set(self.train_grid)[0]

    def validation_data(self) -> Tensor:
        if self._val is None:
            self.setup("validate")
        assert self._val is not None
        return self._val
