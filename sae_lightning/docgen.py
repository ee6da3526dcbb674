"""Generate ``docs/recipe-reference.md`` from the pydantic schemas, so the reference cannot drift.

    python -m sae_lightning.docgen > docs/recipe-reference.md

The recipe sections come from :class:`~sae_lightning.config.RecipeConfig` and the models nested in
it; the plugin sections come from the registry, limited to the plugins that ship with
sae-lightning so that a third-party plugin installed beside it does not change the file.
``tests/test_docs.py`` fails when the committed file differs from what this module renders.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sae_lightning.config import RecipeConfig
from sae_lightning.registry import GROUPS, SINGULAR, Registry, registry

CORE_DISTRIBUTION = "sae-lightning"
"""Only plugins from this distribution are documented."""

REGENERATE = "python -m sae_lightning.docgen > docs/recipe-reference.md"

PLUGIN_FIELDS: dict[str, str] = {
    "model.encoder": "encoders",
    "model.decoder": "decoders",
    "model.sparsity": "sparsity",
    "data": "datamodules",
    "callbacks": "callbacks",
}
"""Recipe fields that hold plugin specs -> the registry group their ``name`` is looked up in."""

GROUP_TITLES: dict[str, str] = {
    "encoders": "Encoders",
    "decoders": "Decoders",
    "sparsity": "Sparsity functions",
    "datamodules": "Data modules",
    "callbacks": "Callbacks",
}


def _normalise(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


def _cell(text: str) -> str:
    # A table cell: one line, pipes escaped (also inside code spans), and no `<word>` outside
    # code spans, which a renderer would take for an HTML tag.
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _code(text: str) -> str:
    return f"`{text}`"


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def render_type(annotation: Any) -> str:
    """``int | None``, ``"mse" | "fvu"``, ``tuple[float, float]``... as a recipe author reads it."""
    origin = get_origin(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(render_type(a) for a in get_args(annotation))
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(render_type(a) for a in get_args(annotation))}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def render_constraints(field: FieldInfo) -> str:
    """The field's bounds and pattern, e.g. ``> 0`` or ``>= 0, <= 1``."""
    parts: list[str] = []
    for meta in field.metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value!r}")
        pattern = getattr(meta, "pattern", None)
        if pattern is not None:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def render_value(value: Any) -> str:
    """A default as it would be written in YAML flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        if getattr(field, "default_factory_takes_data", False):
            return field.default_factory({})  # type: ignore[call-arg]
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def field_rows(model: type[BaseModel], path: str) -> list[tuple[str, str, str, str]]:
    """``(field, type, default, description)`` for every field of ``model`` at ``path``."""
    rows = []
    for name, field in model.model_fields.items():
        dotted = f"{path}.{name}" if path else name
        nested = _nested_model(field.annotation)
        group = PLUGIN_FIELDS.get(dotted)
        description = field.description or ""
        if nested is not None:
            type_text = _code(nested.__name__)
            default = "see below"
            description = description or f"section, see `{dotted}` below"
        elif group is not None:
            is_list = get_origin(field.annotation) is list
            type_text = "list of plugin specs" if is_list else "plugin spec"
            default = "required" if field.is_required() else _code(render_value(_default(field)))
            spec = description or "`{name: <plugin>, <param>: <value>}`"
            description = f"{spec}; looked up among the `{group}` plugins (see below)"
        else:
            type_text = _code(render_type(field.annotation))
            constraints = render_constraints(field)
            if constraints:
                type_text += f", {constraints}"
            default = "required" if field.is_required() else _code(render_value(_default(field)))
        rows.append((_code(name), type_text, default, description))
    return rows


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


FIELD_HEADER = ("field", "type", "default", "description")


def _sections(model: type[BaseModel], path: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """``model`` and every model nested in it, depth first, with their YAML paths."""
    yield path, model
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            yield from _sections(nested, f"{path}.{name}" if path else name)


def _recipe_part() -> list[str]:
    from sae_lightning.precision import DEFAULT_TEXT
    from sae_lightning.recipe import RESERVED_TRAINER_KEYS
    from sae_lightning.runner import TRAINER_DEFAULTS

    out = ["## Recipe sections", ""]
    for path, model in _sections(RecipeConfig, ""):
        title = f"`{path}`" if path else "Top level"
        out += [f"### {title} ({model.__name__})", "", _first_paragraph(model.__doc__), ""]
        out += [table(field_rows(model, path), FIELD_HEADER), ""]
    out += [
        "### `trainer`",
        "",
        "Keyword arguments of `lightning.Trainer`; unknown keys are errors. sae-lightning "
        "starts from these values, and the recipe's `trainer:` mapping overrides them:",
        "",
        table(
            [(_code(k), _code(render_value(v))) for k, v in TRAINER_DEFAULTS.items()]
            + [(_code("precision"), DEFAULT_TEXT)],
            ("key", "sae-lightning default"),
        ),
        "",
        "These keys are set by sae-lightning and rejected in `trainer:`:",
        "",
        table(
            [(_code(k), why) for k, why in RESERVED_TRAINER_KEYS.items()],
            ("key", "instead"),
        ),
        "",
    ]
    return out


def _plugin_part(plugins: Registry) -> list[str]:
    out = [
        "## Plugins",
        "",
        "A plugin is named in the recipe as `{name: <plugin>, <param>: <value>, ...}`; the "
        "parameters below are checked by the plugin's own `Config` model, and unknown ones are "
        f"errors. Only the plugins of the `{CORE_DISTRIBUTION}` distribution are listed here; "
        "`sae-lightning plugins --json` prints the schema of every installed plugin.",
        "",
    ]
    where = {group: field for field, group in PLUGIN_FIELDS.items()}
    for group in GROUPS:
        out += [f"### {GROUP_TITLES[group]} (`{where[group]}`)", ""]
        core = [
            f for f in plugins.entries(group) if _normalise(f.dist) == _normalise(CORE_DISTRIBUTION)
        ]
        if not core:
            out += [
                f"No {SINGULAR[group]} plugin ships with sae-lightning; `{where[group]}` takes "
                f"plugins that other distributions register in the `{GROUPS[group]}` "
                "entry-point group.",
                "",
            ]
            continue
        for found in sorted(core, key=lambda f: f.name):
            cls = plugins.get(group, found.qualified)
            out += [
                f"#### `{found.name}`",
                "",
                f"{_first_line(cls.__doc__)} Entry point: `{found.target}`.",
                "",
            ]
            rows = field_rows(cls.Config, f"{where[group]}")
            out += [table(rows, FIELD_HEADER) if rows else "No parameters.", ""]
    return out


def recipe_reference(plugins: Registry | None = None) -> str:
    """The markdown of ``docs/recipe-reference.md``.

    Args:
        plugins: the registry to document plugins from (the process-wide one by default).
    """
    lines = [
        "# Recipe reference",
        "",
        f"<!-- Generated from the pydantic schemas by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every key a recipe may set, with its type, default and meaning. Unknown keys are "
        "errors. A guide to writing recipes is in [recipes.md](recipes.md).",
        "",
        *_recipe_part(),
        *_plugin_part(plugins or registry),
    ]
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(recipe_reference())


if __name__ == "__main__":
    main()
