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


def test_required_and_named_tool_choices_always_give_a_valid_call(client):
    import jsonschema

    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    # The model would rather chat: `required` makes it call one of the tools anyway.
    r = client.chat.completions.create(
        model=QWEN, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0,
        messages=[{"role": "user", "content": "Say hello to me."}])
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    assert call.function.name in params
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    # A named function is the one called, streamed too.
    named = {"type": "function", "function": {"name": "list_dir"}}
    with client.beta.chat.completions.stream(
            model=QWEN, tools=TOOLS, tool_choice=named, max_tokens=80, temperature=0,
            messages=[{"role": "user", "content": "Say hello to me."}]) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "list_dir"
    jsonschema.validate(json.loads(call.function.arguments), params["list_dir"])
    # A name that is not offered is the client's mistake.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=QWEN, tools=TOOLS, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
            tool_choice={"type": "function", "function": {"name": "delete_everything"}})
    assert e.value.body["param"] == "tool_choice"


CAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "colors": {"type": "array", "items": {"enum": ["black", "white", "orange"]},
                   "minItems": 1, "maxItems": 3},
        "indoor": {"type": "boolean"},
    },
    "required": ["name", "age", "colors", "indoor"],
    "additionalProperties": False,
}


def test_json_schema_output_always_validates_over_many_seeds(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "strict": True, "schema": CAT}}
    for seed in range(8):
        r = client.chat.completions.create(
            model=QWEN, response_format=fmt, max_tokens=200, temperature=1.0, seed=seed,
            messages=[{"role": "user", "content": "Invent a cat."}])
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), CAT)
    # json_object: any object, streamed.
    stream = client.chat.completions.create(
        model=QWEN, response_format={"type": "json_object"}, max_tokens=300, temperature=0,
        stream=True, messages=[{"role": "user", "content": "A cat's name and age, please."}])
    parts, finish = [], None
    for c in stream:
        if c.choices:
            parts.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
    assert finish == "stop", "".join(parts)
    assert isinstance(json.loads("".join(parts)), dict)
    # A schema feature the grammar cannot enforce is named in a 400.
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"id": {"type": "string", "pattern": "[0-9]+"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=QWEN, response_format=bad, max_tokens=8,
                                       messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "response_format"
    assert "pattern" in e.value.body["message"]


# Qwen2.5's `<tool_call>` token (added token 151657 of its vocabulary).
QWEN_TOOL_CALL_TOKEN = "151657"


def test_auto_keeps_a_started_call_valid(client):
    """Under `auto`, a lazy grammar switches on at `<tool_call>`: whatever the model writes after
    the marker is a valid call. Biasing the marker token hard makes the model start a call at
    once and, left alone, write nothing but more markers; the grammar turns it into one valid
    call, and with parallel calls off, the answer ends there."""
    import jsonschema

    weather = {"type": "function", "function": {
        "name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"enum": ["Oslo", "Paris"]}},
            "required": ["city"], "additionalProperties": False}}}
    kwargs = dict(model=QWEN, tools=[weather], tool_choice="auto", parallel_tool_calls=False,
                  temperature=0, max_tokens=60, logit_bias={QWEN_TOOL_CALL_TOKEN: 100},
                  messages=[{"role": "user", "content": "What is the weather like in Paris?"}])
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "tool_calls", r
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        weather["function"]["parameters"])
    # Without tools the same bias gives only markers: the grammar did the work above.
    plain = client.chat.completions.create(
        **{**kwargs, "tools": None, "tool_choice": None, "parallel_tool_calls": None})
    assert plain.choices[0].finish_reason == "length"
    assert plain.choices[0].message.content.count("<tool_call>") > 10


def test_auto_offers_tools_whose_schemas_no_grammar_can_enforce(client):
    """OpenClaw's tools use schema features the grammar cannot express. Under `auto` the lazy
    grammar is a safety net the client never asked for, so such tools are still offered
    (200); `required` promises a valid call, so there it is a 400 naming the feature."""
    odd = {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"id": {"type": "string", "pattern": "[0-9]+"}},
        "patternProperties": {"^x-": {"type": "string"}}}}}
    r = client.chat.completions.create(
        model=QWEN, tools=TOOLS + [odd], tool_choice="auto", max_tokens=40, temperature=0,
        messages=[{"role": "user", "content": "read the file README.md"}])
    assert r.choices[0].finish_reason in ("tool_calls", "stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=QWEN, tools=[odd], tool_choice="required", max_tokens=8,
            messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "tool_choice"
    assert "pattern" in e.value.body["message"]
