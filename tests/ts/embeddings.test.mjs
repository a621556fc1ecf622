// OpenClaw's memory search as its bundled `lmstudio` provider runs it: discover an embedding
// model in LM Studio's list, load it, then embed through the official TypeScript SDK with the
// instance id it was given.
import { test } from "node:test";
import assert from "node:assert/strict";
import { OpenAI, startServer } from "./server.mjs";

const EMBED = "all-minilm-l6-v2-f32";
const dot = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0);

test("list, load and embed as OpenClaw's memory does, through the TypeScript SDK", async () => {
  const { proc, base } = await startServer({ load: false, models: [EMBED] });
  try {
    const list = await (await fetch(`${base}/api/v1/models`)).json();
    const model = list.models.find((m) => m.type === "embedding");
    assert.equal(model.key, EMBED);
    const load = await fetch(`${base}/api/v1/models/load`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: model.key, context_length: model.max_context_length }),
    });
    assert.equal(load.status, 200);
    const { status, instance_id } = await load.json();
    assert.equal(status, "loaded");
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "lmstudio", maxRetries: 0 });
    const texts = ["Sam prefers tea over coffee.", "Sam likes tea more than coffee.", "The boiler needs a service in May."];
    // The SDK asks for base64 by default and decodes it; then floats, asked for explicitly.
    const res = await client.embeddings.create({ model: instance_id, input: texts });
    const floats = await client.embeddings.create({ model: instance_id, input: texts, encoding_format: "float" });
    assert.equal(res.data.length, 3);
    assert.deepEqual(res.data.map((d) => d.index), [0, 1, 2]);
    for (const [i, d] of res.data.entries()) {
      assert.equal(d.embedding.length, 384);
      assert.ok(Math.abs(dot(d.embedding, d.embedding) - 1) < 1e-4);
      assert.ok(dot(d.embedding, floats.data[i].embedding) > 0.99999);
    }
    const [a, b, c] = res.data.map((d) => d.embedding);
    assert.ok(dot(a, b) > dot(a, c) + 0.2, `${dot(a, b)} vs ${dot(a, c)}`);
    assert.ok(res.usage.prompt_tokens > 20);
  } finally {
    proc.kill();
  }
});
