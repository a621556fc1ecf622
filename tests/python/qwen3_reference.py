"""A decoder embedding independent of llama.cpp: the HF tokenizer (tokenizers) and a numpy
forward pass of a Qwen 3 decoder (RMSNorm, q/k norms, NeoX rotary positions, grouped-query
causal attention, SwiGLU) over the model's own safetensors; the vector is the last token's
final hidden state (Qwen3-Embedding's pooling, after the <|endoftext|> it appends), unit
length."""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


class Qwen3:
    def __init__(self, folder):
        folder = Path(folder)
        self.cfg = json.loads((folder / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.eos = self.tok.token_to_id("<|endoftext|>")

    def _norm(self, x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg["rms_norm_eps"]) * self.w[name]

    def _rope(self, x):
        t, _, d = x.shape
        inv = self.cfg["rope_theta"] ** (-np.arange(0, d, 2) / d)
        ang = np.arange(t)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def tokens(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids + [self.eos]

    def embed(self, text):
        ids = self.tokens(text)
        c, w, t = self.cfg, self.w, len(ids)
        nh, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        x = w["model.embed_tokens.weight"][ids]
        causal = np.triu(np.full((t, t), -np.inf), 1)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._norm(x, p + "input_layernorm.weight")
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, d)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, d)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, d)
            q = self._rope(self._norm(q, p + "self_attn.q_norm.weight"))
            k = self._rope(self._norm(k, p + "self_attn.k_norm.weight"))
            k, v = (np.repeat(a, nh // nkv, axis=1) for a in (k, v))
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d) + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            a = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(t, nh * d)
            x = x + a @ w[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, p + "post_attention_layernorm.weight")
            g = h @ w[p + "mlp.gate_proj.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        last = self._norm(x, "model.norm.weight")[-1]
        return last / np.linalg.norm(last)
