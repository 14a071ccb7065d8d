"""`ssr train`, `ssr eval`, `ssr compare`, `ssr predict`, `ssr export`, `ssr demo`, `ssr plot`."""

from __future__ import annotations

import typer

from ssr_cli.compare_command import compare_command
from ssr_cli.demo_command import demo
from ssr_cli.eval_command import evaluate_command
from ssr_cli.export_command import export
from ssr_cli.plot_command import plot
from ssr_cli.predict_command import predict
from ssr_cli.train_command import train


def register_run_commands(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate_command)
    app.command("compare")(compare_command)
    app.command("predict")(predict)
    app.command("export")(export)
    app.command("demo")(demo)
    app.command("plot")(plot)
