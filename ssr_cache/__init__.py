"""Offline SAM feature cache: datasets, view planning, frozen SAM encoder, Zarr store, build pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ssr")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
