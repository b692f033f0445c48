"""``/v1/embeddings`` over HTTP with the bundled model served with ``embeddings: true``."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.conftest import RunningServer, model_entry

MODEL = "gemma-embed"


@pytest.fixture(scope="module")
def sdk(
    server_factory: Callable[..., RunningServer], bundled_gguf: Path
) -> Iterator[openai.OpenAI]:
    server = server_factory(
        [model_entry(MODEL, bundled_gguf, n_ctx=512, n_parallel=1, embeddings=True)],
        api_key=None,
    )
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0) as client:
        yield client


def test_identical_inputs_have_cosine_one(sdk: openai.OpenAI) -> None:
    texts = ["A cat sits on the mat.", "A cat sits on the mat.", "Quarterly revenue rose 4%."]
    response = sdk.embeddings.create(model=MODEL, input=texts)
    vectors = [np.array(d.embedding) for d in response.data]
    assert [d.index for d in response.data] == [0, 1, 2]
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(vectors[0] @ vectors[2]) < 0.999
    assert all(np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)
    assert response.usage.prompt_tokens > 0


def test_base64_encoding(
    sdk: openai.OpenAI,
) -> None:
    plain = sdk.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    raw = sdk.embeddings.with_raw_response.create(
        model=MODEL, input="hello", encoding_format="base64"
    ).http_response.json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, plain.data[0].embedding, atol=1e-6)


def test_chat_still_works_beside_embeddings(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None


def test_model_without_embeddings_is_refused(server: RunningServer) -> None:
    with (
        openai.OpenAI(base_url=server.v1, api_key="test-key", max_retries=0) as client,
        pytest.raises(openai.BadRequestError) as info,
    ):
        client.embeddings.create(model="gemma-3-270m", input="x")
    assert "embeddings" in str(info.value)
