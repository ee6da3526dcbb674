"""A small 2-D Fourier neural operator (Li et al. 2021), the project's own, to interpret with SAEs.

``u = Q(v_T)``, ``v_{t+1} = act(W_t v_t + K_t v_t)``, ``v_0 = P(a, x, y)``: a point-wise lifting
``P`` of the input function and (optionally) the grid coordinates, ``T`` Fourier blocks whose
``K_t`` is a spectral convolution keeping ``modes`` Fourier modes per axis, and a point-wise
two-layer projection ``Q``. Every block is a module named ``blocks.<t>`` whose output is the
function-valued activation ``(batch, width, H, W)`` that :mod:`sae_neural_operator.activations`
hooks. Weights live on Fourier modes and 1x1 maps only, so one model runs at any grid with at
least ``2 * modes`` points per axis (zero-shot super-resolution).

Inputs and outputs are normalised by scalars stored in the model (not per-grid-point statistics,
which would tie the model to one resolution), so ``model(a)`` maps raw coefficients to raw
solutions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sae_lightning.atomic import atomic_path, atomic_write_text
from sae_neural_operator.spectral import SpectralConv

WEIGHTS_FILE = "fno.safetensors"
CONFIG_FILE = "fno_config.json"
FORMAT = "sae-neural-operator/fno2d"

Activation = Literal["gelu", "relu", "tanh"]
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


@dataclass(frozen=True)
class FNOConfig:
    """Architecture of :class:`FNO2d` (everything needed to rebuild it before loading weights)."""

    in_channels: int = 1
    """Channels of the input function (1 for a Darcy coefficient field)."""
    out_channels: int = 1
    """Channels of the output function (1 for a Darcy solution)."""
    width: int = 32
    """Channels of the hidden functions ``v_t``: the width of the hooked activations."""
    modes: int = 8
    """Fourier modes kept per axis by each spectral convolution."""
    n_layers: int = 4
    """Number of Fourier blocks ``T``."""
    projection: int = 64
    """Hidden channels of the two-layer point-wise projection ``Q``."""
    positional: bool = True
    """Append the grid coordinates ``(x, y)`` in ``[0, 1)`` to the input (as Li et al. do)."""
    activation: Activation = "gelu"
    """Nonlinearity after every Fourier block and inside ``Q``."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "width", "modes", "n_layers", "projection"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FNOConfig.{name} must be positive, got {getattr(self, name)}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"FNOConfig.activation must be one of {sorted(_ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FNOConfig:
        """Rebuild from :func:`dataclasses.asdict` output, rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FNOConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def grid_coordinates(batch: int, grid: tuple[int, int], like: Tensor) -> Tensor:
    """``(batch, 2, H, W)`` coordinates ``(i / H, j / W)`` of the periodic grid points."""
    h, w = grid
    ys = torch.arange(h, dtype=like.dtype, device=like.device) / h
    xs = torch.arange(w, dtype=like.dtype, device=like.device) / w
    mesh = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W)
    return mesh.expand(batch, -1, -1, -1)


class FourierBlock(nn.Module):
    """``v -> act(W v + K v)``: a 1x1 map plus a spectral convolution, then the nonlinearity."""

    def __init__(self, width: int, modes: int, activation: Activation) -> None:
        super().__init__()
        self.spectral = SpectralConv(width, width, (modes, modes))
        self.pointwise = nn.Conv2d(width, width, kernel_size=1)
        self.act = _ACTIVATIONS[activation]

    def forward(self, v: Tensor) -> Tensor:
        """``(B, width, H, W) -> (B, width, H, W)``."""
        return self.act(self.pointwise(v) + self.spectral(v))


class FNO2d(nn.Module):
    """The FNO: lifting, ``n_layers`` Fourier blocks (``blocks.<t>``), projection.

    Args:
        config: the architecture.

    Example::

        model = FNO2d(FNOConfig(width=16, modes=6, n_layers=2))
        u = model(torch.rand(4, 1, 32, 32))   # (4, 1, 32, 32); also runs at 64 x 64
    """

    def __init__(self, config: FNOConfig) -> None:
        super().__init__()
        self.config = config
        lift_in = config.in_channels + (2 if config.positional else 0)
        self.lifting = nn.Conv2d(lift_in, config.width, kernel_size=1)
        self.blocks = nn.ModuleList(
            FourierBlock(config.width, config.modes, config.activation)
            for _ in range(config.n_layers)
        )
        self.projection = nn.Sequential(
            nn.Conv2d(config.width, config.projection, kernel_size=1),
            _Act(config.activation),
            nn.Conv2d(config.projection, config.out_channels, kernel_size=1),
        )
        # Scalar normalisation of inputs and outputs (set from the training data).
        self.register_buffer("in_mean", torch.zeros(()))
        self.register_buffer("in_std", torch.ones(()))
        self.register_buffer("out_mean", torch.zeros(()))
        self.register_buffer("out_std", torch.ones(()))

    def set_normalization(self, a: Tensor, u: Tensor) -> None:
        """Store scalar mean/std of training inputs ``a`` and outputs ``u``."""
        with torch.no_grad():
            self.in_mean.fill_(float(a.mean()))
            self.in_std.fill_(float(a.std().clamp_min(1e-12)))
            self.out_mean.fill_(float(u.mean()))
            self.out_std.fill_(float(u.std().clamp_min(1e-12)))

    def lift(self, a: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, width, H, W)``: ``v_0``."""
        if a.ndim != 4 or a.shape[1] != self.config.in_channels:
            raise ValueError(
                f"FNO2d expects inputs (batch, {self.config.in_channels}, H, W), "
                f"got {tuple(a.shape)}"
            )
        x = (a - self.in_mean) / self.in_std
        if self.config.positional:
            x = torch.cat([x, grid_coordinates(a.shape[0], (a.shape[2], a.shape[3]), x)], dim=1)
        return self.lifting(x)

    def forward(self, a: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, out_channels, H, W)``."""
        v = self.lift(a)
        for block in self.blocks:
            v = block(v)
        return self.projection(v) * self.out_std + self.out_mean


class _Act(nn.Module):
    def __init__(self, activation: Activation) -> None:
        super().__init__()
        self.fn = _ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def save_fno(model: FNO2d, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``fno.safetensors`` and ``fno_config.json`` into ``directory``, each atomically.

    Args:
        model: the trained model.
        directory: created if missing.
        extra: JSON-able facts stored beside the architecture (data settings, test errors).

    Returns:
        ``directory`` as a Path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    record = {"format": FORMAT, "model": asdict(model.config), **(extra or {})}
    atomic_write_text(out / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
    return out


def read_fno_record(directory: str | Path) -> dict[str, Any]:
    """The JSON written by :func:`save_fno` (architecture under ``model``, plus extras).

    Raises:
        FileNotFoundError: no ``fno_config.json`` in ``directory``, with how to make one.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: expected a directory written by `sae-no-train-fno --out DIR`"
        )
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r} is not {FORMAT!r}")
    return record


def load_fno(directory: str | Path, device: str | torch.device = "cpu") -> FNO2d:
    """The model saved by :func:`save_fno` in ``directory``, in eval mode.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files are not an FNO2d of this package, or the weights do not fit.
    """
    record = read_fno_record(directory)
    model = FNO2d(FNOConfig.from_dict(record["model"]))
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found beside {CONFIG_FILE}")
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()
