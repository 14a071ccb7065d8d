"""`ssr train`, `ssr eval`, `ssr demo`."""

from __future__ import annotations

import typer

from ssr_cli.demo_command import demo
from ssr_cli.eval_command import evaluate_command
from ssr_cli.train_command import train


def register_run_commands(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate_command)
    app.command("demo")(demo)
