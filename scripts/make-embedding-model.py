#!/usr/bin/env python3
"""Writes a sentence-transformers BERT folder (all-MiniLM-L6-v2) as a GGUF llama.cpp loads.

llama.cpp's convert_hf_to_gguf.py needs torch (from PyPI about 3 GB with its CUDA wheels),
which CI cannot afford for one 90 MB test model; this does the same for the one architecture
it needs with llama.cpp's own writer library (gguf-py) and its own tensor-name tables
(TensorNameMap), so only the handful of header keys below are spelled here. Weights stay
float32: the vectors are compared with an independent forward pass.

    make-embedding-model.py FOLDER OUT.gguf
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# llama.cpp's pooling types (llama.h: LLAMA_POOLING_TYPE_*).
POOLING = {"mean": 1, "cls": 2, "last": 3}


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((src / "config.json").read_text())
    pool = json.loads((src / "1_Pooling" / "config.json").read_text())
    pooling = next(POOLING[k] for k in ("mean", "cls", "last")
                   if pool.get(f"pooling_mode_{k}_token" if k != "mean" else "pooling_mode_mean_tokens"))
    arch = gguf.MODEL_ARCH.BERT
    name = gguf.MODEL_ARCH_NAMES[arch]
    w = gguf.GGUFWriter(str(out), name)
    w.add_name(src.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(pooling))

    # WordPiece vocabulary in llama.cpp's "phantom space" form: a word start carries U+2581,
    # a continuation ("##ing") loses its marker, bracketed specials stay as they are.
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    specials = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}

    def phantom(t):
        if t.startswith("[") and t.endswith("]"):
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t

    w.add_tokenizer_model("bert")
    w.add_token_list([phantom(t) for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
                       for t, _ in vocab])
    w.add_token_type_count(cfg.get("type_vocab_size", 2))
    ids = tok["model"]["vocab"]
    w.add_bos_token_id(ids["[CLS]"])  # llama.cpp starts a BERT input with its BOS
    w.add_sep_token_id(ids["[SEP]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_mask_token_id(ids["[MASK]"])

    names = gguf.TensorNameMap(arch, cfg["num_hidden_layers"])
    for key, value in load_file(str(src / "model.safetensors")).items():
        if key.endswith("position_ids") or key.startswith("pooler."):
            continue  # a buffer, and the [CLS] pooler head mean pooling does not use
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            sys.exit(f"no GGUF name for tensor {key}")
        w.add_tensor(new, np.ascontiguousarray(value.astype(np.float32)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
