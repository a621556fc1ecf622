"""The priority benchmark (issue 24), against one running server.

`agent` phase: six bot clients keep every sequence busy with long streamed answers (a shared
system prompt, each its own question); meanwhile a coding-agent turn (30 tools, a ~4k-token
prompt, streamed, `x-priority: high`) arrives every `--gap` seconds. Prints the agent turns'
times to first token and the bots' aggregate tokens/s over the window. With `--idle`, only the
agent turns, back to back, on an otherwise idle server (the baseline the ratio is taken to).

`flood` phase: one client sends 20 requests at once, then five clients send one each; prints
each client's tokens/s and the equal share (everyone's tokens/s over the same window / 6).

Output is one JSON object; bench/priorities.sh runs the phases and prints the ratios."""

import argparse
import asyncio
import json
import time

import httpx
import openai

from agent_replay import TOOLS, USER_TURNS

# Qwen's end-of-text tokens banned: answers run to max_tokens, the same length every run.
NO_EOS = {"151643": -100, "151645": -100}

NOTES = " ".join(
    f"Note {i}: the module {name} owns {what}; change it only with a test that shows why, keep "
    f"its public items documented, and run the formatter and the linter before committing."
    for i, (name, what) in enumerate(
        [(f"part_{k}", w) for k, w in enumerate(
            ["routing", "auth", "the scheduler", "sampling", "the prefix cache", "downloads",
             "the memory guard", "metrics", "the audit log", "chat templates", "tool calls",
             "grammars", "embeddings", "reranking", "TLS", "the status page", "the CLI",
             "configuration", "logging", "the MLX worker", "speculation", "the disk tier"] * 2)]))
SYSTEM = ("You are a coding agent working in a repository. Call tools to read and change "
          "files, and answer briefly. Project notes follow. " + NOTES)

BOT_SYSTEM = ("You are a friendly household assistant bot. You answer at length, in plain "
              "sentences, and you never use lists. " * 4)
BOT_QUESTIONS = [
    "Tell me a long story about a lighthouse keeper and a storm.",
    "Explain in detail how bread rises and why kneading matters.",
    "Describe a walk through a forest in autumn, slowly.",
    "Tell me about the history of clocks, step by step.",
    "Explain how a bicycle stays upright when it moves.",
    "Describe the life of a honeybee from egg to forager.",
]


def agent_messages(n):
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(n):
        msgs.append({"role": "user", "content": USER_TURNS[i % len(USER_TURNS)] + f" (turn {i + 1})"})
        if i < n - 1:
            msgs.append({"role": "assistant", "content": f"Done with step {i + 1}; the file is src/part_{i}.rs."})
    return msgs


async def agent_turn(client, model, n):
    sent = time.perf_counter()
    first, usage = None, None
    stream = await client.chat.completions.create(
        model=model, messages=agent_messages(n), tools=TOOLS, max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_headers={"x-priority": "high", "x-client-id": "opta-cli"})
    async for chunk in stream:
        if chunk.choices and first is None:
            d = chunk.choices[0].delta
            if d.content or d.tool_calls:
                first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None)
    return {"ttft_ms": ((first or time.perf_counter()) - sent) * 1000, "done_at": time.perf_counter(),
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (details.cached_tokens or 0) if details else 0}


async def stream_tokens(client, model, messages, client_id, max_tokens, stamps):
    """One streamed answer; appends the arrival time of each content chunk to `stamps`."""
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        logit_bias=NO_EOS, extra_headers={"x-client-id": client_id})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())


async def bot(client, model, i, max_tokens, stamps, stop):
    msgs = [{"role": "system", "content": BOT_SYSTEM}, {"role": "user", "content": BOT_QUESTIONS[i]}]
    while not stop.is_set():
        await stream_tokens(client, model, msgs, f"bot-{i + 1}", max_tokens, stamps)


async def active(base):
    async with httpx.AsyncClient() as h:
        r = await h.get(base.removesuffix("/v1") + "/admin/status")
        return sum(m["scheduler"]["active_sequences"] for m in r.json()["loaded_models"])


