"""Registry: HF ``architectures`` name → (text converter, mmproj converter or None)."""

from __future__ import annotations

from ggufserve.converters.arch.base import Converter
from ggufserve.converters.arch.gemma3 import Gemma3Text, Gemma3Vision
from ggufserve.converters.arch.qwen3_vl import Qwen3VLMoeText, Qwen3VLText, Qwen3VLVision

ARCHITECTURES: dict[str, tuple[type[Converter], type[Converter] | None]] = {
    "Gemma3ForCausalLM": (Gemma3Text, None),
    "Gemma3ForConditionalGeneration": (Gemma3Text, Gemma3Vision),
    "Qwen3VLForConditionalGeneration": (Qwen3VLText, Qwen3VLVision),
    "Qwen3VLMoeForConditionalGeneration": (Qwen3VLMoeText, Qwen3VLVision),
}
