"""An agent framework's own client against the server: langchain-openai's ``bind_tools``
runs a tool round trip and ``with_structured_output`` returns a pydantic object."""

from __future__ import annotations

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.conftest import API_KEY, RunningServer
from tests.e2e.conftest import MODEL


@tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return f"18 degrees and sunny in {city}"


class City(BaseModel):
    name: str
    country: str


def chat_model(server: RunningServer) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.v1,
        api_key=API_KEY,  # type: ignore[arg-type]
        model=MODEL,
        temperature=0,
        max_tokens=96,  # type: ignore[call-arg]
        max_retries=0,
    )


def test_bind_tools_round_trip(server: RunningServer) -> None:
    llm = chat_model(server)
    question = HumanMessage("What is the weather in Paris?")
    call_message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    [call] = call_message.tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    result = get_weather.invoke(call)
    answer = llm.bind_tools([get_weather]).invoke([question, call_message, result])
    assert isinstance(answer.content, str)
    assert answer.content or answer.tool_calls  # type: ignore[attr-defined]


def test_with_structured_output(server: RunningServer) -> None:
    llm = chat_model(server).with_structured_output(City, method="json_schema")
    city = llm.invoke("Name a city in Japan.")
    assert isinstance(city, City)
