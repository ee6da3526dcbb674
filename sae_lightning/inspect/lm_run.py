"""``inspect`` for a language-model run: stream tokens, collect, add effects, write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from sae_lightning.errors import ConfigError
from sae_lightning.inspect.collect import Collected, collect
from sae_lightning.inspect.effects import logit_effects, nearest_atoms
from sae_lightning.inspect.options import InspectOptions
from sae_lightning.inspect.pages import (
    flags,
    index_rows,
    latent_pages,
    token_strings,
    top_tokens,
)
from sae_lightning.inspect.site import write_browser
from sae_lightning.inspect.source import CacheSource, LMSource, take_tokens


def cache_path(dm: Any, options: InspectOptions) -> Path | None:
    """The complete activation cache to read, or None to run the LM."""
    c = dm.config
    folder = Path(c.cache_dir).expanduser() if c.cache_dir else None
    complete = folder is not None and (folder / "manifest.json").is_file()
    if options.source == "cache":
        if options.text or not complete:
            raise ConfigError(
                "--source",
                "cache needs the recipe's complete data.cache_dir and no --text",
                "write it with `sae-lightning cache --config <recipe>`, or use --source lm",
            )
        return folder
    return folder if options.source == "auto" and complete and not options.text else None


def hook_of(hooks: list[str], options: InspectOptions) -> int:
    """Index of the hook to read among ``hooks``."""
    if options.hook is None:
        return 0
    if options.hook not in hooks:
        raise ConfigError("--hook", f"{options.hook!r} is not one of the run's hooks {hooks}")
    return hooks.index(options.hook)


def open_source(dm: Any, options: InspectOptions, device: torch.device) -> tuple[Any, Any, str]:
    """``(chunks, LM or None, description)`` for the run's data module ``dm``."""
    c = dm.config
    folder = cache_path(dm, options)
    if folder is not None:
        from sae_lightning.data.cache_format import read_manifest

        hooks = read_manifest(folder, "data.cache_dir")["hooks"]
        index = hook_of(hooks, options)
        source = CacheSource(folder, index, options.tokens, c.context_length, options.batch_size)
        return source, None, f"the activation cache {folder.name} at {hooks[index]}"
    dm.load()
    corpus = dm.corpus
    ids = torch.cat([corpus.train.ids, corpus.val.ids])
    keep = torch.cat([corpus.train.keep, corpus.val.keep])
    ids, keep = take_tokens(ids, keep, options.tokens)
    hook = dm.hooks[hook_of(dm.hooks, options)]
    model = dm.model.to(device)
    text = ", ".join(Path(t).name for t in (options.text or c.text))
    described = f"{Path(c.model).name} at {hook} on {text}"
    return LMSource(model, hook, c.io, ids, keep, options.batch_size), model, described


def stream(sae: nn.Module, chunks: Any, options: InspectOptions, console: Console) -> Collected:
    """:func:`collect` with a progress bar in tokens."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        total = chunks.tokens
        task = progress.add_task("inspecting", total=total)
        return collect(
            sae,
            chunks,
            n_top=options.n_top,
            before=options.before,
            after=options.after,
            dtype=options.torch_dtype,
            progress=lambda n: progress.advance(task, n),
        )


def inspect_lm(
    run_dir: Path, sae: nn.Module, dm: Any, options: InspectOptions, console: Console
) -> Path:
    """Write the feature browser of a language-model run; return its ``index.html``."""
    from sae_lightning.lm.loading import load_model, load_tokenizer

    device = options.torch_device()
    chunks, model, described = open_source(dm, options, device)
    collected = stream(sae, chunks, options, console)
    atoms = sae.atoms().detach()
    effects = None
    if options.effects:
        model = model if model is not None else load_model(dm.config, device)
        head = model.get_output_embeddings()
        if head is not None and head.weight.shape[1] == atoms.shape[1]:  # the residual width
            effects = logit_effects(model, atoms, options.effects)
    near = nearest_atoms(atoms, options.near) if options.near else None
    tokenizer = load_tokenizer(dm.config)
    ids = [collected.top.tokens.reshape(-1).long()]
    if effects is not None:
        ids += [effects.up_ids.reshape(-1), effects.down_ids.reshape(-1)]
    strings = token_strings(tokenizer, torch.cat([i.cpu() for i in ids]))
    flag = flags(collected.stats, options.dense_threshold)
    labels = top_tokens(collected, strings)
    stats = collected.stats
    summary = (
        f"{stats.tokens:,} tokens of {described}; {sum(f == 'dead' for f in flag):,} dead and "
        f"{sum(f == 'dense' for f in flag):,} dense (density > {options.dense_threshold}) of "
        f"{len(flag):,} latents"
    )
    out = options.out or run_dir / "inspect"
    index = write_browser(
        out,
        f"{run_dir.parent.name}/{run_dir.name}",
        summary,
        index_rows(collected, labels, flag),
        latent_pages(collected, strings, flag, effects, near),
    )
    if options.projector:
        from sae_lightning.inspect.projector import add_atoms

        add_atoms(run_dir, atoms, labels, stats.density.tolist())
    return index
