"""Steady-state training reads no device value on the host except on logging steps.

A host read (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``torch.nonzero``, ...) makes
the host wait for the device. The run below is the one ``sae-lightning fit`` builds (its
callbacks, TensorBoard logger, checkpoints and progress bar), on CPU, where every such call is
counted; the same calls are the waits on a GPU. Reads made while the data is produced (the
DataLoader's fetch, the data module's check before the batch moves to the device) are on host
data and are not counted, nor are reads from other threads (a prefetching data module).
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from sae_lightning.callbacks.progress import LoggedMetricsBar
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
STEPS, LOG_EVERY = 20, 10
LOGGING_STEPS = {LOG_EVERY - 1, 2 * LOG_EVERY - 1}  # 0-based steps whose metrics are logged
MAX_READS_ON_A_LOGGING_STEP = 20
"""Reads allowed on a logging step (16 to 18 here): the TensorBoard logger's ``.item()`` of each
of the 9 values logged, 3 for the progress bar, 1 for the NonFiniteGuard's check, 1 or 2 for the
checkpoint (every 10 steps here, on the logging steps), 1 for the dead-latent counters (the host's
bound on how many can be dead, :mod:`sae_lightning.counter_bound`), and the plugin's own."""

SPARSITY = {
    "topk": {"name": "topk", "k": 4},
    "batchtopk": {"name": "batchtopk", "k": 4},
    "relu": {"name": "relu", "l1_coefficient": 1e-3},
    "jumprelu": {"name": "jumprelu", "l0_coefficient": 1e-4, "bandwidth": 0.05},
}

_TENSOR_READS = ("item", "tolist", "__bool__", "cpu", "__int__", "__float__", "__index__", "numpy")
_TORCH_READS = ("nonzero", "unique", "masked_select", "bincount")
_HOST_SIDE = ("on_before_batch_transfer",)
_CPU_ONLY = ("_weight_grad_csr",)
"""Kernels that run only on CPU tensors (the CSR weight gradient sizes its rows with
``bincount``); on a GPU the step takes another path."""
_DATA_FILES = (f"torch{'/'}utils{'/'}data{'/'}",)


def _not_a_device_read() -> bool:
    """True when the caller produces data (the DataLoader's fetch, the data module's check
    before the transfer) or is a CPU-only kernel: reads of host tensors by design."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name in _HOST_SIDE + _CPU_ONLY or any(
            p in code.co_filename for p in _DATA_FILES
        ):
            return True
        frame = frame.f_back
    return False


class HostReads(pl.Callback):
    """Counts host reads per training step (from one batch start to the next)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.reads: dict[int, Counter[str]] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.step = trainer.global_step

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.step = None  # the validation at the end of the run is not steady state

    def count(self, name: str) -> None:
        if self.step is None or threading.current_thread() is not threading.main_thread():
            return
        if _not_a_device_read():
            return
        caller = sys._getframe(2)
        path = Path(caller.f_code.co_filename)
        site = f"{path.parent.name}/{path.name}:{caller.f_lineno} {name}"
        self.reads.setdefault(self.step, Counter())[site] += 1


@contextmanager
def counting(counter: HostReads) -> Iterator[None]:
    """Patch every host-read entry point of ``torch.Tensor`` and ``torch`` to call ``counter``."""
    saved: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def read(*args: Any, **kwargs: Any) -> Any:
            counter.count(name)
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, read)

    for name in _TENSOR_READS:
        wrap(torch.Tensor, name)
    for name in _TORCH_READS:  # data-dependent output shapes: the device's answer sizes them
        wrap(torch, name)
        wrap(torch.Tensor, name)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@pytest.mark.parametrize("plugin", list(SPARSITY))
def test_no_host_reads_between_logging_steps(tmp_path, plugin: str) -> None:
    recipe = load_recipe(
        [RECIPE],
        [
            ("output_dir", str(tmp_path)),
            ("data.d", "16"),
            ("data.n_atoms", "64"),
            ("data.batch_size", "64"),
            ("data.val_samples", "128"),
            ("model.d_sae", "64"),
            ("model.loss.dead_window_tokens", "256"),  # latents die within 4 steps: AuxK works
            ("model.sparsity", str(SPARSITY[plugin]).replace("'", "")),
            ("trainer.max_steps", str(STEPS)),
            ("trainer.log_every_n_steps", str(LOG_EVERY)),
            ("trainer.val_check_interval", str(STEPS)),
            ("checkpoint.every_n_steps", str(LOG_EVERY)),
        ],
    )
    run = build_run(recipe)
    counter = HostReads()
    run.trainer.callbacks.insert(0, counter)
    with counting(counter):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == STEPS

    # The progress bar counts steps out of max_steps (not "Epoch 0/-2") and shows the values
    # logged at the last logging step.
    bar = next(c for c in run.trainer.callbacks if isinstance(c, LoggedMetricsBar))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.description.strip(), task.total, task.completed) == ("Training", STEPS, STEPS)
    shown = bar.get_metrics(run.trainer, run.module)
    logged = run.trainer.logged_metrics
    assert shown["loss"] == pytest.approx(float(logged["train/loss"]))
    assert shown["l0"] == pytest.approx(float(logged["train/l0"]))
    assert "tokens/s" in shown
    for step in LOGGING_STEPS:
        n = sum(counter.reads.get(step, Counter()).values())
        assert 0 < n <= MAX_READS_ON_A_LOGGING_STEP, (
            step,
            n,
            list(counter.reads.get(step, {}).items()),
        )

    between = {s: dict(c) for s, c in counter.reads.items() if s not in LOGGING_STEPS}
    assert between == {}, f"host reads on steps that do not log: {between}"
