"""Registry: HF ``architectures`` name → (text converter, mmproj converter or None)."""

from __future__ import annotations

from converters.arch.base import Converter
from converters.arch.gemma3 import Gemma3Text, Gemma3Vision

ARCHITECTURES: dict[str, tuple[type[Converter], type[Converter] | None]] = {
    "Gemma3ForCausalLM": (Gemma3Text, None),
    "Gemma3ForConditionalGeneration": (Gemma3Text, Gemma3Vision),
}
