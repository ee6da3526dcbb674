"""Checkpoints from other plugin versions: refuse with a clear message, or migrate by a hook.

Every plugin class has an integer ``state_version`` (default 1) that it bumps when the meaning or
layout of its state changes. A checkpoint records, per role, the plugin's name, distribution,
package version and ``state_version``. On load:

- another plugin name or distribution: refused (the checkpoint is for a different SAE);
- the same ``state_version``: loaded as is (package versions may differ freely);
- an older ``state_version``: the plugin's ``migrate_state(state, from_version)`` classmethod
  rewrites its part of the state dict, or, without such a hook, the load is refused;
- a newer ``state_version``: refused (written by a newer plugin than the one installed).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sae_lightning.components.base import Plugin
from sae_lightning.errors import SaeLightningError


class IncompatibleCheckpointError(SaeLightningError):
    """A checkpoint was written by plugins this installation cannot load."""


def migrate_checkpoint(
    checkpoint: dict[str, Any],
    current: dict[str, dict[str, Any]],
    plugins: dict[str, Plugin],
    prefix: str = "sae.",
) -> None:
    """Check ``checkpoint`` against the installed plugins; migrate its state dict in place.

    Args:
        checkpoint: a Lightning checkpoint dict (``state_dict`` and ``sae_lightning`` keys).
        current: per role, the installed plugin's ``name``, ``distribution``, ``version`` and
            ``state_version``.
        plugins: per role, the installed plugin instance (its class provides the hook).
        prefix: where the SAE's state sits in the module's state dict.

    Raises:
        IncompatibleCheckpointError: naming the role, both versions and what to do.
    """
    saved = (checkpoint.get("sae_lightning") or {}).get("plugins") or {}
    state: dict[str, Tensor] = checkpoint.get("state_dict", {})
    for role, now in current.items():
        then = saved.get(role)
        if then is None:
            continue  # written before versions were recorded
        where = (
            f"{role} plugin '{then.get('name')}' "
            f"from {then.get('distribution')} {then.get('version')}"
        )
        if (then.get("name"), then.get("distribution")) != (now["name"], now["distribution"]):
            raise IncompatibleCheckpointError(
                f"the checkpoint was written by {where}, but the recipe builds {role} plugin "
                f"'{now['name']}' from {now['distribution']}; use the recipe that wrote it"
            )
        old, new = int(then.get("state_version", 1)), int(now["state_version"])
        if old == new:
            continue
        if old > new:
            raise IncompatibleCheckpointError(
                f"the checkpoint was written by {where} (state version {old}), newer than the "
                f"installed {now['version']} (state version {new}); upgrade "
                f"{now['distribution']} to at least {then.get('version')}"
            )
        plugin = plugins[role]
        hook = type(plugin).migrate_state
        if hook is None:
            raise IncompatibleCheckpointError(
                f"the checkpoint was written by {where} (state version {old}); the installed "
                f"{now['version']} has state version {new} and no migrate_state hook; install "
                f"{now['distribution']}=={then.get('version')} to load it"
            )
        head = f"{prefix}{role}."
        part = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
        migrated = hook(part, old)
        for key in [k for k in state if k.startswith(head)]:
            del state[key]
        state.update({head + k: v for k, v in migrated.items()})
        then["state_version"] = new
