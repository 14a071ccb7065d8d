"""`python -m ssr_cli …` (what torchrun launches) is the same as the `ssr` console script."""

from ssr_cli.app import main

main()
