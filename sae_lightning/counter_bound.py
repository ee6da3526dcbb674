"""Host-side knowledge of the dead-latent counters: an upper bound on how many latents can be
dead, known without reading the device, so AuxK's work is sized by it exactly."""

from __future__ import annotations

from bisect import bisect_left

from torch import Tensor


class CounterBound:
    """The ``tokens_since_fired`` counters as last read on the host, plus the tokens added since.

    A counter can only grow by the tokens of each step (a latent that fires drops to 0), so a
    latent whose counter was ``c`` at the last :meth:`refresh` is dead now only if
    ``c + tokens since >= window``. Any other in-place change of the counters (a loaded
    checkpoint, a benchmark holding latents dead) is seen through the tensor's version counter
    and makes the bound unknown until the next :meth:`refresh`; a token count held on the device
    (data parallelism) does too. So the bound only errs upwards, which costs work, never
    exactness.
    """

    def __init__(self, counters: Tensor) -> None:
        self._sorted: list[int] | None = [0] * counters.numel()  # fresh counters are zeros
        self._since = 0
        self._seen = _state(counters)

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
        if self._sorted is not None and isinstance(n_tokens, int):
            self._since += n_tokens
        else:
            self._sorted = None
        self._seen = _state(counters)

    def refresh(self, counters: Tensor, ascending: list[int]) -> None:
        """Restart from ``ascending``, the counters read on the host now, sorted."""
        self._sorted, self._since = ascending, 0
        self._seen = _state(counters)


def _state(counters: Tensor) -> tuple[int, int]:
    """The tensor's identity and in-place version: both change with any write to it."""
    return id(counters), counters._version
