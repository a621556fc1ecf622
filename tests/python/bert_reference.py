"""An embedding implementation independent of llama.cpp: the HF tokenizer (tokenizers) and a
numpy forward pass of a BERT encoder over the model's own safetensors, mean-pooled and
normalised as its sentence-transformers config says; and a cross-encoder's score (the pooler's
[CLS] dense + tanh, the classifier's logit, a logistic) for the one make-embedding-model.py
writes with --cross-encoder."""
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


class Bert:
    def __init__(self, folder):
        folder = Path(folder)
        self.cfg = json.loads((folder / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # The file pads every input to 128 tokens for batched PyTorch use; one at a time here.
        self.tok.no_padding()
        self.tok.no_truncation()

    def _ln(self, x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.cfg["layer_norm_eps"]) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def tokens(self, text):
        return self.tok.encode(text).ids

    def embed(self, text):
        pooled = self._hidden(self.tokens(text), [0]).mean(0)
        return pooled / np.linalg.norm(pooled)

    def pair_tokens(self, query, document):
        return self.tok.encode(query, document).ids

    def score(self, query, document):
        """The relevance a cross-encoder gives the pair, in (0, 1)."""
        enc = self.tok.encode(query, document)
        cls = self._hidden(enc.ids, enc.type_ids)[0]
        pooled = np.tanh(self._lin(cls, "pooler.dense"))
        logit = float(self._lin(pooled, "classifier")[0])
        return 1 / (1 + math.exp(-logit))

    def _hidden(self, ids, types):
        w, heads = self.w, self.cfg["num_attention_heads"]
        types = np.broadcast_to(np.asarray(types), (len(ids),))
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][: len(ids)]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = self._ln(x, "embeddings.LayerNorm")
        d = x.shape[-1] // heads
        erf = np.vectorize(math.erf)
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (self._lin(x, p + f"attention.self.{n}").reshape(len(ids), heads, d).transpose(1, 0, 2)
                       for n in ("query", "key", "value"))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = (s / s.sum(-1, keepdims=True)) @ v
            a = a.transpose(1, 0, 2).reshape(len(ids), -1)
            x = self._ln(x + self._lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = self._lin(x, p + "intermediate.dense")
            h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
            x = self._ln(x + self._lin(h, p + "output.dense"), p + "output.LayerNorm")
        return x
