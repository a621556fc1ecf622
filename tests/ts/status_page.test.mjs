// The status page in headless Chromium (Debian's package, driven by playwright-core): after
// real traffic through the official SDK it shows the model, non-zero figures and a chart;
// its Unload and Load buttons drive the admin API; with an admin key set it asks for the
// key before it shows anything. A screenshot is kept at target/status-page.png.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { statSync } from "node:fs";
import { OpenAI, QWEN, startServer } from "./server.mjs";

const ROOT = resolve(fileURLToPath(import.meta.url), "../../..");
const require = createRequire(join(ROOT, "target/node/package.json"));
const { chromium } = require("playwright-core");

// Chromium's own background traffic is refused on a closed network; these flags stop it.
const launch = () => chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

test("status page shows live figures and loads and unloads models", async () => {
  const { proc, base } = await startServer({ aliases: ["second-model"] });
  const browser = await launch();
  try {
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "x", maxRetries: 0 });
    for (let i = 0; i < 3; i++) {
      const r = await client.chat.completions.create({
        model: QWEN, max_tokens: 16, messages: [{ role: "user", content: `Write line ${i} of a poem` }] });
      assert.ok(r.usage.completion_tokens > 0);
    }
    const page = await browser.newPage({ viewport: { width: 1200, height: 1500 } });
    const failed = [];
    page.on("requestfailed", (r) => failed.push(r.url()));
    await page.goto(`${base}/`);
    const row = page.locator(`#models tr[data-model="${QWEN}"]`);
    await row.waitFor({ timeout: 15000 });
    assert.equal(await page.locator("#completions").textContent(), "3");
    assert.ok(Number(await page.locator("#tokens").textContent()) >= 3);
    assert.ok(Number(await page.locator("#ttft").textContent()) > 0);
    assert.match(await row.textContent(), /gguf/);
    assert.match(await page.locator("#memtext").textContent(), /GB of .* GB used/);
    // The chart has both series over the history, which holds the three completions.
    assert.equal(await page.locator("#chart polyline").count(), 2);
    const history = (await (await fetch(`${base}/admin/status`)).json()).performance.history;
    assert.equal(history.length > 1 && history.reduce((n, p) => n + p.completions, 0), 3);
    await page.screenshot({ path: join(ROOT, "target/status-page.png"), fullPage: true });
    assert.ok(statSync(join(ROOT, "target/status-page.png")).size > 20000);
    // Everything came from this server: no CDN, nothing failed.
    assert.deepEqual(failed.filter((u) => !u.startsWith(base)), []);

    // Unload with the button: the row goes, the server agrees.
    await row.locator("button").click();
    await page.locator("#nomodels").waitFor({ state: "visible", timeout: 30000 });
    let status = await (await fetch(`${base}/admin/status`)).json();
    assert.deepEqual(status.models, []);
    // Load the other model from the list.
    await page.locator("#available option[value='second-model']").waitFor({ state: "attached", timeout: 20000 });
    await page.selectOption("#available", "second-model");
    await page.locator("#load").click();
    await page.locator(`#models tr[data-model="second-model"]`).waitFor({ timeout: 60000 });
    status = await (await fetch(`${base}/admin/status`)).json();
    assert.deepEqual(status.models, ["second-model"]);
  } finally {
    await browser.close();
    proc.kill();
  }
});

test("status page asks for the admin key when the server has one", async () => {
  const { proc, base } = await startServer({ env: { OPTA_LMX_ADMIN_KEY: "page-key" } });
  const browser = await launch();
  try {
    const page = await browser.newPage();
    await page.goto(`${base}/ui`);
    await page.locator("#keybox").waitFor({ state: "visible", timeout: 15000 });
    assert.match(await page.locator("#error").textContent(), /401/);
    await page.fill("#key", "page-key");
    await page.click("#savekey");
    await page.locator(`#models tr[data-model="${QWEN}"]`).waitFor({ timeout: 15000 });
    assert.equal(await page.locator("#keybox").isVisible(), false);
  } finally {
    await browser.close();
    proc.kill();
  }
});
