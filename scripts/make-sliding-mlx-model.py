#!/usr/bin/env python3
"""A tiny Gemma 3 text model with random weights and a 16-token sliding window on every other
layer, for testing that prefix reuse with mlx-lm's rotating caches keeps greedy output equal
(no sliding-window MLX model small enough ships on PyPI). It borrows the Qwen MLX test
model's tokenizer and chat template, so the server serves it like any chat model.

    make-sliding-mlx-model.py QWEN_MLX_FOLDER OUT_FOLDER
"""
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    config = {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "rms_norm_eps": 1e-6, "vocab_size": vocab, "rope_theta": 10000.0,
        "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 32,
        "sliding_window": 16, "sliding_window_pattern": 2,
        "max_position_embeddings": 4096, "torch_dtype": "float32",
    }
    mx.random.seed(7)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "generation_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)


if __name__ == "__main__":
    main()
