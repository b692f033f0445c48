"""Vocabularies → GGUF ``tokenizer.ggml.*`` metadata: SentencePiece (Gemma) and byte-level
BPE (Qwen, read with gguf-py's ``BpeVocab``).

Token types use SentencePiece's numbering, which GGUF shares (``gguf.TokenType``):
NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6. Gemma 3 needs its
CONTROL and USER_DEFINED types kept (the whitespace-run tokens are USER_DEFINED):
without them llama.cpp tokenizes runs of spaces differently from transformers.

Both vocabularies have exactly one token per embedding row (``vocab_size``): ids no
tokenizer file names are ``[PAD<id>]`` UNUSED tokens, as llama.cpp's convert_hf_to_gguf.py
writes them (``_create_vocab_sentencepiece``, ``get_vocab_base``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import gguf

from ggufserve.converters.checkpoint import Checkpoint
from ggufserve.converters.errors import VocabError

log = logging.getLogger(__name__)

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# Ids without a token (embedding rows past the tokenizer) and the scores llama.cpp's
# converter gives them and the added tokens (convert_hf_to_gguf.py _create_vocab_sentencepiece).
PAD_SCORE = -10_000.0
ADDED_SCORE = -1_000.0
# Added tokens llama.cpp's converter makes CONTROL even when not marked special
# (convert_hf_to_gguf.py does_token_look_special).
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
SPACE_PIECE = "\u2581"  # SentencePiece's "▁"
# tokenizer.json pre-tokenizer split regexes llama.cpp knows, by its pre-tokenizer name
# (llama.cpp src/llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2).
BPE_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


@dataclass
class Vocab:
    """Token texts (SentencePiece pieces, ``▁`` for space), scores and types, by id."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool

    def __len__(self) -> int:
        return len(self.tokens)


def load_sentencepiece_vocab(ckpt: Checkpoint, n_rows: int) -> Vocab:
    """Read ``tokenizer.model`` (preferred) or ``tokenizer.json``, then ``added_tokens.json``
    (USER_DEFINED) and the ``added_tokens_decoder`` of ``tokenizer_config.json`` (special or
    special-looking → CONTROL, other → USER_DEFINED with ``▁`` written as a space; score
    -1000), into ``n_rows`` tokens: ids no file names are ``[PAD<id>]`` UNUSED tokens.

    Added tokens with ids ≥ ``n_rows`` have no embedding row and are left out.

    Raises:
        VocabError: no tokenizer file, an unreadable one, or more base pieces than rows.
    """
    model = ckpt.file("tokenizer.model")
    if model is not None:
        base = _from_sentencepiece_model(model.read_bytes())
    elif ckpt.file("tokenizer.json") is not None:
        base = _from_tokenizer_json(ckpt.json_file("tokenizer.json") or {})
    else:
        raise VocabError("no tokenizer.model or tokenizer.json in the checkpoint")
    if len(base) > n_rows:
        raise VocabError(f"the tokenizer has {len(base)} tokens but vocab_size is {n_rows}")
    vocab = Vocab(
        tokens=base.tokens + [f"[PAD{i}]" for i in range(len(base), n_rows)],
        scores=base.scores + [PAD_SCORE] * (n_rows - len(base)),
        types=base.types + [int(gguf.TokenType.UNUSED)] * (n_rows - len(base)),
        add_space_prefix=base.add_space_prefix,
    )
    for text, token_id in (ckpt.json_file("added_tokens.json") or {}).items():
        _apply_added(vocab, token_id, {"content": text, "special": False}, guess=False)
    config = ckpt.json_file("tokenizer_config.json") or {}
    decoder = config.get("added_tokens_decoder") or {}
    for key, token in sorted(decoder.items(), key=lambda item: int(item[0])):
        _apply_added(vocab, int(key), token, guess=True)
    return vocab


