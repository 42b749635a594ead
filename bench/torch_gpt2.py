"""A plain PyTorch eager GPT-2 with a KV cache: the baseline bench/compare.py times llamas against.

It reads the weights of a Hugging Face GPT-2 checkpoint (Conv1D layout) and computes the same
logits as transformers' GPT2LMHeadModel; `tuned=True` is a stronger eager baseline with the same
math (see the class).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class TorchGPT2(torch.nn.Module):
    """Plain eager GPT-2: pre-LN blocks, tanh GELU, tied lm_head, Conv1D (in, out) weights
    (y = x @ W + b), KV cache kept as concatenated (B, H, T, D) tensors.

    tuned=True is a stronger eager baseline with the same math: a preallocated KV cache written
    in place (no torch.cat per step), matmul-softmax-matmul attention for the one-token decode
    step, and a pre-transposed (C, V) copy of wte for the lm_head GEMV."""

    def __init__(self, weights: dict, n_layer: int, n_head: int, eps: float, tuned: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n_layer, self.n_head, self.eps, self.tuned = n_layer, n_head, eps, tuned

        def t(name):  # a private copy, in `dtype` (bfloat16: every activation is bfloat16 too)
            return torch.from_numpy(np.array(weights[name], dtype=np.float32)).to(dtype)

        self.register_buffer("wte", t("transformer.wte.weight"))
        self.register_buffer("wpe", t("transformer.wpe.weight"))
        self.register_buffer("lnf_w", t("transformer.ln_f.weight"))
        self.register_buffer("lnf_b", t("transformer.ln_f.bias"))
        if tuned:
            self.register_buffer("wte_t", self.wte.t().contiguous())
        self.n_embd = self.wte.shape[1]
        self.n_positions = self.wpe.shape[0]
        self.layers = []
        for i in range(n_layer):
            p = f"transformer.h.{i}."
            names = {"ln1_w": "ln_1.weight", "ln1_b": "ln_1.bias", "attn_w": "attn.c_attn.weight",
                     "attn_b": "attn.c_attn.bias", "proj_w": "attn.c_proj.weight", "proj_b": "attn.c_proj.bias",
                     "ln2_w": "ln_2.weight", "ln2_b": "ln_2.bias", "fc_w": "mlp.c_fc.weight",
                     "fc_b": "mlp.c_fc.bias", "mproj_w": "mlp.c_proj.weight", "mproj_b": "mlp.c_proj.bias"}
            layer = {}
            for key, suffix in names.items():
                buf = t(p + suffix)
                self.register_buffer(f"h{i}_{key}", buf)
                layer[key] = buf
            self.layers.append(layer)

    def _attend(self, i: int, q, k, v, cache, past: int):
        """Returns (attention output (B, H, T, D), this layer's cache entry)."""
        T = q.shape[2]
        if not self.tuned:
            if cache is not None:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
            # a fresh prompt is causal; a decode step (T == 1) sees every cached position
            return F.scaled_dot_product_attention(q, k, v, is_causal=(cache is None and T > 1)), (k, v)
        kbuf, vbuf = cache[i]
        kbuf[:, :, past:past + T] = k
        vbuf[:, :, past:past + T] = v
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            assert T == 1, "tuned eager model: decode one token at a time after the prompt"
            kk, vv = kbuf[:, :, :past + 1], vbuf[:, :, :past + 1]
            s = torch.matmul(q, kk.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            y = torch.matmul(torch.softmax(s, dim=-1), vv)
        return y, (kbuf, vbuf)

    def forward(self, ids: torch.Tensor, cache=None, last_only: bool = True):
        """ids (B, T) -> (logits, new cache). logits are (B, V) for the last position when
        last_only, else (B, T, V). Tuned mode: cache is ([(kbuf, vbuf)] * n_layer, length)."""
        B, T = ids.shape
        C, H = self.n_embd, self.n_head
        D = C // H
        if self.tuned:
            if cache is None:
                shape = (B, H, self.n_positions, D)
                cache = ([(torch.empty(shape), torch.empty(shape)) for _ in range(self.n_layer)], 0)
            layers_cache, past = cache
        else:
            layers_cache, past = cache, (0 if cache is None else cache[0][0].shape[2])
        x = self.wte[ids] + self.wpe[past:past + T]
        new_cache = []
        for i, L in enumerate(self.layers):
            h = F.layer_norm(x, (C,), L["ln1_w"], L["ln1_b"], self.eps)
            qkv = torch.addmm(L["attn_b"], h.view(B * T, C), L["attn_w"]).view(B, T, 3, H, D)
            q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))
            y, entry = self._attend(i, q, k, v, layers_cache, past)
            new_cache.append(entry)
            y = y.transpose(1, 2).reshape(B * T, C)
            x = x + torch.addmm(L["proj_b"], y, L["proj_w"]).view(B, T, C)
            h = F.layer_norm(x, (C,), L["ln2_w"], L["ln2_b"], self.eps)
            h = F.gelu(torch.addmm(L["fc_b"], h.view(B * T, C), L["fc_w"]), approximate="tanh")
            x = x + torch.addmm(L["mproj_b"], h, L["mproj_w"]).view(B, T, C)
        if last_only:
            x = x[:, -1]
        x = F.layer_norm(x, (C,), self.lnf_w, self.lnf_b, self.eps)
        logits = torch.matmul(x, self.wte_t) if self.tuned else F.linear(x, self.wte)
        return logits, ((new_cache, past + T) if self.tuned else new_cache)
