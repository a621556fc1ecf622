"""Agent turns as the coding CLI sends them: a system prompt with 30 tool definitions, then a
conversation that grows by one exchange per turn. Prints each turn's time to first token
(client side) and prompt/cached token counts, as JSON; `--only-turn N` sends just turn N's
request (the same bytes a replay sends), for the after-restart measurement."""

import argparse
import json
import time

import openai

TOOLS = [{
    "type": "function",
    "function": {
        "name": f"tool_{name}",
        "description": f"{desc} Use it when the task needs to {desc.lower()} Paths are relative to the workspace root; never guess contents.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Workspace-relative path of the file or folder."},
                "query": {"type": "string", "description": "What to look for, as a literal string or a regular expression."},
                "limit": {"type": "integer", "description": "Most results to return."},
            },
            "required": ["path"],
        },
    },
} for name, desc in [(f"op{i}", d) for i, d in enumerate([
    "Read a file.", "Write a file.", "Edit a file in place.", "List a directory.", "Search file contents.",
    "Find files by name.", "Run a shell command.", "Show git status.", "Show a git diff.", "Commit changes.",
    "Create a branch.", "Run the tests.", "Run the linter.", "Format the code.", "Build the project.",
    "Open a URL.", "Fetch a web page.", "Summarise a file.", "Rename a symbol.", "Find references.",
    "Go to a definition.", "List open issues.", "Create an issue.", "Comment on an issue.", "Ask the user.",
    "Record a note.", "Recall notes.", "Plan the next steps.", "Check the task list.", "Finish the task."])]]

SYSTEM = ("You are a coding agent working in a repository. Think about the task, call tools to "
          "read and change files, and answer briefly. Follow the project's conventions. " * 6)

USER_TURNS = [
    "Find where the HTTP server binds its port and tell me the file.",
    "Now show me the function that parses the configuration.",
    "Add a comment above it explaining the precedence of settings.",
    "Run the tests and tell me whether they pass.",
    "Summarise what we changed in one sentence.",
]


def turn_messages(n, answers):
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(n):
        msgs.append({"role": "user", "content": USER_TURNS[i]})
        if i < n - 1:
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs


def send(client, model, msgs, tools=TOOLS):
    sent = time.perf_counter()
    first = None
    text = ""
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=msgs, tools=tools, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            piece = (d.content or "") + "".join((t.function.arguments or "") for t in (d.tool_calls or []) if t.function)
            if piece and first is None:
                first = time.perf_counter()
            text += d.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None)
    return {"ttft_ms": ((first or time.perf_counter()) - sent) * 1000,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (details.cached_tokens or 0) if details else 0,
            "text": text or "(tool call)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--only-turn", type=int, default=0)
    ap.add_argument("--answers", default="")
    # Fewer tools, for a CPU where the full 30 take minutes a cold turn (MLX on Linux).
    ap.add_argument("--tools", type=int, default=len(TOOLS))
    args = ap.parse_args()
    tools = TOOLS[:args.tools]
    client = openai.OpenAI(base_url=args.base, api_key="bench", max_retries=0, timeout=900)
    if args.only_turn:
        answers = json.loads(args.answers)
        print(json.dumps(send(client, args.model, turn_messages(args.only_turn, answers), tools)))
        return
    answers, turns = [], []
    for n in range(1, len(USER_TURNS) + 1):
        r = send(client, args.model, turn_messages(n, answers), tools)
        answers.append(r["text"])
        turns.append(r)
    print(json.dumps({"turns": turns, "answers": answers}))


if __name__ == "__main__":
    main()
