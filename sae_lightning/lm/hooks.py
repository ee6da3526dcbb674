"""Hook points named by module path: capture activations, stop early, splice replacements in.

A hook point is a module path as ``model.named_modules()`` spells it (``model.layers.6``), and a
pattern may use globs: ``*`` matches within one path component (``model.layers.*`` is every
block, not their submodules), ``**`` across components, ``?`` one character, ``[0-9]`` a set.
``io="output"`` takes the module's output (for a decoder block, the residual stream after it),
``io="input"`` its first positional input (the residual stream before it).
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sae_lightning.errors import ConfigError

HookIO = Literal["output", "input"]


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock held while hooks are on ``model`` and it runs.

    Hooks are registered on the shared modules, so a forward pass in one thread would fire the
    hooks of another (the prefetching harvester and the KL callback both use the LM).
    """
    with _LOCKS_GUARD:
        if model not in _LOCKS:
            _LOCKS[model] = threading.RLock()
        return _LOCKS[model]


class StopForward(Exception):
    """Raised from the deepest hook so the model never runs the layers after it."""


def resolve_hooks(model: nn.Module, pattern: str, field: str = "data.hook") -> list[str]:
    """Module paths matching ``pattern`` (comma-separated globs), in execution-friendly order.

    Raises:
        ConfigError: naming ``field`` when nothing matches, with examples of real paths.
    """
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        regex = glob_regex(part)
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            blocks = [n for n in names if n.count(".") <= 2][:12]
            raise ConfigError(
                field,
                f"no module of {type(model).__name__} matches {part!r}",
                f"use a path from model.named_modules(), e.g. {', '.join(blocks)}",
            )
        found += [h for h in hits if h not in found]
    return found


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a module-path glob (``*`` stays inside one dotted component)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        ch = pattern[i]
        if ch == "*":
            out.append("[^.]*")
        elif ch == "?":
            out.append("[^.]")
        elif ch == "[":
            end = pattern.find("]", i)
            if end < 0:
                out.append(re.escape(ch))
            else:
                out.append(pattern[i : end + 1])
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def first_tensor(value: Any) -> Tensor:
    """The hidden states in a module's output or inputs (a tensor, or the first item of a tuple)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def _replace_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    return (new, *value[1:]) if isinstance(value, tuple) else [new, *value[1:]]


@contextlib.contextmanager
def captured(
    model: nn.Module, hooks: Sequence[str], io: HookIO, *, stop: bool = True
) -> Iterator[dict[str, Tensor]]:
    """Record the activations at ``hooks`` during the forward passes inside the block.

    Args:
        model: the LM.
        hooks: module paths (already resolved).
        io: take each module's output or its first input.
        stop: raise :class:`StopForward` once every hook has fired, so later layers never run;
            call the model through :func:`run_to_hooks` to swallow it.

    Yields:
        The dict that fills with ``{hook: (batch, seq, d)}`` as the model runs.
    """
    store: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = []

    def record(name: str, value: Any) -> None:
        store[name] = first_tensor(value)
        if stop and len(store) == len(hooks):
            raise StopForward

    for name in hooks:
        module = modules[name]
        if io == "output":
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: record(n, out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: record(n, a)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_to_hooks(
    model: nn.Module, input_ids: Tensor, hooks: Sequence[str], io: HookIO
) -> dict[str, Tensor]:
    """Activations ``{hook: (batch, seq, d)}`` of ``input_ids``, running only as deep as needed."""
    with (
        model_lock(model),
        captured(model, hooks, io) as store,
        contextlib.suppress(StopForward),
    ):
        model(input_ids=input_ids, use_cache=False)
    missing = [h for h in hooks if h not in store]
    if missing:
        raise RuntimeError(f"hook(s) {missing} never fired in the forward pass")
    return dict(store)


@contextlib.contextmanager
def spliced(
    model: nn.Module, hook: str, io: HookIO, replace: Callable[[Tensor], Tensor]
) -> Iterator[None]:
    """Inside the block, the activation at ``hook`` is replaced by ``replace(activation)``."""
    module = dict(model.named_modules())[hook]
    if io == "output":
        handle = module.register_forward_hook(
            lambda m, a, out: _replace_first(out, replace(first_tensor(out)))
        )
    else:
        handle = module.register_forward_pre_hook(
            lambda m, a: _replace_first(a, replace(first_tensor(a)))
        )
    try:
        yield
    finally:
        handle.remove()


def hook_width(model: nn.Module, hook: str, io: HookIO) -> int:
    """Width of the activation at ``hook``, measured with a one-token forward pass."""
    device = next(model.parameters()).device
    with torch.no_grad():
        acts = run_to_hooks(model, torch.zeros(1, 1, dtype=torch.long, device=device), [hook], io)
    return int(acts[hook].shape[-1])
