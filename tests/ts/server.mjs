// Starts the real opta-lmx binary with the real Qwen model for the TypeScript SDK tests, and
// loads the official `openai` package from target/node (installed by scripts/test.sh).
import { spawn } from "node:child_process";
import { mkdtempSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const ROOT = resolve(fileURLToPath(import.meta.url), "../../..");
const require = createRequire(join(ROOT, "target/node/package.json"));
export const { default: OpenAI } = await import(require.resolve("openai"));
export const QWEN = "qwen2.5-coder-0.5b-instruct-q4_k_m";

const freePort = () =>
  new Promise((ok) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });

/** Starts a server; `load` false leaves Qwen on disk, not loaded; `aliases` links Qwen under
 * more names (more models on disk); `models` links more test models by id; `env` adds
 * variables. */
export async function startServer({ load = true, aliases = [], models = [], env: extra = {} } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "opta-lmx-ts-"));
  symlinkSync(join(ROOT, `target/test-model/${QWEN}.gguf`), join(dir, `${QWEN}.gguf`));
  for (const m of models) symlinkSync(join(ROOT, `target/test-model/${m}.gguf`), join(dir, `${m}.gguf`));
  for (const a of aliases) symlinkSync(join(ROOT, `target/test-model/${QWEN}.gguf`), join(dir, `${a}.gguf`));
  writeFileSync(join(dir, "c.yaml"), "");
  const port = await freePort();
  const env = { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("OPTA_LMX_"))), ...extra };
  const args = ["serve", "--config", join(dir, "c.yaml"), "--port", String(port), "--models-dir", dir,
    "--context", "4096", "--parallel", "2", "--audit-file", join(dir, ".audit.jsonl"),
    "--no-prompt-cache"];
  if (load) args.push("--model", QWEN);
  const proc = spawn(join(ROOT, "target/release/opta-lmx"), args, { env, stdio: "ignore" });
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 600; i++) {
    try {
      if ((await fetch(`${base}/healthz`)).ok) return { proc, base };
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  proc.kill();
  throw new Error("server did not start");
}
