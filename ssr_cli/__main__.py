"""`python -m ssr_cli …` (what torchrun launches) is the same as the `ssr` console script."""

from ssr_cli.app import main

if __name__ == "__main__":
    main()
