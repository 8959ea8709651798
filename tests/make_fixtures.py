#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes the PyTorch reference fixtures that tests/test_safetensors.cpp checks the
cross-attention module against. The fixtures are committed, so building and testing xattn never
needs PyTorch; run this only to change or add a case.

Regenerate (Debian: `apt-get install python3-torch`, which installs into the system Python, so
call that interpreter explicitly if another python3 comes first on PATH):

    /usr/bin/python3 tests/make_fixtures.py            # writes tests/fixtures/*.safetensors

Each file holds one case:
  - the layer's weights under the prefix "attn.", named as the case's model would name them
    (torch.nn.MultiheadAttention's packed in_proj_weight or q_proj_weight/k_proj_weight/
    v_proj_weight, or Hugging Face style q_proj.weight ... out_proj.bias);
  - the inputs "query" [B, Lq, E], "key" [B, Lk, kdim], "value" [B, Lk, vdim], and the masks in
    PyTorch's convention, stored as numbers: "key_padding_mask" [B, Lk] (1 = padding, ignored),
    "attn_mask_bool" [Lq, Lk] (1 = may NOT attend), "attn_mask_float" [Lq, Lk] (added);
  - PyTorch's results "output" [B, Lq, E] and, when asked for, "weights" ([B, Lq, Lk] averaged
    over heads or [B, H, Lq, Lk] per head);
  - the configuration in "__metadata__".
Weights and inputs are rounded to the dtype they are stored in (F32, or F16/BF16 in two cases)
and PyTorch then computes in float64 from exactly those values, so the results are the exact
answer for the stored numbers up to float64 rounding.

