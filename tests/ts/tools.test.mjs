// The agent turn with the official TypeScript `openai` package, as the coding CLI and the bots
// run it: streamed, through the SDK's own stream helper, against the real server and the real
// Qwen model. Run by scripts/test.sh with `node --test` (the package lives in target/node).
import { test } from "node:test";
import assert from "node:assert/strict";
import { OpenAI, QWEN, startServer } from "./server.mjs";

const tools = [
  { type: "function", function: { name: "read_file", description: "Read a file from disk",
    parameters: { type: "object", properties: { path: { type: "string" } }, required: ["path"] } } },
  { type: "function", function: { name: "list_dir", description: "List a directory",
    parameters: { type: "object", properties: { path: { type: "string" } }, required: ["path"] } } },
];

test("a streamed agent turn through the TypeScript SDK's helper", async () => {
  const { proc, base } = await startServer();
  try {
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "lmstudio", maxRetries: 0 });
    const messages = [{ role: "user", content: "read the file README.md" }];
    const params = { model: QWEN, messages, tools, tool_choice: "auto", temperature: 0,
      max_tokens: 120, stream_options: { include_usage: true } };
    const stream = client.beta.chat.completions.stream(params);
    const final = await stream.finalChatCompletion();
    const choice = final.choices[0];
    assert.equal(choice.finish_reason, "tool_calls");
    assert.equal(choice.message.tool_calls.length, 1);
    const call = choice.message.tool_calls[0];
    assert.match(call.id, /^call_\w+$/);
    assert.equal(call.function.name, "read_file");
    assert.deepEqual(JSON.parse(call.function.arguments), { path: "README.md" });
    assert.ok(final.usage.prompt_tokens > 100, JSON.stringify(final.usage));

    const next = await client.chat.completions.create({
      ...params, stream: undefined, stream_options: undefined,
      messages: [...messages,
        { role: "assistant", content: null, tool_calls: [call] },
        { role: "tool", tool_call_id: call.id, content: "# opta-lmx\nA headless inference server written in Rust." },
        { role: "user", content: "In one sentence, what is in that file?" }],
    });
    assert.equal(next.choices[0].finish_reason, "stop");
    assert.match(next.choices[0].message.content.toLowerCase(), /server/);
  } finally {
    proc.kill();
  }
});
