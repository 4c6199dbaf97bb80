"""One description per HF model family (`ArchitectureFamily`), registered by its own module.

    llama.py     LlamaForCausalLM    Llama-2/3/3.1/3.2, TinyLlama, SmolLM2 (the layout the others reuse)
    qwen2.py     Qwen2ForCausalLM    Qwen2, Qwen2.5 (QKV bias)
    mistral.py   MistralForCausalLM  Mistral-7B v0.2/v0.3 (sliding window must be off)

Adding a family = one module here that registers an `ArchitectureFamily` (its names, config.json
quirks and weight table: docs/conversion.md walks through it) + its import below. Presets, the
config.json reader, the weight loader and the export then know it. This package imports nothing
else of the project and no torch: model/presets.py reads it.
"""

from megatron_solopo.model.families.family import (
    ArchitectureFamily,
    WindowSwitch,
    family_names,
    get_family,
    register_family,
    registered_families,
)
from megatron_solopo.model.families.tables import WeightTable

# each import registers its family; the order is the order errors and listings use
from megatron_solopo.model.families import llama  # noqa: F401  isort: skip
from megatron_solopo.model.families import qwen2  # noqa: F401  isort: skip
from megatron_solopo.model.families import mistral  # noqa: F401  isort: skip

__all__ = [
    "ArchitectureFamily",
    "WeightTable",
    "WindowSwitch",
    "family_names",
    "get_family",
    "register_family",
    "registered_families",
]
