"""The `ssr` command line."""
