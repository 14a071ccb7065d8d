"""UDA methods: a dict registry of classes with a uniform `step(...)` interface."""

from __future__ import annotations

from ssr_train.methods.daformer import MIC, DAFormer
from ssr_train.methods.source_only import SourceOnly

METHODS = {"source-only": SourceOnly, "daformer": DAFormer, "mic": MIC}
