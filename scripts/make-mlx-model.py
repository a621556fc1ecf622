#!/usr/bin/env python3
"""Makes the MLX test model from the Qwen2.5-Coder 0.5B GGUF (no MLX model ships on PyPI):
dequantises its tensors with the `gguf` package, writes them as safetensors under Hugging
Face names with a config.json, a tokenizer.json built from the GGUF vocabulary and merges
(the `tokenizers` package) and a tokenizer_config.json carrying the chat template, then runs
`mlx_lm.convert` to float32 (MLX's Linux CPU backend has no fast quantised kernels).

    make-mlx-model.py QWEN_GGUF OUT_DIR
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import gguf
import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# llama.cpp's tensor names -> Hugging Face Qwen2 names (per layer, then global).
LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
          "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Qwen2's pre-tokenizer split, as its tokenizer.json has it.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def field(reader, key):
    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def main():
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    r = gguf.GGUFReader(str(src))
    arch = field(r, "general.architecture")
    assert arch == "qwen2", arch
    tensors = {}
    for t in r.tensors:
        name = t.name
        if name.startswith("blk."):
            _, n, rest = name.split(".", 2)
            hf = f"model.layers.{n}.{LAYER[rest]}"
        else:
            hf = GLOBAL[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape)]
        tensors[hf] = mx.array(data.reshape(shape))
    tie = "lm_head.weight" not in tensors
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    eos = field(r, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": field(r, "qwen2.embedding_length"),
        "intermediate_size": field(r, "qwen2.feed_forward_length"),
        "num_hidden_layers": field(r, "qwen2.block_count"),
        "num_attention_heads": field(r, "qwen2.attention.head_count"),
        "num_key_value_heads": field(r, "qwen2.attention.head_count_kv"),
        "rms_norm_eps": field(r, "qwen2.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(r, "qwen2.rope.freq_base"),
        "max_position_embeddings": field(r, "qwen2.context_length"),
        "vocab_size": len(tokens), "tie_word_embeddings": tie,
        "eos_token_id": eos, "torch_dtype": "float32", "hidden_act": "silu",
    }
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     byte_fallback=False, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are added tokens; only control ones are special.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, ty in enumerate(types) if ty == 4])
    tok_config = {
        "chat_template": field(r, "tokenizer.chat_template"),
        "eos_token": tokens[eos], "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf = pathlib.Path(tmp) / "hf"
        hf.mkdir()
        mx.save_safetensors(str(hf / "model.safetensors"), tensors, metadata={"format": "pt"})
        (hf / "config.json").write_text(json.dumps(config, indent=2))
        tok.save(str(hf / "tokenizer.json"))
        (hf / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf),
                        "--mlx-path", str(staging), "--dtype", "float32"], check=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    print(f"MLX model ready: {out}")


if __name__ == "__main__":
    main()
