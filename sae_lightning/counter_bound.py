"""A host-side upper bound on the dead-latent counters: a step knows, without reading the
device, that no latent can be dead yet, so AuxK's work can be skipped exactly."""

from __future__ import annotations

from torch import Tensor


class CounterBound:
    """An upper bound, kept on the host, on the largest of the ``tokens_since_fired`` counters.

    Each step adds its token count to it. Any other in-place change of the counters (a loaded
    checkpoint, a benchmark holding latents dead) is seen through the tensor's version counter
    and makes the bound unknown until the next :meth:`refresh`; a token count held on the
    device (data parallelism) does too. So the bound only errs towards "a latent may be dead",
    which costs work, never exactness.
    """

    def __init__(self, counters: Tensor) -> None:
        self._bound: int | None = 0  # fresh counters are zeros
        self._seen = _state(counters)

    def below(self, counters: Tensor, window: int) -> bool:
        """True when every counter is surely below ``window`` (no latent is dead)."""
        return self._bound is not None and self._bound < window and _state(counters) == self._seen

    def intact(self, counters: Tensor) -> bool:
        """True when the counters changed only through :meth:`advance` since the last call."""
        return self._bound is not None and _state(counters) == self._seen

    def advance(self, counters: Tensor, n_tokens: int | Tensor | None) -> None:
        """After the counters were advanced by ``n_tokens`` (None: the bound was not
        :meth:`intact` before) and reset where latents fired."""
        ok = self._bound is not None and isinstance(n_tokens, int)
        self._bound = self._bound + n_tokens if ok else None  # type: ignore[operator]
        self._seen = _state(counters)

    def refresh(self, counters: Tensor, largest: int) -> None:
        """Set the bound to ``largest``, the counters' maximum read on the host now."""
        self._bound = largest
        self._seen = _state(counters)


def _state(counters: Tensor) -> tuple[int, int]:
    """The tensor's identity and in-place version: both change with any write to it."""
    return id(counters), counters._version
