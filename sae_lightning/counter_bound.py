"""Host-side knowledge of the dead-latent counters: an upper bound on how many latents can be
dead, known without reading the device, so AuxK's work is sized by it exactly."""

from __future__ import annotations

import warnings
from bisect import bisect_left

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


class CounterBound:
    """The ``tokens_since_fired`` counters as last read on the host, plus the tokens added since.

    A counter can only grow by the tokens of each step (a latent that fires drops to 0), so a
    latent whose counter was ``c`` at the last :meth:`refresh` is dead now only if
    ``c + tokens since >= window``. Any other in-place change of the counters (a loaded
    checkpoint, a benchmark holding latents dead) is seen through the tensor's version counter
    and makes the bound unknown until the next :meth:`refresh`; a token count held on the device
    only does too. So the bound only errs upwards, which costs work, never exactness.

    Under data parallelism the global token count of a step is summed on the device; the host
    counts it as its own times the ranks (DDP's ranks train on batches of one size), and each
    :meth:`refresh` checks that count against the device's: a difference makes
    :attr:`host_counts_hold` False for the rest of the run. That is the one way the bound can
    err low: ranks with batches of different sizes, on the steps before the refresh that finds
    them (at most ``log_every_n_steps``).
    """

    def __init__(self, counters: Tensor) -> None:
        self._sorted: list[int] | None = [0] * counters.numel()  # fresh counters are zeros
        self._since = 0
        self._seen = _state(counters)
        self._seen_tokens: int | None = 0  # the device's token total at the last refresh
        self.host_counts_hold = True
        """False once a refresh found the host's token counts off the device's."""

    def at_most_dead(self, counters: Tensor, window: int) -> int | None:
        """An upper bound on the counters ``>= window`` now; None when unknown."""
        if not self.intact(counters):
            return None
        assert self._sorted is not None
        return len(self._sorted) - bisect_left(self._sorted, window - self._since)

    def intact(self, counters: Tensor) -> bool:
        """True when the counters changed only through :meth:`advance` since the last call."""
        return self._sorted is not None and _state(counters) == self._seen

    def advance(self, counters: Tensor, n_tokens: int | Tensor | None) -> None:
        """After the counters were advanced by ``n_tokens`` (None: the bound was not
        :meth:`intact` before) and reset where latents fired."""
        if self._sorted is not None and isinstance(n_tokens, int) and self.host_counts_hold:
            self._since += n_tokens
        else:
            self._sorted = None
        self._seen = _state(counters)

    def read(self, counters: Tensor, tokens_seen: Tensor) -> None:
        """:meth:`refresh` from the device's counters and token total, in one host read (the
        counters sorted on the device); warns when it finds the host's token counts off."""
        held = self.host_counts_hold
        seen, *ascending = torch.cat([tokens_seen.view(1), counters.sort().values]).tolist()
        self.refresh(counters, ascending, seen)
        if held and not self.host_counts_hold:
            warnings.warn(
                "the data-parallel ranks trained on batches of different sizes (the tokens "
                "counted on the host differ from the device's), so AuxK now selects its full "
                "k_aux latents every step instead of as many as can be dead; give every rank "
                "batches of one size (as DDP's samplers do) to keep the smaller selection",
                stacklevel=3,
            )

    def refresh(self, counters: Tensor, ascending: list[int], tokens_seen: int) -> None:
        """Restart from ``ascending``, the counters read on the host now, sorted, and
        ``tokens_seen``, the device's token total read with them."""
        if self._sorted is not None and self._seen_tokens is not None:
            # every step since the last refresh was counted on the host: check the count
            self.host_counts_hold &= tokens_seen - self._seen_tokens == self._since
        self._sorted, self._since = ascending, 0
        self._seen = _state(counters)
        self._seen_tokens = tokens_seen


def _state(counters: Tensor) -> tuple[int, int]:
    """The tensor's identity and in-place version: both change with any write to it."""
    return id(counters), counters._version


COUNTER_BUFFERS = ("tokens_since_fired", "tokens_seen")
"""The dead-latent counters: every rank advances them by the same global counts."""


def keep_counters_out_of_ddp_sync(root: nn.Module) -> None:
    """Tell DDP not to broadcast ``root``'s dead-latent counters before each forward pass.

    They are equal on every rank by construction (advanced by all-reduced counts), so the
    broadcast moves ``d_sae`` integers a step for nothing; and it writes them, which makes the
    host's bound on how many latents are dead (:class:`CounterBound`) unknown, so that AuxK
    would select its full ``k_aux`` latents every step.
    """
    names = [n for n, _ in root.named_buffers() if n.rsplit(".", 1)[-1] in COUNTER_BUFFERS]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, names)
