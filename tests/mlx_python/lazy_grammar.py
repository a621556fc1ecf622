"""The MLX worker's lazy tool-call grammar, observed directly (run by tests/mlx.rs with the
MLX venv's Python): free text passes untouched until the trigger appears in the output, after
which only what the tool-call grammar allows can follow; without triggers the grammar holds
from the first token. Real tokenizer (the Qwen MLX test model's), real llguidance, the
worker's own Guide class and special-token mapping.

    lazy_grammar.py WORKER_PY MLX_MODEL_FOLDER
"""
import importlib.util
import sys

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark
import llguidance.hf
from transformers import AutoTokenizer

spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

hf = AutoTokenizer.from_pretrained(sys.argv[2])
eos = hf.convert_tokens_to_ids("<|im_end|>")
lltok = llguidance.hf.from_tokenizer(hf, eos_token=eos)
specials = {f'"{t.content}"': f"<[{i}]>" for i, t in hf.added_tokens_decoder.items()
            if lltok.is_special_token(i)}
# The shape src/engine/grammar.rs writes for a required call to one tool.
GBNF = r'''
root ::= wrapped-item ([ \t\n]* wrapped-item)*
wrapped-item ::= "<tool_call>" "\n"? json-root "\n"? "</tool_call>"
json-root ::= "{" space "\"name\"" space ":" space "\"get_weather\"" space "," space "\"arguments\"" space ":" space "{" space "\"city\"" space ":" space string space "}" space "}"
string ::= "\"" [a-zA-Z ]* "\""
space ::= [ \t\n]?
'''
grammar = LLMatcher.grammar_from_lark(worker.with_special_tokens(any_to_lark(GBNF), specials))
assert not LLMatcher.validate_grammar(grammar, lltok), LLMatcher.validate_grammar(grammar, lltok)
vocab = len(hf)
rng = np.random.default_rng(0)


def feed(guide, ids):
    """Runs the guide over `ids` as a generation would; returns each step's logits out."""
    outs, context = [], []
    for t in ids:
        logits = mx.array(rng.standard_normal(vocab).astype(np.float32))
        outs.append(np.array(guide(mx.array(context or [0]), logits)))
        context.append(t)
    return outs


def allowed(out):
    return set(np.flatnonzero(np.isfinite(out)).tolist())


free = hf.encode("Let me look that up.", add_special_tokens=False)
call = hf.encode("<tool_call>", add_special_tokens=False)
assert call == [hf.convert_tokens_to_ids("<tool_call>")], call
newline = hf.encode("\n", add_special_tokens=False)[0]
brace = hf.encode("{", add_special_tokens=False)[0]

# Lazy: every step of free text is untouched, the trigger token too.
lazy = worker.Guide(lltok, grammar, ["<tool_call>"], vocab)
outs = feed(lazy, free + call + [newline])
for i, out in enumerate(outs[: len(free) + 1]):
    assert len(allowed(out)) == vocab, f"step {i} was constrained before the trigger"
# After the trigger: only what the grammar allows (a newline or the opening brace).
after = allowed(outs[len(free) + 1])
assert newline in after and brace in after, sorted(after)[:20]
assert len(after) < 50, f"{len(after)} tokens allowed after the trigger"
assert hf.encode("Sure", add_special_tokens=False)[0] not in after
after_newline = allowed(feed(worker.Guide(lltok, grammar, ["<tool_call>"], vocab),
                             free + call + [newline, brace])[-1])
assert hf.encode("hello", add_special_tokens=False)[0] not in after_newline

# Not lazy (tool_choice required): the grammar holds from the first token.
strict = worker.Guide(lltok, grammar, [], vocab)
first = allowed(feed(strict, call)[0])
assert first == {call[0]}, sorted(first)[:20]
print(f"lazy grammar: {len(free) + 1} free steps untouched, {len(after)} tokens allowed after the trigger")
