"""sae-lightning: composable sparse autoencoders on PyTorch Lightning, with entry-point plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sae_lightning._version import __version__

__all__ = [
    "ConfigError",
    "SAEModule",
    "SparseAutoencoder",
    "__version__",
    "export_sae",
    "load_sae",
    "registry",
]

if TYPE_CHECKING:
    from sae_lightning.errors import ConfigError
    from sae_lightning.io import export_sae, load_sae
    from sae_lightning.module import SAEModule
    from sae_lightning.registry import registry
    from sae_lightning.sae import SparseAutoencoder

_LAZY = {
    "ConfigError": "sae_lightning.errors",
    "SAEModule": "sae_lightning.module",
    "SparseAutoencoder": "sae_lightning.sae",
    "export_sae": "sae_lightning.io",
    "load_sae": "sae_lightning.io",
    "registry": "sae_lightning.registry",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import sae_lightning` (and the CLI's --help) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_lightning' has no attribute {name!r}")
