"""Entry-point plugin discovery: find without importing, load on first use, one failure stays local.

Plugins live in the entry-point groups ``sae_lightning.<group>``. The core registers its own
components through its ``pyproject.toml`` exactly like a third-party distribution would, so the
registry has no built-in special cases. A name registered by two distributions is ambiguous and
must be qualified as ``<distribution>:<name>``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sae_lightning.config import PluginSpec, config_error_from_validation, split_spec
from sae_lightning.errors import (
    ConfigError,
    DuplicatePluginError,
    PluginLoadError,
    PluginNotFoundError,
    RegistryError,
    did_you_mean,
)

GROUPS: dict[str, str] = {
    "encoders": "sae_lightning.encoders",
    "decoders": "sae_lightning.decoders",
    "sparsity": "sae_lightning.sparsity",
    "datamodules": "sae_lightning.datamodules",
    "callbacks": "sae_lightning.callbacks",
}
"""Short group name -> entry-point group."""

SINGULAR = {
    "encoders": "encoder",
    "decoders": "decoder",
    "sparsity": "sparsity",
    "datamodules": "datamodule",
    "callbacks": "callback",
}


@dataclass(frozen=True)
class Found:
    """One entry point as discovered, before anything is imported."""

    group: str
    name: str
    dist: str
    version: str
    entry_point: md.EntryPoint

    @property
    def qualified(self) -> str:
        return f"{self.dist}:{self.name}"

    @property
    def target(self) -> str:
        return self.entry_point.value


@dataclass(frozen=True)
class PluginInfo:
    """What ``sae-lightning plugins`` shows about one plugin."""

    group: str
    name: str
    dist: str
    version: str
    description: str
    schema: dict[str, Any] | None
    error: str | None = None


def _base_class(group: str) -> type:
    # Imported lazily: the registry itself must not import torch-heavy modules at import time.
    from sae_lightning.components.base import Decoder, Encoder, SparsityFn

    if group == "encoders":
        return Encoder
    if group == "decoders":
        return Decoder
    if group == "sparsity":
        return SparsityFn
    if group == "datamodules":
        from lightning.pytorch import LightningDataModule

        return LightningDataModule
    from lightning.pytorch import Callback

    return Callback


class Registry:
    """Discovers plugins from installed distributions and builds them from recipe specs."""

    def __init__(self) -> None:
        self._found: dict[str, dict[str, list[Found]]] | None = None
        self._loaded: dict[tuple[str, str], type] = {}

    def refresh(self) -> None:
        """Forget what was found and loaded (call after installing or adding a distribution)."""
        self._found = None
        self._loaded.clear()

    def _discover(self) -> dict[str, dict[str, list[Found]]]:
        if self._found is None:
            found: dict[str, dict[str, list[Found]]] = {g: {} for g in GROUPS}
            by_group = {v: k for k, v in GROUPS.items()}
            seen: set[tuple[str, str, str]] = set()
            for dist in md.distributions():
                dist_name = dist.metadata["Name"] or "unknown"
                for ep in dist.entry_points:
                    group = by_group.get(ep.group)
                    key = (ep.group, ep.name, dist_name.lower().replace("_", "-"))
                    if group is None or key in seen:
                        continue  # the same distribution twice on sys.path counts once
                    seen.add(key)
                    rec = Found(group, ep.name, dist_name, dist.version or "?", ep)
                    found[group].setdefault(ep.name, []).append(rec)
            for names in found.values():
                for candidates in names.values():
                    candidates.sort(key=lambda f: f.dist.lower())
            self._found = found
        return self._found

    def _check_group(self, group: str) -> None:
        if group not in GROUPS:
            raise RegistryError(
                f"unknown plugin group '{group}'{did_you_mean(group, GROUPS)}; "
                f"groups: {', '.join(GROUPS)}"
            )

    def names(self, group: str) -> list[str]:
        """Sorted plugin names installed in ``group`` (unqualified)."""
        self._check_group(group)
        return sorted(self._discover()[group])

    def entries(self, group: str) -> list[Found]:
        """Every discovered entry point of ``group``, duplicates included."""
        self._check_group(group)
        return [f for cands in sorted(self._discover()[group].items()) for f in cands[1]]

    def resolve(self, group: str, name: str) -> Found:
        """Find the one entry point that ``name`` (or ``dist:name``) refers to."""
        self._check_group(group)
        found = self._discover()[group]
        kind = SINGULAR[group]
        dist_wanted: str | None = None
        if ":" in name:
            dist_wanted, name = name.split(":", 1)
        candidates = found.get(name, [])
        if dist_wanted is not None:
            norm = dist_wanted.lower().replace("_", "-")
            candidates = [c for c in candidates if c.dist.lower().replace("_", "-") == norm]
        if not candidates:
            raise PluginNotFoundError(self._not_found_message(group, name, dist_wanted))
        if len(candidates) > 1:
            a, b = candidates[0], candidates[1]
            others = "".join(f", '{c.dist}' ({c.target})" for c in candidates[2:])
            raise DuplicatePluginError(
                f"{kind} plugin name '{name}' is registered by two distributions: "
                f"'{a.dist}' ({a.target}) and '{b.dist}' ({b.target}){others}; "
                f"pick one as '{a.qualified}' or '{b.qualified}'"
            )
        return candidates[0]

    def _not_found_message(self, group: str, name: str, dist: str | None) -> str:
        kind = SINGULAR[group]
        if dist is not None:
            owners = [c.dist for c in self._discover()[group].get(name, [])]
            where = f"installed from: {', '.join(owners)}" if owners else "no distribution has it"
            return f"no {kind} plugin '{name}' from distribution '{dist}'; {where}"
        installed = self.names(group)
        failed = []
        for other in installed:
            for cand in self._discover()[group][other]:
                try:
                    self._load(cand)
                except PluginLoadError as err:
                    cause = err.__cause__
                    failed.append(f"{other} ({type(cause).__name__ if cause else 'invalid'})")
        msg = f"no {kind} plugin '{name}'; installed: {', '.join(installed) or '(none)'}"
        if failed:
            msg += f"; failed to load: {', '.join(failed)}"
        return msg + did_you_mean(name, installed)

    def _load(self, rec: Found) -> type:
        key = (rec.group, rec.qualified)
        if key in self._loaded:
            return self._loaded[key]
        kind = SINGULAR[rec.group]
        where = (
            f"{kind} plugin '{rec.name}' from distribution '{rec.dist} {rec.version}' "
            f"(entry point '{rec.name} = {rec.target}')"
        )
        try:
            obj = rec.entry_point.load()
        except Exception as exc:  # any import-time failure must stay local to this plugin
            raise PluginLoadError(f"{where} failed to import: {type(exc).__name__}: {exc}") from exc
        base = _base_class(rec.group)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise PluginLoadError(f"{where} is not a subclass of {base.__name__}: got {obj!r}")
        config = getattr(obj, "Config", None)
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise PluginLoadError(
                f"{where} declares no pydantic `Config` class; "
                "add `Config = <a PluginConfig subclass>`"
            )
        self._loaded[key] = obj
        return obj

    def get(self, group: str, name: str) -> type:
        """The plugin class registered as ``name`` (or ``dist:name``) in ``group``."""
        return self._load(self.resolve(group, name))

    def build(self, group: str, spec: PluginSpec, *, field: str, **context: Any) -> Any:
        """Instantiate a plugin from a recipe spec, raising ConfigError that names ``field``.

        Args:
            group: registry group, e.g. ``"sparsity"``.
            spec: ``{"name": ..., **params}`` as written in the recipe.
            field: the spec's dotted path in the recipe, used in error messages.
            **context: keyword arguments the group's constructor takes (``d_in``, ``d_sae``...).
        """
        name, params = split_spec(spec, field)
        cls = self.get_for_field(group, name, field)
        config = self.validate_params(cls, params, field)
        try:
            return cls(config, **context)
        except ConfigError as err:
            raise err.under(field) from None

    def get_for_field(self, group: str, name: str, field: str) -> type:
        """Like :meth:`get`, but registry errors become ConfigErrors naming ``field.name``."""
        try:
            return self.get(group, name)
        except RegistryError as err:
            raise ConfigError(f"{field}.name", str(err)) from err

    @staticmethod
    def validate_params(cls: type, params: dict[str, Any], field: str) -> BaseModel:
        """Validate plugin parameters with the plugin's own ``Config`` model."""
        try:
            return cls.Config.model_validate(params)
        except ValidationError as err:
            raise config_error_from_validation(err, field, cls.Config) from None

    def summaries(self) -> list[PluginInfo]:
        """Every plugin with the first line of its docstring, read without importing it.

        Listing must not import Lightning or transformers (seconds each), so the docstring is
        read from the source with :mod:`ast`. A plugin whose class is not found there (e.g. it
        is re-exported) is loaded as :meth:`describe` does; ``schema`` is always None.
        """
        out: list[PluginInfo] = []
        for group in GROUPS:
            for rec in self.entries(group):
                try:
                    doc = _static_docstring(rec.target)
                    if doc is None:
                        doc = self._load(rec).__doc__ or ""
                except (PluginLoadError, OSError, SyntaxError) as err:
                    out.append(
                        PluginInfo(group, rec.name, rec.dist, rec.version, "", None, str(err))
                    )
                    continue
                summary = (doc.strip().splitlines() or [""])[0]
                out.append(PluginInfo(group, rec.name, rec.dist, rec.version, summary, None))
        return out

    def describe(self) -> list[PluginInfo]:
        """Load every plugin and describe it; broken ones are listed with their error."""
        out: list[PluginInfo] = []
        for group in GROUPS:
            for rec in self.entries(group):
                try:
                    cls = self._load(rec)
                except PluginLoadError as err:
                    out.append(
                        PluginInfo(group, rec.name, rec.dist, rec.version, "", None, str(err))
                    )
                    continue
                doc = (cls.__doc__ or "").strip().splitlines()
                out.append(
                    PluginInfo(
                        group,
                        rec.name,
                        rec.dist,
                        rec.version,
                        doc[0] if doc else "",
                        cls.Config.model_json_schema(),
                    )
                )
        return out


def _static_docstring(target: str) -> str | None:
    """The docstring of the class an entry point ``"pkg.mod:Class"`` names, read from source.

    Only the top-level package is located (``find_spec`` imports no module); None when the
    class is not defined in that file.

    Raises:
        OSError: the module's file is missing. SyntaxError: it does not parse.
    """
    module, _, attr = target.partition(":")
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)), *rest)
    source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    tree = ast.parse(source.read_text(), filename=str(source))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            return ast.get_docstring(node) or ""
    return None


registry = Registry()
"""The process-wide registry; call ``registry.refresh()`` after changing what is installed."""
