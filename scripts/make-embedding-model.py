#!/usr/bin/env python3
"""Writes a sentence-transformers BERT folder (all-MiniLM-L6-v2) as a GGUF llama.cpp loads.

llama.cpp's convert_hf_to_gguf.py needs torch (from PyPI about 3 GB with its CUDA wheels),
which CI cannot afford for one 90 MB test model; this does the same for the one architecture
it needs with llama.cpp's own writer library (gguf-py) and its own tensor-name tables
(TensorNameMap), so only the handful of header keys below are spelled here. Weights stay
float32: the vectors are compared with an independent forward pass.

    make-embedding-model.py FOLDER OUT.gguf
    make-embedding-model.py --cross-encoder FOLDER OUT_FOLDER OUT.gguf

The second form makes a tiny cross-encoder (no reranker small enough ships on PyPI): the same
encoder with BertForSequenceClassification's head, the pooler's [CLS] dense + tanh followed
by a random one-logit classifier, written as rank pooling; OUT_FOLDER keeps its weights for
the numpy reference. llama.cpp adds the first token-type row to every token (it has no
"sentence B"), so both rows are made equal and the reference may pass real token types.
"""
import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

# llama.cpp's pooling types (llama.h: LLAMA_POOLING_TYPE_*).
POOLING = {"mean": 1, "cls": 2, "last": 3, "rank": 4}


def cross_encoder(src, folder):
    """Copies FOLDER with a classification head added; returns the copy."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (src / f).exists():
            shutil.copy(src / f, folder / f)
    w = load_file(str(src / "model.safetensors"))
    types = w["embeddings.token_type_embeddings.weight"].copy()
    types[1] = types[0]
    w["embeddings.token_type_embeddings.weight"] = types
    rng = np.random.default_rng(11)
    width = w["pooler.dense.weight"].shape[0]
    w["classifier.weight"] = (rng.standard_normal((1, width)) * 8 / np.sqrt(width)).astype(np.float32)
    w["classifier.bias"] = np.array([0.1], dtype=np.float32)
    save_file(w, str(folder / "model.safetensors"))
    return folder


def main():
    if sys.argv[1] == "--cross-encoder":
        src = cross_encoder(Path(sys.argv[2]), Path(sys.argv[3]))
        out, rank = Path(sys.argv[4]), True
    else:
        src, out, rank = Path(sys.argv[1]), Path(sys.argv[2]), False
    cfg = json.loads((src / "config.json").read_text())
    if rank:
        pooling = POOLING["rank"]
    else:
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
    # BertForSequenceClassification's head: the pooler is llama.cpp's `cls`, the classifier
    # its `cls.output`.
    head = {"pooler.dense": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS],
            "classifier": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS_OUT]}
    for key, value in load_file(str(src / "model.safetensors")).items():
        if key.endswith("position_ids") or (key.startswith("pooler.") and not rank):
            continue  # a buffer, and the [CLS] pooler head mean pooling does not use
        stem, _, suffix = key.rpartition(".")
        new = head[stem] + "." + suffix if stem in head else names.get_name(
            key, try_suffixes=(".weight", ".bias"))
        if new is None:
            sys.exit(f"no GGUF name for tensor {key}")
        w.add_tensor(new, np.ascontiguousarray(value.astype(np.float32)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
