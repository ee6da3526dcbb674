"""What defines one SAE: its widths and the three plugin specs, in one value.

The module, the e2e module, the multi-SAE module and the runner pass an :class:`SAESpec`
around instead of five loose arguments, and iterate :data:`PLUGIN_ROLES` instead of spelling
out the encoder/decoder/sparsity triple.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from sae_lightning.config import PluginSpec

PLUGIN_ROLES: tuple[tuple[str, str], ...] = (
    ("encoder", "encoders"),
    ("decoder", "decoders"),
    ("sparsity", "sparsity"),
)
"""``(role, registry group)`` of the plugins an SAE is composed of, in build order."""


class SAESpec(NamedTuple):
    """The widths and plugin specs that build one :class:`~sae_lightning.sae.SparseAutoencoder`."""

    d_in: int
    """Input width."""
    d_sae: int
    """Number of latents."""
    encoder: PluginSpec
    """``{"name": ..., **params}`` of the encoder plugin."""
    decoder: PluginSpec
    """``{"name": ..., **params}`` of the decoder plugin."""
    sparsity: PluginSpec
    """``{"name": ..., **params}`` of the sparsity plugin."""

    @classmethod
    def read(cls, stored: Mapping[str, Any]) -> SAESpec:
        """The spec stored under its field names (a checkpoint's ``hyper_parameters``, an
        exported ``sae_config.json``); raises KeyError naming a missing field."""
        widths = (int(stored["d_in"]), int(stored["d_sae"]))
        return cls(*widths, stored["encoder"], stored["decoder"], stored["sparsity"])

    def roles(self) -> Iterator[tuple[str, str, PluginSpec]]:
        """``(role, registry group, spec)`` of each plugin, in build order."""
        for role, group in PLUGIN_ROLES:
            yield role, group, self._asdict()[role]

    def as_kwargs(self) -> dict[str, Any]:
        """The five keyword arguments of ``SparseAutoencoder`` and ``SAEModule``."""
        return self._asdict()
