"""Read existing neural-operator datasets: ``.pt`` dicts of tensors and ``.h5`` files.

Supported layouts per field (``N`` samples): ``[N, H, W]`` (one channel, 2-D), ``[N, C, H, W]``,
``[N, L]`` (one channel, 1-D) and ``[N, C, L]`` only when ``dims=1`` is given (a 3-D array is
otherwise read as ``[N, H, W]``). ``channels_last`` reads ``[N, H, W, C]`` / ``[N, L, C]``
(PDEBench-style) instead. Every field comes back as ``(N, C, *grid)`` float64.

``.pt`` files are read with ``torch.load(weights_only=True)`` (no code runs), and must hold a
dict whose entries are tensors, e.g. neuraloperator's ``darcy_train_16.pt`` (keys ``x``, ``y``).
``.h5``/``.hdf5`` files are read with h5py, the dataset names given per field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sae_lightning.errors import SaeLightningError

PT_SUFFIXES = (".pt", ".pth")
H5_SUFFIXES = (".h5", ".hdf5")


class DatasetFileError(SaeLightningError, ValueError):
    """A dataset file cannot be read as function data (names the file and the key)."""


def _as_fields(
    array: Tensor, path: Path, key: str, dims: Literal[1, 2] | None, channels_last: bool
) -> Tensor:
    """``(N, C, *grid)`` float64 from one stored array (see the module docstring)."""
    shape = tuple(array.shape)
    if channels_last and array.ndim >= 3:
        array = array.movedim(-1, 1)
    elif (array.ndim == 3 and dims != 1) or array.ndim == 2:
        array = array.unsqueeze(1)
    grid_dims = array.ndim - 2
    if array.ndim not in (3, 4) or (dims is not None and grid_dims != dims):
        expected = "[N, L] or [N, C, L]" if dims == 1 else "[N, H, W] or [N, C, H, W]"
        raise DatasetFileError(
            f"{path}: {key!r} has shape {shape}, expected {expected}"
            + (" with channels last" if channels_last else "")
            + "; set dims/channels_last to the file's layout"
        )
    return array.double().contiguous()


def _missing(path: Path, key: str, available: list[str]) -> DatasetFileError:
    return DatasetFileError(
        f"{path} has no {key!r}; it holds {sorted(available)}; name the right key in the "
        "recipe (input_key / solution_key)"
    )


def load_pt(path: Path, keys: list[str]) -> dict[str, Tensor]:
    """The tensors ``keys`` of the ``.pt`` dict at ``path`` (as stored).

    Raises:
        DatasetFileError: the file is not a dict of tensors, or lacks a key.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise DatasetFileError(
            f"{path} cannot be read by torch.load(weights_only=True): {err}; store a dict of "
            "tensors (torch.save({'x': x, 'y': y}, path))"
        ) from err
    if not isinstance(data, Mapping):
        raise DatasetFileError(
            f"{path} holds a {type(data).__name__}, expected a dict of tensors such as "
            "{'x': ..., 'y': ...}"
        )
    out = {}
    for key in keys:
        if key not in data:
            raise _missing(path, key, [str(k) for k in data])
        value = data[key]
        if not isinstance(value, Tensor):
            raise DatasetFileError(
                f"{path}: {key!r} is a {type(value).__name__}, expected a tensor"
            )
        out[key] = value
    return out


def load_h5(path: Path, keys: list[str]) -> dict[str, Tensor]:
    """The datasets ``keys`` (paths inside the file, e.g. ``"a"`` or ``"train/u"``) of ``path``.

    Raises:
        DatasetFileError: the file is not HDF5, or lacks a dataset.
    """
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise DatasetFileError(f"{path} cannot be opened as HDF5: {err}") from err
    with fh:
        out = {}
        for key in keys:
            item = fh.get(key)
            if not isinstance(item, h5py.Dataset):
                raise _missing(path, key, _h5_datasets(fh))
            out[key] = torch.from_numpy(np.asarray(item[()]))
    return out


def _h5_datasets(fh: Any) -> list[str]:
    """Paths of every dataset in an open h5py file."""
    import h5py

    names: list[str] = []
    fh.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def load_fields(
    path: str | Path,
    keys: Mapping[str, str],
    *,
    dims: Literal[1, 2] | None = None,
    channels_last: bool = False,
) -> dict[str, Tensor]:
    """Read function fields from a ``.pt`` or ``.h5`` file.

    Args:
        path: the file.
        keys: ``{field name: key in the file}``, e.g. ``{"input": "x", "solution": "y"}``.
        dims: the grid dimension when known (needed to read 3-D arrays as ``[N, C, L]``).
        channels_last: the arrays store channels in their last axis.

    Returns:
        ``{field name: (N, C, *grid) float64}``.

    Raises:
        FileNotFoundError: no file at ``path``.
        DatasetFileError: unknown suffix, unreadable file, missing key, bad shape, or fields
            with different sample counts or grids.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found")
    suffix = path.suffix.lower()
    wanted = list(dict.fromkeys(keys.values()))
    if suffix in PT_SUFFIXES:
        raw = load_pt(path, wanted)
    elif suffix in H5_SUFFIXES:
        raw = load_h5(path, wanted)
    else:
        raise DatasetFileError(
            f"{path}: unknown suffix {suffix!r}; expected one of {PT_SUFFIXES + H5_SUFFIXES}"
        )
    out = {name: _as_fields(raw[key], path, key, dims, channels_last) for name, key in keys.items()}
    shapes = {name: (t.shape[0], *t.shape[2:]) for name, t in out.items()}
    if len(set(shapes.values())) > 1:
        raise DatasetFileError(
            f"{path}: fields disagree on samples or grid: "
            + ", ".join(f"{keys[n]} {tuple(s)}" for n, s in shapes.items())
        )
    return out
