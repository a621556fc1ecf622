#!/usr/bin/env python3
"""Tiny Qwen 3 models with random weights, for two paths no real model small enough on PyPI
covers (numpy, safetensors and llama.cpp's gguf-py only; no torch, no mlx):

    make-tiny-qwen3.py thinking QWEN_MLX OUT_FOLDER
        An MLX chat model whose template opens a <think> block for the answer and renders past
        assistant turns without their reasoning (what Qwen 3 and DeepSeek-R1 templates do), so
        a second turn shares only part of the first turn's cached tokens.

    make-tiny-qwen3.py embedder QWEN_MLX QWEN_GGUF OUT_FOLDER OUT.gguf
        A decoder embedder laid out as Qwen3-Embedding's GGUF is (architecture qwen3, causal
        attention, last-token pooling, <|endoftext|> appended): OUT.gguf for the server,
        OUT_FOLDER (safetensors + tokenizer) for tests/python/qwen3_reference.py.

Both borrow the Qwen MLX test model's tokenizer (the GGUF's token list and merges for the
embedder), so text means the same tokens everywhere.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CONFIG = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
    "tie_word_embeddings": True, "torch_dtype": "float32",
}

# Qwen 3's layout without its tool and reasoning-history branches: system and user turns as
# ChatML, a past assistant turn as its content only (the server hands reasoning back
# separately, so the content has none), and the answer opened inside <think>.
THINKING_TEMPLATE = """{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}
"""


def weights(vocab, seed=7):
    """Random float32 weights in Hugging Face's names (what mlx-lm loads)."""
    rng = np.random.default_rng(seed)
    c = CONFIG
    h, f, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]

    def lin(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": (0.3 * rng.standard_normal((vocab, h))).astype(np.float32),
         "model.norm.weight": norm(h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": norm(h),
            p + "post_attention_layernorm.weight": norm(h),
            p + "self_attn.q_proj.weight": lin(nh * d, h),
            p + "self_attn.k_proj.weight": lin(nkv * d, h),
            p + "self_attn.v_proj.weight": lin(nkv * d, h),
            p + "self_attn.o_proj.weight": lin(h, nh * d),
            p + "self_attn.q_norm.weight": norm(d),
            p + "self_attn.k_norm.weight": norm(d),
            p + "mlp.gate_proj.weight": lin(f, h),
            p + "mlp.up_proj.weight": lin(f, h),
            p + "mlp.down_proj.weight": lin(h, f),
        }
    return w


def write_folder(src, out, vocab, template=None):
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights(vocab), str(out / "model.safetensors"), metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(CONFIG | {"vocab_size": vocab}, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    if template is not None:
        (out / "chat_template.jinja").write_text(template)


def thinking(src, out):
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    write_folder(src, out, vocab, THINKING_TEMPLATE)


def embedder(src, qwen_gguf, out, gguf_path):
    import gguf

    reader = gguf.GGUFReader(str(qwen_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    write_folder(src, out, len(tokens))
    w = weights(len(tokens))
    c = CONFIG
    arch = gguf.MODEL_ARCH.QWEN3
    writer = gguf.GGUFWriter(str(gguf_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("tiny-qwen3-embedding")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_pooling_type(gguf.PoolingType.LAST)
    # Qwen3-Embedding's tokenizer appends <|endoftext|> and reads the vector there.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(reader.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(reader.fields["tokenizer.ggml.merges"].contents())
    endoftext = tokens.index("<|endoftext|>")
    writer.add_eos_token_id(endoftext)
    writer.add_pad_token_id(endoftext)
    writer.add_bos_token_id(endoftext)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)
    names = gguf.TensorNameMap(arch, c["num_hidden_layers"])
    for key, value in w.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            sys.exit(f"no GGUF name for tensor {key}")
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    what, args = sys.argv[1], [Path(a) for a in sys.argv[2:]]
    {"thinking": thinking, "embedder": embedder}[what](*args)
