"""OpenAI's Responses API through the official Python SDK (real Qwen model): whole and
streamed answers, stored conversations continued with previous_response_id, structured
output, and the errors."""

import json

import openai
import pytest

from conftest import QWEN


@pytest.fixture
def client(qwen_server):
    return openai.OpenAI(base_url=qwen_server + "/v1", api_key="not-needed", max_retries=0)


def test_a_stored_conversation_continues_from_its_previous_response(client):
    first = client.responses.create(
        model=QWEN, instructions="Answer in as few words as possible.", temperature=0,
        input="My cat is called Mochi. Just say OK.", max_output_tokens=20)
    assert first.status == "completed" and first.object == "response"
    assert first.output[0].type == "message" and first.output_text
    assert first.usage.input_tokens > 10 and first.usage.output_tokens > 0
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    # Stored (the default): retrievable, and the next turn sees the conversation.
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(
        model=QWEN, previous_response_id=first.id, temperature=0, max_output_tokens=20,
        input="What is my cat called?")
    assert "mochi" in second.output_text.lower()
    assert second.usage.input_tokens > first.usage.input_tokens
    # store: false keeps nothing.
    unstored = client.responses.create(model=QWEN, input="Hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=QWEN, input="Hi", previous_response_id=unstored.id)


def test_streamed_text_and_structured_output(client):
    with client.responses.stream(model=QWEN, input="Name three colours.", temperature=0,
                                 max_output_tokens=40) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.output_text
    # Cut at max_output_tokens: incomplete, with the reason.
    # Greedy: a sampled answer may end on its own inside five tokens (seen once in a suite run).
    cut = client.responses.create(model=QWEN, input="Count from 1 to 100.", max_output_tokens=5,
                                  temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    r = client.responses.create(
        model=QWEN, input="Pick a colour.", temperature=1.0, max_output_tokens=40, extra_body={"seed": 3},
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}})
    assert json.loads(r.output_text)["colour"] in ("red", "green", "blue")


def test_function_calls_and_errors(client):
    tools = [{"type": "function", "name": "read_file", "description": "Read a file",
              "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                             "required": ["path"]}, "strict": False}]
    r = client.responses.create(model=QWEN, input="read the file README.md", tools=tools,
                                tool_choice="required", temperature=0, max_output_tokens=60)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "read_file" and call.call_id.startswith("call_")
    assert "path" in json.loads(call.arguments)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=QWEN, input=[{"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    assert "input_image" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=QWEN, input="hi", tools=[{"type": "web_search_preview"}])
    assert e.value.body["param"] == "tools[0]"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="hi")
