"""Why the MLX worker enforces grammars with llguidance: build time and per-token mask time of
llguidance and outlines-core on the Qwen test model's vocabulary, for one nested JSON schema
walked token by token. (xgrammar is not measured: it installs PyTorch and CUDA beside mlx.)

    target/mlx-venv/bin/pip install outlines-core
    target/mlx-venv/bin/python bench/grammar_engines.py [MODEL_DIR]
"""
import json
import sys
import time

import numpy as np
from transformers import AutoTokenizer

MODEL = sys.argv[1] if len(sys.argv) > 1 else "target/test-model/qwen2.5-coder-0.5b-instruct-mlx"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c", "d"]}},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["street", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
DOC = '{"name": "Ann", "age": 31, "tags": ["a", "c"], "address": {"street": "Main St 1", "zip": "12345"}}'


def main():
    tok = AutoTokenizer.from_pretrained(MODEL)
    eos = tok.eos_token_id
    tokens = tok.encode(DOC)

    import llguidance.hf
    from llguidance import LLMatcher
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, eos_token=eos)
    t1 = time.perf_counter()
    matcher = LLMatcher(lltok, LLMatcher.grammar_from_json_schema(SCHEMA))
    t2 = time.perf_counter()
    masks = []
    for t in tokens:
        s = time.perf_counter()
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        masks.append(time.perf_counter() - s)
        assert bits[t], t
        matcher.consume_token(t)
    print(f"llguidance: tokenizer {1000 * (t1 - t0):.0f} ms once per worker; grammar {1000 * (t2 - t1):.1f} ms; "
          f"mask median {1e6 * np.median(masks):.0f} us, max {1e6 * max(masks):.0f} us over {len(tokens)} tokens")

    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    vocab = {}
    for piece, i in tok.get_vocab().items():
        if i != eos:
            vocab.setdefault(tok.convert_tokens_to_string([piece]), []).append(i)
    t0 = time.perf_counter()
    voc = Vocabulary(eos, vocab)
    t1 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), voc))
    t2 = time.perf_counter()
    masks = []
    for t in tokens:
        s = time.perf_counter()
        guide.get_tokens()
        masks.append(time.perf_counter() - s)
        guide.advance(t)
    print(f"outlines-core: vocabulary {1000 * (t1 - t0):.0f} ms; index for this schema {1000 * (t2 - t1):.0f} ms; "
          f"allowed tokens median {1e6 * np.median(masks):.0f} us, max {1e6 * max(masks):.0f} us")


if __name__ == "__main__":
    main()