The files are written with struct and json (the safetensors package is not needed).
"""
import json
import os
import struct

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")
DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path, tensors, metadata):
    """tensors: name -> torch tensor (stored in its own dtype)."""
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.dtype in (torch.float16, torch.bfloat16) \
            else t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"))
    text += " " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text.encode())
        for b in blobs:
            f.write(b)


def rounded(t, dtype):
    """t rounded to dtype, kept as float64 for the computation."""
    return t.to(dtype).to(torch.float64)


def random_mha(embed, heads, kdim, vdim, bias, gen, store):
    mha = torch.nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim,
                                      batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for p in mha.parameters():
            bound = 1.0 / (p.shape[-1] ** 0.5) if p.dim() > 1 else 0.5
            p.copy_(rounded(torch.empty_like(p).uniform_(-bound, bound, generator=gen), store))
    return mha


def mha_tensors(mha, store, prefix="attn."):
    out = {}
    for name, p in mha.named_parameters():
        out[prefix + name] = p.detach().to(store)
    return out


def inputs(gen, b, lq, lk, embed, kdim, vdim):
    q = rounded(torch.empty(b, lq, embed, dtype=torch.float64).uniform_(-1, 1, generator=gen), torch.float32)
    k = rounded(torch.empty(b, lk, kdim, dtype=torch.float64).uniform_(-1, 1, generator=gen), torch.float32)
    v = rounded(torch.empty(b, lk, vdim, dtype=torch.float64).uniform_(-1, 1, generator=gen), torch.float32)
    return q, k, v


def mha_case(name, *, embed, heads, kdim, vdim, bias, b, lq, lk, store=torch.float32,
             lengths=None, bool_mask=False, float_mask=False, weights="averaged", seed):
    gen = torch.Generator().manual_seed(seed)
    mha = random_mha(embed, heads, kdim, vdim, bias, gen, store)
    q, k, v = inputs(gen, b, lq, lk, embed, kdim, vdim)
    tensors = mha_tensors(mha, store)
    tensors.update(query=q.float(), key=k.float(), value=v.float())
    kwargs = {}
    if lengths is not None:
        pad = torch.arange(lk)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
        kwargs["key_padding_mask"] = pad
        tensors["key_padding_mask"] = pad.float()
    if bool_mask:
        m = torch.rand(lq, lk, generator=gen) < 0.4
        m[:, 0] = False  # every query keeps key 0, so no row is fully masked
        kwargs["attn_mask"] = m
        tensors["attn_mask_bool"] = m.float()
    if float_mask:
        m = rounded(torch.empty(lq, lk, dtype=torch.float64).uniform_(-2, 2, generator=gen), torch.float32)
        kwargs["attn_mask"] = m
        tensors["attn_mask_float"] = m.float()
    with torch.no_grad():
        out, w = mha(q, k, v, need_weights=weights != "none",
                     average_attn_weights=weights == "averaged", **kwargs)
    tensors["output"] = out
    if w is not None:
        tensors["weights"] = w
    naming = "packed" if mha._qkv_same_embed_dim else "torch_separate"
    meta = dict(model_dim=embed, context_dim=kdim, value_context_dim=vdim, num_heads=heads,
                num_kv_heads=heads, bias=int(bias), naming=naming, weights=weights)
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, meta)


def gqa_case(name, *, embed, context, heads, kv_heads, b, lq, lk, store, seed):
    """Grouped-query attention, which nn.MultiheadAttention lacks: computed by hand in PyTorch,
    query head h reading key/value head h // (heads // kv_heads) (K and V heads repeated)."""
    gen = torch.Generator().manual_seed(seed)
    d = embed // heads

    def lin(out_f, in_f):
        bound = 1.0 / in_f ** 0.5
        w = rounded(torch.empty(out_f, in_f, dtype=torch.float64).uniform_(-bound, bound, generator=gen), store)
        bias = rounded(torch.empty(out_f, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen), store)
        return w, bias

    wq, bq = lin(heads * d, embed)
    wk, bk = lin(kv_heads * d, context)
    wv, bv = lin(kv_heads * d, context)
    wo, bo = lin(embed, heads * d)
    q, k, v = inputs(gen, b, lq, lk, embed, context, context)
    lengths = [lk - 2 * i for i in range(b)]
    pad = torch.arange(lk)[None, :] >= torch.tensor(lengths)[:, None]
    Q = (q @ wq.T + bq).view(b, lq, heads, d).transpose(1, 2)
    K = (k @ wk.T + bk).view(b, lk, kv_heads, d).transpose(1, 2)
    V = (v @ wv.T + bv).view(b, lk, kv_heads, d).transpose(1, 2)
    K = K.repeat_interleave(heads // kv_heads, dim=1)
    V = V.repeat_interleave(heads // kv_heads, dim=1)
    s = Q @ K.transpose(-1, -2) / d ** 0.5
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = (p @ V).transpose(1, 2).reshape(b, lq, heads * d) @ wo.T + bo
    tensors = {}
    for n, (w, bias) in dict(q_proj=(wq, bq), k_proj=(wk, bk), v_proj=(wv, bv), out_proj=(wo, bo)).items():
        tensors[f"attn.{n}.weight"] = w.to(store)
        tensors[f"attn.{n}.bias"] = bias.to(store)
    tensors.update(query=q.float(), key=k.float(), value=v.float(), key_padding_mask=pad.float(),
                   output=out, weights=p)
    meta = dict(model_dim=embed, context_dim=context, value_context_dim=context, num_heads=heads,
                num_kv_heads=kv_heads, bias=1, naming="hf", weights="per_head")
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, meta)


def main():
    os.makedirs(OUT, exist_ok=True)
    mha_case("mha_kdim_vdim", embed=16, heads=4, kdim=12, vdim=10, bias=True, b=2, lq=3, lk=5,
             weights="averaged", seed=1)
    mha_case("mha_packed_key_padding", embed=16, heads=2, kdim=16, vdim=16, bias=True, b=3, lq=4,
             lk=6, lengths=[6, 3, 1], weights="per_head", store=torch.bfloat16, seed=2)
    mha_case("mha_bool_attn_mask", embed=12, heads=3, kdim=12, vdim=12, bias=True, b=2, lq=5,
             lk=7, bool_mask=True, weights="averaged", seed=3)
    mha_case("mha_float_attn_mask", embed=12, heads=2, kdim=8, vdim=8, bias=True, b=2, lq=4, lk=6,
             lengths=[6, 4], float_mask=True, weights="per_head", seed=4)
    mha_case("mha_no_bias", embed=16, heads=4, kdim=20, vdim=20, bias=False, b=2, lq=3, lk=4,
             weights="none", seed=5)
    gqa_case("gqa_hf_naming", embed=16, context=12, heads=4, kv_heads=2, b=2, lq=3, lk=6,
             store=torch.float16, seed=6)
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")


if __name__ == "__main__":
    main()