def _from_sentencepiece_model(data: bytes) -> Vocab:
    # The protobuf keeps every piece's type (USER_DEFINED included, which the
    # SentencePieceProcessor API does not expose).
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError and friends
        raise VocabError("tokenizer.model is not a SentencePiece model") from None
    if not proto.pieces:
        raise VocabError("tokenizer.model has no pieces")
    return Vocab(
        tokens=[p.piece for p in proto.pieces],
        scores=[float(p.score) for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
    )


def _from_tokenizer_json(data: dict[str, Any]) -> Vocab:
    """A byte-fallback BPE ``tokenizer.json`` (as Gemma ships) in SentencePiece form:
    scores are minus the rank among normal pieces, as in Gemma's ``tokenizer.model``."""
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise VocabError("tokenizer.json is not a byte-fallback BPE vocabulary")
    by_id = sorted((int(i), str(t)) for t, i in vocab.items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise VocabError("tokenizer.json vocabulary ids are not contiguous")
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    rank = 0
    for _, text in by_id:
        tokens.append(text)
        if BYTE_PIECE.match(text):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            scores.append(-float(rank))
            rank += 1
    unk = model.get("unk_token")
    if unk in vocab:
        types[int(vocab[unk])] = gguf.TokenType.UNKNOWN
    return Vocab(tokens, scores, types, add_space_prefix=False)


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter types CONTROL although not marked special
    (``<|...|>``, ``<unused...>``, ``<pad>``, ``<mask>``, ...)."""
    return (
        text in LOOKS_SPECIAL
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def added_token(text: str, special: bool) -> tuple[str, int]:
    """(text, type) of an added token: CONTROL if special or special-looking; otherwise
    USER_DEFINED with ``▁`` written as a space (llama.cpp matches user-defined tokens
    against raw text)."""
    if special or looks_special(text):
        return text, int(gguf.TokenType.CONTROL)
    return text.replace(SPACE_PIECE, " "), int(gguf.TokenType.USER_DEFINED)


def _apply_added(vocab: Vocab, token_id: Any, token: dict[str, Any], *, guess: bool) -> None:
    content = token.get("content")
    if not isinstance(content, str) or not isinstance(token_id, int) or token_id < 0:
        raise VocabError(f"added token {token_id!r} has no 'content' or a bad id")
    if token_id >= (n := len(vocab)):
        # No embedding row (Gemma 3 1B/270M list <image_soft_token> 262144 with
        # vocab_size 262144): left out, as llama.cpp's converter does.
        log.warning("added token %d %r is past vocab_size %d: left out", token_id, content, n)
        return
    if vocab.types[token_id] == gguf.TokenType.BYTE:
        return  # a byte-fallback piece stays a byte (typing it CONTROL breaks decoding)
    # added_tokens.json has no special flag (not ``guess``): user-defined as it is.
    text, kind = (
        added_token(content, bool(token.get("special")))
        if guess
        else (content, int(gguf.TokenType.USER_DEFINED))
    )
    vocab.tokens[token_id] = text
    vocab.scores[token_id] = ADDED_SCORE
    vocab.types[token_id] = kind


def load_bpe_vocab(ckpt: Checkpoint, n_vocab_rows: int) -> tuple[Vocab, str]:
    """A byte-level BPE ``tokenizer.json`` (gguf-py ``BpeVocab``) and its llama.cpp
    pre-tokenizer name. Added tokens are CONTROL when ``special`` or special-looking, else
    USER_DEFINED (as llama.cpp's converter, :func:`added_token`); ids up to
    ``n_vocab_rows`` (the embedding rows, e.g. 151,936 for 151,669 tokens) are filled with
    ``[PAD<id>]`` UNUSED tokens so rows == tokens.

    Raises:
        VocabError: no tokenizer.json, not byte-level BPE, added-token ids with gaps, a
            pre-tokenizer regex llama.cpp does not know, or more tokens than rows.
    """
    path = ckpt.file("tokenizer.json")
    if path is None:
        raise VocabError("no tokenizer.json in the checkpoint")
    try:
        bpe = gguf.vocab.BpeVocab(path.parent)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VocabError(f"tokenizer.json is not a byte-level BPE vocabulary ({exc})") from None
    specials = {t.get("content") for t in data.get("added_tokens") or [] if t.get("special")}
    tokens: list[str] = []
    types: list[int] = []
    for text, _, kind in bpe.all_tokens():
        # BpeVocab yields base tokens as str and added tokens as UTF-8 bytes.
        token = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        token_type = int(kind)
        if kind == gguf.TokenType.CONTROL:  # an added token
            token, token_type = added_token(token, token in specials)
        tokens.append(token)
        types.append(token_type)
    if len(tokens) > n_vocab_rows:
        raise VocabError(f"tokenizer.json has {len(tokens)} tokens but only {n_vocab_rows} rows")
    for token_id in range(len(tokens), n_vocab_rows):
        tokens.append(f"[PAD{token_id}]")
        types.append(gguf.TokenType.UNUSED)
    vocab = Vocab(tokens, [0.0] * len(tokens), types, add_space_prefix=False)
    return vocab, _pre_tokenizer(data)


def _pre_tokenizer(data: dict[str, Any]) -> str:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    for step in steps:
        pattern = (step.get("pattern") or {}) if isinstance(step, dict) else {}
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex in BPE_PRE_TOKENIZERS:
            return BPE_PRE_TOKENIZERS[regex]
    raise VocabError("tokenizer.json's pre-tokenizer is not one llama.cpp knows (qwen2)")


def chat_template(ckpt: Checkpoint) -> str | None:
    """The chat template, from (in this order) ``chat_template.jinja`` (transformers 5),
    ``chat_template.json``, or ``tokenizer_config.json``'s ``chat_template``.

    Raises:
        VocabError: a template file that cannot be read.
    """
    jinja = ckpt.file("chat_template.jinja")
    if jinja is not None:
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise VocabError("chat_template.jinja is not readable UTF-8") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        value = (ckpt.json_file(name) or {}).get("chat_template")
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # named templates: keep the default one
            for item in value:
                if isinstance(item, dict) and item.get("name") == "default":
                    return str(item.get("template"))
    return None


def write_vocab(writer: gguf.GGUFWriter, ckpt: Checkpoint, vocab: Vocab) -> None:
    """Write the SentencePiece vocabulary, special token ids, add-BOS/EOS flags and chat
    template (``gguf.SpecialVocab`` reads the ids and the EOS flag from the tokenizer and
    config files). BOS is always added: transformers 5 saves Gemma tokenizers with
    ``add_bos_token`` false, and the model needs BOS. No EOT id is written: llama.cpp finds
    ``<end_of_turn>`` by its text, and llama.cpp's converter writes none."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    _write_special(writer, ckpt, vocab, merges=False, add={"bos": True})


def write_bpe_vocab(writer: gguf.GGUFWriter, ckpt: Checkpoint, vocab: Vocab, pre: str) -> None:
    """Write a byte-level BPE vocabulary (``gpt2`` model, ``pre`` pre-tokenizer), its
    merges, special token ids and chat template. Neither BOS nor EOS is added: Qwen's
    ``ByteLevel`` post-processor adds none (llama.cpp's gguf-py ``SpecialVocab`` reads it so,
    whatever ``tokenizer_config.json`` says)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    _write_special(writer, ckpt, vocab, merges=True, add={"bos": False, "eos": False})


def _write_special(
    writer: gguf.GGUFWriter, ckpt: Checkpoint, vocab: Vocab, *, merges: bool, add: dict[str, bool]
) -> None:
    special = gguf.SpecialVocab(ckpt.root, load_merges=merges, n_vocab=len(vocab))
    if merges and not special.merges:
        raise VocabError("tokenizer.json has no BPE merges")
    special.chat_template = chat_template(ckpt)
    special.add_special_token.update(add)
    special.add_to_gguf(writer, quiet=True)
