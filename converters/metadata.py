"""``general.*`` provenance keys, filled as llama.cpp's convert_hf_to_gguf.py fills them
(``ModelBase.prepare_metadata``): gguf-py's ``gguf.Metadata`` heuristics over the model
card (``README.md``), ``config.json``, ``generation_config.json`` and the folder name.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from ggufserve.converters.checkpoint import Checkpoint
from ggufserve.converters.errors import CheckpointError


def general_metadata(
    ckpt: Checkpoint,
    counts: tuple[int, int, int, int],
    *,
    name: str | None,
    repo_id: str | None,
) -> gguf.Metadata:
    """The ``general.*`` metadata of one output.

    Args:
        ckpt: The checkpoint (its folder is the model card's).
        counts: ``GGUFWriter.get_total_parameter_count()`` of the output: (total, shared,
            expert, expert count) parameters; ``general.size_label`` is made from it.
        name: ``general.name`` given by the user (as llama.cpp's ``--model-name``), or None
            for the heuristics (model card, ``_name_or_path``, then the folder name).
        repo_id: The Hugging Face repo id the checkpoint was fetched from, or None. Like
            llama.cpp's ``--remote`` it names the model, and it is written as
            ``general.source.repo_url`` unless the model card says otherwise.

    Returns:
        A ``gguf.Metadata`` to write with ``set_gguf_meta_model``.
    """
    total, shared, expert, n_expert = counts
    meta = gguf.Metadata.load(None, ckpt.root, name, total)
    if repo_id is not None:
        meta.name = name or repo_id
        if meta.source_repo_url is None:
            meta.source_repo_url = f"https://huggingface.co/{repo_id}"
    if meta.name is None:
        meta.name = Path(ckpt.root).name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    # Newer gguf-py (the one llama.cpp's converter ships) also reads HF's name for it.
    try:
        generation = ckpt.json_file("generation_config.json") or {}
    except CheckpointError:  # gguf.Metadata skips an unreadable one too
        generation = {}
    if meta.sampling_penalty_repeat is None and "penalty_repeat" not in generation:
        meta.sampling_penalty_repeat = generation.get("repetition_penalty")
    return meta
