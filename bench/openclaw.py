"""Six OpenClaw-shaped bots against one server (issue 25): each bot's turn is a streamed chat
with 12 tools and a long system prompt (a shared preamble every bot sends, then the bot's own
workspace and memory), its conversation growing turn by turn, as the real OpenClaw sends them.
All bots start together and each sends its turns back to back. Prints one JSON object: every
call's TTFT, prompt and cached tokens, and the aggregate completion tokens/s over the run."""

import argparse
import asyncio
import json
import time

import openai

WORDS = ["river", "stone", "lantern", "orchard", "copper", "meadow", "harbor", "violet",
         "engine", "signal", "garden", "window", "ladder", "basket", "mirror", "candle"]


def filler(seed, tokens):
    """About `tokens` tokens of text, distinct per `seed`."""
    out, i = [], 0
    while len(out) < tokens * 3 // 4:
        out.append(WORDS[(i * 7 + seed * 13 + i // 16) % len(WORDS)])
        i += 1
    return " ".join(out)


def tool(name, props, required=()):
    return {"type": "function", "function": {
        "name": name, "description": f"{name.replace('_', ' ')} for the agent's workspace",
        "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in props.items()},
                       "required": list(required)}}}


TOOLS = [
    tool("read", {"path": "string"}, ["path"]),
    tool("write", {"path": "string", "content": "string"}, ["path", "content"]),
    tool("edit", {"path": "string", "old": "string", "new": "string"}, ["path", "old", "new"]),
    tool("apply_patch", {"input": "string"}, ["input"]),
    tool("exec", {"command": "string"}, ["command"]),
    tool("ls", {"path": "string"}),
    tool("web_search", {"query": "string"}, ["query"]),
    tool("web_fetch", {"url": "string"}, ["url"]),
    tool("memory_search", {"query": "string"}, ["query"]),
    tool("message", {"to": "string", "text": "string"}, ["text"]),
    tool("cron", {"schedule": "string", "task": "string"}, ["schedule", "task"]),
    tool("session_status", {}),
]

ASKS = ["What is on my calendar today?", "Summarise the last message from the garden channel.",
        "Remind me to water the plants at six.", "Check the heartbeat and report anything odd.",
        "What did we decide about the lantern project?", "Draft a short reply to the harbor team."]


def system(bot, shared, own):
    return ("You are a personal assistant agent running inside OpenClaw. " + filler(0, shared)
            + f"\n\n## Workspace of bot{bot}\n" + filler(bot + 1, own))


async def bot(client, model, i, args, calls):
    msgs = [{"role": "system", "content": system(i, args.shared, args.prompt - args.shared)}]
    for turn in range(args.turns):
        msgs.append({"role": "user", "content": ASKS[(i + turn) % len(ASKS)]})
        sent = time.perf_counter()
        first, text, usage = None, "", None
        stream = await client.chat.completions.create(
            model=model, messages=msgs, tools=TOOLS, max_tokens=args.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_headers={"x-openclaw-agent-id": f"bot{i}"})
        async for chunk in stream:
            if chunk.choices:
                d = chunk.choices[0].delta
                if first is None and (d.content or d.tool_calls):
                    first = time.perf_counter()
                text += d.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        details = getattr(usage, "prompt_tokens_details", None)
        calls.append({"bot": i, "turn": turn, "ttft_ms": ((first or time.perf_counter()) - sent) * 1000,
                      "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "cached_tokens": (details.cached_tokens or 0) if details else 0})
        msgs.append({"role": "assistant", "content": text or "Done."})


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--bots", type=int, default=6)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=11000)
    ap.add_argument("--shared", type=int, default=1900)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    client = openai.AsyncOpenAI(base_url=args.base, api_key="bench", max_retries=0, timeout=7200)
    calls = []
    start = time.perf_counter()
    await asyncio.gather(*(bot(client, args.model, i, args, calls) for i in range(args.bots)))
    elapsed = time.perf_counter() - start
    print(json.dumps({"calls": calls, "seconds": elapsed,
                      "tokens_per_s": sum(c["completion_tokens"] for c in calls) / elapsed}))


if __name__ == "__main__":
    asyncio.run(main())
