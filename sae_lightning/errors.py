"""Every error a user can trigger, each naming what was expected, what arrived and what to try."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SaeLightningError(Exception):
    """Base class of the errors this package raises on purpose."""


class ConfigError(SaeLightningError, ValueError):
    """A recipe or plugin parameter is invalid.

    Args:
        field: dotted path of the offending YAML field, e.g. ``model.sparsity.k``.
        message: what is wrong, including the value that arrived.
        fix: what to do instead (optional).
    """

    def __init__(self, field: str, message: str, fix: str | None = None) -> None:
        self.field = field
        self.message = message
        self.fix = fix
        text = f"{field}: {message}" if field else message
        if fix:
            text += f" ({fix})"
        super().__init__(text)

    def under(self, prefix: str) -> ConfigError:
        """Return the same error with ``prefix`` prepended to its field path."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return ConfigError(field, self.message, self.fix)


class RegistryError(SaeLightningError, LookupError):
    """Base class of plugin discovery and loading errors."""


class PluginNotFoundError(RegistryError):
    """No installed plugin has the requested name in its group."""


class PluginLoadError(RegistryError):
    """An installed plugin's entry point failed to import or is not a valid plugin."""


class DuplicatePluginError(RegistryError):
    """Two distributions register the same name in one group."""


class NonFiniteError(SaeLightningError, FloatingPointError):
    """A loss term or weight became NaN or infinite during training."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``name``, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix, or an empty string."""
    match = closest(name, choices)
    return f"; did you mean '{match}'?" if match else ""
