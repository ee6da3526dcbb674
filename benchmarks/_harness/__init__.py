"""What the benchmark scripts share: timing, the bare training step, the machine's description.

The benchmarks folder is not a package; a script puts its own folder on ``sys.path`` and
imports ``_harness``.
"""

from _harness.machine import describe_machine, emit_machine
from _harness.step import (
    DTYPES,
    PRECISIONS,
    Floor,
    ProjectStep,
    add_shape_args,
    build_module,
    dead_mask,
    make_batches,
    setup_torch,
    sparsity_spec,
)
from _harness.timing import (
    MemoryMeter,
    emit,
    measure_peak,
    pipelined_step_s,
    sync,
    timed_rounds,
)

__all__ = [
    "DTYPES",
    "PRECISIONS",
    "Floor",
    "MemoryMeter",
    "ProjectStep",
    "add_shape_args",
    "build_module",
    "dead_mask",
    "describe_machine",
    "emit",
    "emit_machine",
    "make_batches",
    "measure_peak",
    "pipelined_step_s",
    "setup_torch",
    "sparsity_spec",
    "sync",
    "timed_rounds",
]
