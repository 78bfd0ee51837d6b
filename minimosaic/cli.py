"""The `minimosaic` command line: a thin Typer layer that turns options into calls of the modules.

User mistakes raise MinimosaicError; `main()` prints its one-line message and exits with code 2.
"""
import sys

import typer

from . import __version__
from .errors import MinimosaicError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="minimosaic: train, sample and inspect Memory Mosaics (and a GPT baseline) "
                       "built from scratch on NumPy/CuPy.")


@app.callback()
def _root():
    """minimosaic: train, sample and inspect Memory Mosaics (and a GPT baseline) on NumPy/CuPy."""


@app.command()
def version():
    """Print the minimosaic version."""
    typer.echo(__version__)


def main():
    """Entry point: Typer handles usage errors (exit 2); a MinimosaicError becomes one line, exit 2."""
    try:
        app()
    except MinimosaicError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
