"""UDA methods behind one contract (methods/contract.py), in a dict registry: name -> Method subclass."""

from __future__ import annotations

from ssr_train.methods.contract import Method
from ssr_train.methods.daformer import DAFormer
from ssr_train.methods.mic import MIC
from ssr_train.methods.source_only import SourceOnly

METHODS: dict[str, type[Method]] = {"source-only": SourceOnly, "daformer": DAFormer, "mic": MIC}


def method_config_sections() -> dict[str, type]:
    """Every method's own config sections ({"daformer": DAFormerConfig, "mic": MICConfig}), in order."""
    sections: dict[str, type] = {}
    for method in METHODS.values():
        for name, cls in method.config_sections.items():
            if sections.setdefault(name, cls) is not cls:
                raise TypeError(f"config section [{name}] is claimed by two different classes")
    return sections
