"""The `crashbench` command line: one typer app; each command lives in the layer it drives."""
from __future__ import annotations

import typer

app = typer.Typer(
    help="crashbench: compare ways of surviving an operating-system kernel crash.",
    no_args_is_help=True,
    add_completion=False,
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
