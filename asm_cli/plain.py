"""The CLI's output choice without rich: :mod:`asm_cli.ui` (rich, ~40 ms to import) only for a terminal.

``asm run/attach/logs/replay --output text`` piped to a file or another program writes the plain text
of ``TTYSink``; that path must not pay for importing rich (issue 15). :func:`run_rendering` is
:func:`asm_cli.ui.run_rendering`'s choice, importing ``asm_cli.ui`` only when it picks rich.
"""

from __future__ import annotations

import os
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asm_controller.extensions.rendering import Rendering


def use_rich(stream: Any, *, no_color: bool = False) -> bool:
    """Whether ``stream`` gets rich output: a terminal, no ``--no-color``, no ``NO_COLOR``, not ``TERM=dumb``."""
    if no_color or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def plain_rendering(stdout: IO[str], stderr: IO[str], *, no_color: bool = False, verbose: bool = False) -> Rendering:
    """Today's ``TTYSink`` rendering: the assistant text on ``stdout``, the rest on ``stderr``."""
    from asm_controller.extensions.rendering import CompactRenderer, Rendering, TTYSink, VerboseRenderer

    renderer = VerboseRenderer() if verbose else CompactRenderer()
    return Rendering(renderer, [TTYSink(stdout, meta_stream=stderr, color=False if no_color else None)])


def run_rendering(stdout: IO[str] | None = None, stderr: IO[str] | None = None, *, no_color: bool = False,
                  verbose: bool = False, run_id: str | None = None, live: bool = True) -> Rendering:
    """The rendering of ``asm run/attach/replay --output text`` (see :func:`asm_cli.ui.run_rendering`)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if use_rich(out, no_color=no_color) and use_rich(err, no_color=no_color):
        from asm_cli import ui

        return ui.run_rendering(out, err, no_color=no_color, verbose=verbose, run_id=run_id, live=live)
    return plain_rendering(out, err, no_color=no_color, verbose=verbose)
