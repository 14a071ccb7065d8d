"""`ssr train`, `ssr eval`, `ssr demo`."""

from __future__ import annotations

import typer

from ssr_cache.errors import SSRError
from ssr_cli.train_command import train

_LOOSE = {"ignore_unknown_options": True, "allow_extra_args": True}


def register_run_commands(app: typer.Typer) -> None:
    app.command("train")(train)

    @app.command("eval", context_settings=_LOOSE)
    def evaluate() -> None:
        """Evaluate the shadow branch of a run on a validation split."""
        raise SSRError("`ssr eval` is not available yet (tracked in the eval issue)")

    @app.command("demo", context_settings=_LOOSE)
    def demo() -> None:
        """Synthetic end-to-end demo: data, caches, training, evaluation."""
        raise SSRError("`ssr demo` is not available yet; run `ssr data synth --out DIR` meanwhile")
