"""Anthropic's Messages API through the official `anthropic` Python SDK (real Qwen model):
text, streaming, a tool round trip, count_tokens, and Anthropic-shaped errors."""

import anthropic
import pytest

from conftest import QWEN

# Greedy, so whole and streamed answers match (this SDK version sends `temperature` only
# through extra_body; the server reads it as Anthropic's API defines it).
GREEDY = {"extra_body": {"temperature": 0}}

TOOLS = [{"name": "read_file", "description": "Read a file from disk",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                           "required": ["path"]}}]


@pytest.fixture
def client(qwen_server):
    return anthropic.Anthropic(base_url=qwen_server, api_key="not-needed", max_retries=0)


def test_text_and_streaming(client):
    m = client.messages.create(model=QWEN, max_tokens=30, system="Be brief.", **GREEDY,
                               messages=[{"role": "user", "content": "Say hello."}])
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "end_turn"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.usage.input_tokens > 5 and m.usage.output_tokens > 0
    with client.messages.stream(model=QWEN, max_tokens=30, system="Be brief.", **GREEDY,
                                messages=[{"role": "user", "content": "Say hello."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text == final.content[0].text
    assert final.usage.output_tokens == m.usage.output_tokens
    cut = client.messages.create(model=QWEN, max_tokens=3,
                                 messages=[{"role": "user", "content": "Count to 100."}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def test_tool_round_trip_streamed(client):
    messages = [{"role": "user", "content": "read the file README.md"}]
    with client.messages.stream(model=QWEN, max_tokens=100, tools=TOOLS, **GREEDY,
                                messages=messages) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [use] = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "read_file" and use.input == {"path": "README.md"}
    assert use.id.startswith("toolu_")
    whole = client.messages.create(model=QWEN, max_tokens=100, tools=TOOLS, **GREEDY,
                                   messages=messages)
    assert [(b.name, b.input) for b in whole.content if b.type == "tool_use"] == [
        (use.name, use.input)]
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id,
             "content": "# opta-lmx\nA headless inference server written in Rust."},
            {"type": "text", "text": "In one sentence, what is in that file?"}]},
    ]
    answer = client.messages.create(model=QWEN, max_tokens=80, tools=TOOLS, **GREEDY,
                                    messages=messages)
    assert answer.stop_reason == "end_turn"
    assert "server" in answer.content[0].text.lower()
    forced = client.messages.create(model=QWEN, max_tokens=60, tools=TOOLS,
                                    tool_choice={"type": "tool", "name": "read_file"},
                                    messages=[{"role": "user", "content": "Say hello."}])
    assert forced.stop_reason == "tool_use"


def test_count_tokens_and_errors(client):
    n = client.messages.count_tokens(model=QWEN, messages=[{"role": "user", "content": "Hi"}])
    m = client.messages.create(model=QWEN, max_tokens=1,
                               messages=[{"role": "user", "content": "Hi"}])
    assert n.input_tokens == m.usage.input_tokens > 0
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-opus-4", max_tokens=5,
                               messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=QWEN, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "image" in e.value.body["error"]["message"]