async def agent_phase(args, client):
    # The agent's session is under way: its system prompt and tools were prefilled by an
    # earlier turn (a cold 5k-token prompt is another measurement: bench/agent_replay.sh).
    await agent_turn(client, args.model, 1)
    if args.idle:
        turns = [await agent_turn(client, args.model, n + 2) for n in range(args.turns)]
        return {"turns": turns}
    stop = asyncio.Event()
    stamps = []
    bots = [asyncio.create_task(bot(client, args.model, i, args.bot_tokens, stamps, stop)) for i in range(6)]
    # Saturated: every sequence busy, and a few seconds of it.
    while await active(args.base) < args.parallel:
        await asyncio.sleep(0.2)
    await asyncio.sleep(5)
    # A turn arrives every `gap` seconds whether or not the last one is done (under FIFO they
    # queue up); the bots are measured over the same fixed window in both modes, so the
    # agent's work falls in it either way.
    start = time.perf_counter()

    async def turn_at(n):
        await asyncio.sleep(max(0.0, start + n * args.gap - time.perf_counter()))
        return await agent_turn(client, args.model, n + 2)

    if args.bots_only:
        # The bots' rate with no agent at all: what the agent's turns cost them, either mode.
        await asyncio.sleep(args.turns * args.gap)
        turns = []
    else:
        turns = await asyncio.gather(*(turn_at(n) for n in range(args.turns)))
    # The window closes when the last turn is done (never before the last turn was due): under
    # FIFO the turns queue behind the bots, and a window that closed on time would leave part
    # of the agent's work outside it, crediting FIFO with bot tokens bought by deferring it.
    end = max([start + args.turns * args.gap] + [t["done_at"] for t in turns])
    if end > time.perf_counter():
        await asyncio.sleep(end - time.perf_counter())
    stop.set()
    for b in bots:
        b.cancel()
    await asyncio.gather(*bots, return_exceptions=True)
    in_window = sum(1 for t in stamps if start <= t <= end)
    for t in turns:
        t["done_at"] -= start
    return {"turns": turns, "bot_tokens_per_s": in_window / (end - start), "window_s": end - start}


async def flood_phase(args, client):
    msgs = lambda who, k: [{"role": "user", "content": f"Count slowly from one to a hundred ({who} {k})."}]
    stamps = {name: [] for name in ["flood"] + [f"quiet-{i}" for i in range(5)]}
    tasks = [asyncio.create_task(stream_tokens(client, args.model, msgs("flood", k), "flood", args.flood_tokens, stamps["flood"]))
             for k in range(20)]
    # The flood is in (every sequence taken) before the others arrive.
    while await active(args.base) < args.parallel:
        await asyncio.sleep(0.05)
    start = time.perf_counter()
    quiet = [asyncio.create_task(stream_tokens(client, args.model, msgs(f"quiet-{i}", 0), f"quiet-{i}", args.flood_tokens, stamps[f"quiet-{i}"]))
             for i in range(5)]
    await asyncio.gather(*quiet)
    end = time.perf_counter()
    everyone = sum(1 for s in stamps.values() for t in s if start <= t <= end) / (end - start)
    share = everyone / 6
    rates = {name: len(stamps[name]) / (max(stamps[name]) - start) for name in stamps if name != "flood"}
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"equal_share_tokens_per_s": share, "quiet_tokens_per_s": rates,
            "flood_tokens_per_s": sum(1 for t in stamps["flood"] if start <= t <= end) / (end - start)}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--phase", choices=["agent", "flood"], required=True)
    ap.add_argument("--idle", action="store_true")
    ap.add_argument("--bots-only", action="store_true")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--gap", type=float, default=20.0)
    ap.add_argument("--bot-tokens", type=int, default=400)
    ap.add_argument("--flood-tokens", type=int, default=48)
    args = ap.parse_args()
    client = openai.AsyncOpenAI(base_url=args.base, api_key="bench", max_retries=0, timeout=1800)
    out = await (agent_phase(args, client) if args.phase == "agent" else flood_phase(args, client))
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
