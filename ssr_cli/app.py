"""The `ssr` command line: parse, call, print. User errors end as one line and exit code 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from ssr_cache.errors import SSRError
from ssr_cli.cache_commands import cache_app
from ssr_cli.data_commands import data_app
from ssr_cli.run_commands import register_run_commands

app = typer.Typer(
    name="ssr",
    help="SSR (SAM is a Strong Regularizer) with an offline SAM-feature cache: build the cache once, "
    "train DAFormer/MIC + SSR from it, evaluate the shadow branch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")
register_run_commands(app)

err_console = Console(stderr=True)


def main() -> None:
    try:
        app()
    except SSRError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
