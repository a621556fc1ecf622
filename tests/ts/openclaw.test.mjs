// OpenClaw's three provider kinds (../shared/clients/openclaw.md) with the official TypeScript
// `openai` package, against the real server and Qwen: the bundled `lmstudio` provider's REST
// preload, a custom chat-completions provider (developer role, content-part arrays,
// max_completion_tokens, usage in the stream), and an openai-responses provider (flat tools,
// the event sequence it counts on, function_call_output).
import { test } from "node:test";
import assert from "node:assert/strict";
import { OpenAI, QWEN, startServer } from "./server.mjs";

const readFile = {
  name: "read_file", description: "Read a file from disk",
  parameters: { type: "object", properties: { path: { type: "string" } }, required: ["path"] },
};

test("OpenClaw's lmstudio, chat-completions and responses providers", async () => {
  const { proc, base } = await startServer({ load: false });
  try {
    // 1. The bundled lmstudio provider: discovery, then a best-effort preload.
    const headers = { authorization: "Bearer lmstudio", "content-type": "application/json" };
    const listed = await (await fetch(`${base}/api/v1/models`, { headers })).json();
    assert.ok(listed.models.some((m) => m.key === QWEN && m.loaded_instances.length === 0));
    const load = await fetch(`${base}/api/v1/models/load`, {
      method: "POST", headers, body: JSON.stringify({ model: QWEN }) });
    assert.equal(load.status, 200);
    assert.equal((await load.json()).status, "loaded");

    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "lmstudio", maxRetries: 0 });

    // 2. A custom chat-completions provider for a reasoning-marked model.
    const stream = await client.chat.completions.create({
      model: QWEN, stream: true, stream_options: { include_usage: true },
      max_completion_tokens: 100000, store: false, reasoning_effort: "low", temperature: 0,
      tools: [{ type: "function", function: readFile }], tool_choice: "auto",
      messages: [
        { role: "developer", content: "You are a helpful assistant. Use tools when asked." },
        { role: "user", content: [{ type: "text", text: "read the file" }, { type: "text", text: "README.md" }] },
      ],
    });
    const calls = new Map();
    let usage = null;
    let finish = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      const c = chunk.choices[0];
      if (!c) continue;
      for (const tc of c.delta.tool_calls ?? []) {
        // OpenClaw groups deltas by id changes; ids come once, first.
        if (tc.id) calls.set(tc.id, { name: tc.function.name, args: "" });
        const last = [...calls.values()].at(-1);
        last.args += tc.function?.arguments ?? "";
      }
      finish = c.finish_reason ?? finish;
    }
    assert.equal(finish, "tool_calls");
    assert.equal(calls.size, 1);
    const [[callId, call]] = [...calls.entries()];
    assert.equal(call.name, "read_file");
    assert.deepEqual(JSON.parse(call.args), { path: "README.md" });
    assert.ok(usage.prompt_tokens > 50 && usage.completion_tokens > 0, JSON.stringify(usage));

    // 3. An openai-responses provider: flat tools, events counted as OpenClaw counts them.
    const flat = [{ type: "function", ...readFile, strict: false }];
    const input = [{ type: "message", role: "user",
      content: [{ type: "input_text", text: "read the file README.md" }] }];
    const events = [];
    const rstream = await client.responses.create({
      model: QWEN, input, tools: flat, instructions: "Use tools when asked.", store: false,
      prompt_cache_key: "bot-1", max_output_tokens: 200, stream: true, temperature: 0,
    });
    for await (const e of rstream) events.push(e);
    const types = events.map((e) => e.type);
    assert.equal(types[0], "response.created");
    assert.equal(types.at(-1), "response.completed");
    const added = events.find((e) => e.type === "response.output_item.added");
    assert.equal(added.item.type, "function_call");
    assert.equal(added.item.name, "read_file");
    assert.match(added.item.call_id, /^call_\w+$/);
    const deltas = events.filter((e) => e.type === "response.function_call_arguments.delta")
      .map((e) => e.delta).join("");
    const done = events.find((e) => e.type === "response.function_call_arguments.done");
    assert.equal(done.arguments, deltas, "the .done event carries the full arguments");
    assert.deepEqual(JSON.parse(done.arguments), { path: "README.md" });
    assert.ok(types.includes("response.output_item.done"));
    const completed = events.at(-1).response;
    assert.ok(completed.usage.input_tokens > 50 && completed.usage.output_tokens > 0);
    assert.deepEqual(events.map((e) => e.sequence_number), events.map((_, i) => i));

    // The tool's output goes back as function_call_output; the answer is text, and text
    // events come after a message item and its content part, as OpenClaw requires.
    const follow = [];
    const fstream = await client.responses.create({
      model: QWEN, tools: flat, store: false, stream: true, temperature: 0, max_output_tokens: 120,
      input: [...input,
        { type: "function_call", call_id: added.item.call_id, name: "read_file", arguments: done.arguments },
        { type: "function_call_output", call_id: added.item.call_id,
          output: "# opta-lmx\nA headless inference server written in Rust." },
        { type: "message", role: "user", content: [{ type: "input_text", text: "In one sentence, what is in that file?" }] }],
    });
    for await (const e of fstream) follow.push(e);
    const ftypes = follow.map((e) => e.type);
    const firstText = ftypes.indexOf("response.output_text.delta");
    assert.ok(firstText > 0, ftypes.join(","));
    const msgAdded = follow.findIndex((e) => e.type === "response.output_item.added" && e.item.type === "message");
    const partAdded = ftypes.indexOf("response.content_part.added");
    assert.ok(msgAdded >= 0 && msgAdded < partAdded && partAdded < firstText, ftypes.join(","));
    const text = follow.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("");
    assert.match(text.toLowerCase(), /server/);
    assert.equal(follow.at(-1).response.output_text ?? text, text);
    assert.ok(callId.length > 5);
  } finally {
    proc.kill();
  }
});
