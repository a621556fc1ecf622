"""Tool calls through the official `openai` Python SDK, with the real Qwen model: the agent
loop the coding CLI runs (call, tool result, answer), streamed through the SDK's own helper."""

import json

import openai
import pytest

from conftest import QWEN

TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file from disk",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "list_dir", "description": "List a directory",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}},
]


@pytest.fixture
def client(qwen_server):
    return openai.OpenAI(base_url=qwen_server + "/v1", api_key="not-needed", max_retries=0)


def test_agent_turn_streamed_through_the_sdk_helper_matches_the_whole_answer(client):
    messages = [{"role": "user", "content": "read the file README.md"}]
    kwargs = dict(model=QWEN, messages=messages, tools=TOOLS, tool_choice="auto",
                  temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "read_file"
    assert json.loads(call.function.arguments) == {"path": "README.md"}

    # The SDK's stream helper reassembles the deltas into the same call.
    with client.beta.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    [scall] = streamed.message.tool_calls
    assert scall.id.startswith("call_") and scall.id != call.id
    assert (scall.function.name, scall.function.arguments) == (
        call.function.name, call.function.arguments)

    # The tool's result goes back; the model answers in text.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id,
         "content": "# opta-lmx\nA headless inference server written in Rust."},
        {"role": "user", "content": "In one sentence, what is in that file?"},
    ]
    answer = client.chat.completions.create(**{**kwargs, "messages": messages})
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    assert "server" in answer.choices[0].message.content.lower()
