#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes the PyTorch reference fixtures that tests/test_safetensors.cpp checks the
cross-attention module against. The fixtures are committed, so building and testing xattn never
needs PyTorch; run this only to change or add a case.

Regenerate (Debian: `apt-get install python3-torch`, which installs into the system Python, so
call that interpreter explicitly if another python3 comes first on PATH):

    /usr/bin/python3 tests/make_fixtures.py              # writes tests/fixtures/*.safetensors
    /usr/bin/python3 tests/make_fixtures.py --gradients  # only the grad_*.safetensors files
    /usr/bin/python3 tests/make_fixtures.py --half       # only the half_*.safetensors files

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
DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64"}


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


# ---- real checkpoint layouts ---------------------------------------------------------------
# Each case writes one attention layer under the exact names and shapes its model family uses
# (at small sizes), plus tensors of the same model around it, and the output of that model's own
# attention forward, transcribed below from the upstream function named in each docstring.
# Inputs: "query" [B, Lq, Dm] and "context" [B, Lk, Dc]; result: "output" [B, Lq, Dm];
# metadata: the layer's prefix, num_heads and layout.

def rand_lin(gen, out_f, in_f, store, bias=True):
    bound = 1.0 / in_f ** 0.5
    w = rounded(torch.empty(out_f, in_f, dtype=torch.float64).uniform_(-bound, bound, generator=gen), store)
    b = rounded(torch.empty(out_f, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen), store) \
        if bias else None
    return w, b


def linear(x, w, b):
    return x @ w.T + (b if b is not None else 0)


def rand_inputs(gen, b, lq, lk, dm, dc):
    q = rounded(torch.empty(b, lq, dm, dtype=torch.float64).uniform_(-1, 1, generator=gen), torch.float32)
    c = rounded(torch.empty(b, lk, dc, dtype=torch.float64).uniform_(-1, 1, generator=gen), torch.float32)
    return q, c


def add_linear(tensors, name, w, b, store):
    tensors[name + ".weight"] = w.to(store)
    if b is not None:
        tensors[name + ".bias"] = b.to(store)


def write_layout_case(name, tensors, q, c, out, prefix, heads, layout):
    tensors.update(query=q.float(), context=c.float(), output=out)
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors,
                      dict(prefix=prefix, num_heads=heads, layout=layout))


def hf_whisper_or_bart(name, *, k_bias, store, seed):
    """transformers' WhisperAttention.forward / BartAttention.forward (cross-attention branch):
    query_states = q_proj(hidden_states) * scaling (scaling = head_dim ** -0.5); key and value
    states from k_proj and v_proj of key_value_states; attn_weights = softmax(bmm(q, kᵀ));
    attn_output = out_proj(bmm(attn_weights, v)). Whisper's k_proj has bias=False."""
    gen = torch.Generator().manual_seed(seed)
    d_model, heads, b, lq, lk = 16, 4, 2, 3, 7
    hd = d_model // heads
    prefix = "model.decoder.layers.0.encoder_attn"
    tensors = {}
    # the decoder layer's self-attention sits beside it under the same layout
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        w, bias = rand_lin(gen, d_model, d_model, store, bias=(proj != "k_proj" or k_bias))
        add_linear(tensors, "model.decoder.layers.0.self_attn." + proj, w, bias, store)
    wq, bq = rand_lin(gen, d_model, d_model, store)
    wk, bk = rand_lin(gen, d_model, d_model, store, bias=k_bias)
    wv, bv = rand_lin(gen, d_model, d_model, store)
    wo, bo = rand_lin(gen, d_model, d_model, store)
    for proj, (w, bias) in dict(q_proj=(wq, bq), k_proj=(wk, bk), v_proj=(wv, bv), out_proj=(wo, bo)).items():
        add_linear(tensors, f"{prefix}.{proj}", w, bias, store)
    tensors["model.decoder.embed_positions.weight"] = torch.zeros(4, d_model).to(store)
    q, c = rand_inputs(gen, b, lq, lk, d_model, d_model)
    scaling = hd ** -0.5
    qs = (linear(q, wq, bq) * scaling).view(b, lq, heads, hd).transpose(1, 2).reshape(b * heads, lq, hd)
    ks = linear(c, wk, bk).view(b, lk, heads, hd).transpose(1, 2).reshape(b * heads, lk, hd)
    vs = linear(c, wv, bv).view(b, lk, heads, hd).transpose(1, 2).reshape(b * heads, lk, hd)
    w = torch.softmax(torch.bmm(qs, ks.transpose(1, 2)), dim=-1)
    o = torch.bmm(w, vs).view(b, heads, lq, hd).transpose(1, 2).reshape(b, lq, d_model)
    write_layout_case(name, tensors, q, c, linear(o, wo, bo), prefix, heads, "hugging_face")


def diffusers_attn2(name, *, store, seed):
    """diffusers' Attention with AttnProcessor.__call__ (a UNet transformer block's attn2):
    query = to_q(hidden_states), key = to_k(encoder_hidden_states), value = to_v(...), all three
    bias=False; get_attention_scores: baddbmm(empty, query, keyᵀ, beta=0, alpha=scale) with
    scale = dim_head ** -0.5, then softmax; bmm with value; to_out[0] (Linear, with bias), then
    to_out[1] (Dropout, identity in eval)."""
    gen = torch.Generator().manual_seed(seed)
    query_dim, heads, dim_head, cross_dim, b, lq, lk = 16, 2, 8, 12, 2, 9, 5
    inner = heads * dim_head
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    prefix = block + ".attn2"
    tensors = {}
    for proj, in_f in (("to_q", query_dim), ("to_k", query_dim), ("to_v", query_dim)):
        w, _ = rand_lin(gen, inner, in_f, store, bias=False)
        add_linear(tensors, f"{block}.attn1.{proj}", w, None, store)
    w, bias = rand_lin(gen, query_dim, inner, store)
    add_linear(tensors, f"{block}.attn1.to_out.0", w, bias, store)
    wq, _ = rand_lin(gen, inner, query_dim, store, bias=False)
    wk, _ = rand_lin(gen, inner, cross_dim, store, bias=False)
    wv, _ = rand_lin(gen, inner, cross_dim, store, bias=False)
    wo, bo = rand_lin(gen, query_dim, inner, store)
    add_linear(tensors, prefix + ".to_q", wq, None, store)
    add_linear(tensors, prefix + ".to_k", wk, None, store)
    add_linear(tensors, prefix + ".to_v", wv, None, store)
    add_linear(tensors, prefix + ".to_out.0", wo, bo, store)
    tensors[block + ".norm2.weight"] = torch.ones(query_dim).to(store)
    q, c = rand_inputs(gen, b, lq, lk, query_dim, cross_dim)

    def head_to_batch_dim(t):
        bb, n, _ = t.shape
        return t.reshape(bb, n, heads, dim_head).permute(0, 2, 1, 3).reshape(bb * heads, n, dim_head)

    query, key, value = (head_to_batch_dim(linear(q, wq, None)), head_to_batch_dim(linear(c, wk, None)),
                         head_to_batch_dim(linear(c, wv, None)))
    # diffusers passes torch.empty as the ignored input (beta=0); zeros give the same result
    # without reading uninitialised memory (which PyTorch's CPU baddbmm does not always skip)
    scores = torch.baddbmm(torch.zeros(b * heads, lq, lk, dtype=torch.float64), query,
                           key.transpose(-1, -2), beta=0, alpha=dim_head ** -0.5)
    probs = scores.softmax(dim=-1)
    h = torch.bmm(probs, value).reshape(b, heads, lq, dim_head).permute(0, 2, 1, 3).reshape(b, lq, inner)
    write_layout_case(name, tensors, q, c, linear(h, wo, bo), prefix, heads, "diffusers")


def openai_whisper_cross_attn(name, *, seed):
    """openai-whisper's MultiHeadAttention.forward and qkv_attention (model.py): q = query(x),
    k = key(xa) (Linear with bias=False), v = value(xa); scale = (n_state // n_head) ** -0.25
    applied to q and to k; w = softmax(q @ k); out((w @ v) with the heads flattened)."""
    gen = torch.Generator().manual_seed(seed)
    n_state, n_head, b, lq, lk = 24, 3, 2, 4, 6
    prefix = "decoder.blocks.0.cross_attn"
    store = torch.float32
    wq, bq = rand_lin(gen, n_state, n_state, store)
    wk, _ = rand_lin(gen, n_state, n_state, store, bias=False)
    wv, bv = rand_lin(gen, n_state, n_state, store)
    wo, bo = rand_lin(gen, n_state, n_state, store)
    tensors = {}
    for n, (w, bias) in dict(query=(wq, bq), key=(wk, None), value=(wv, bv), out=(wo, bo)).items():
        add_linear(tensors, f"{prefix}.{n}", w, bias, store)
        add_linear(tensors, f"decoder.blocks.0.attn.{n}", w, bias, store)  # self-attention
    tensors["decoder.blocks.0.cross_attn_ln.weight"] = torch.ones(n_state)
    x, xa = rand_inputs(gen, b, lq, lk, n_state, n_state)
    qv, kv_, vv = linear(x, wq, bq), linear(xa, wk, None), linear(xa, wv, bv)
    scale = (n_state // n_head) ** -0.25
    qh = qv.view(*qv.shape[:2], n_head, -1).permute(0, 2, 1, 3) * scale
    kh = kv_.view(*kv_.shape[:2], n_head, -1).permute(0, 2, 3, 1) * scale
    vh = vv.view(*vv.shape[:2], n_head, -1).permute(0, 2, 1, 3)
    w = torch.softmax(qh @ kh, dim=-1)
    o = (w @ vh).permute(0, 2, 1, 3).flatten(start_dim=2)
    write_layout_case(name, tensors, x, xa, linear(o, wo, bo), prefix, n_head, "openai_whisper")


def t5_enc_dec_attention(name, *, seed):
    """transformers' T5Attention.forward for the EncDecAttention of a decoder block: q, k, v, o
    are Linear(bias=False) with inner_dim = n_heads * d_kv (384 != d_model 512 in flan-T5-small);
    scores = matmul(query_states, key_statesᵀ) with no scaling, plus a position bias of zeros (a
    cross-attention layer has no relative attention bias); softmax(scores.float()); o(matmul)."""
    gen = torch.Generator().manual_seed(seed)
    d_model, n_heads, d_kv, b, lq, lk = 16, 3, 8, 2, 3, 5
    inner = n_heads * d_kv
    prefix = "decoder.block.0.layer.1.EncDecAttention"
    store = torch.float32
    # T5 initialises q with a smaller spread (d_model * d_kv) ** -0.5 so unscaled scores stay small
    wq, _ = rand_lin(gen, inner, d_model, store, bias=False)
    wq = rounded(wq * d_kv ** -0.5, store)
    wk, _ = rand_lin(gen, inner, d_model, store, bias=False)
    wv, _ = rand_lin(gen, inner, d_model, store, bias=False)
    wo, _ = rand_lin(gen, d_model, inner, store, bias=False)
    tensors = {}
    for n, w in dict(q=wq, k=wk, v=wv, o=wo).items():
        add_linear(tensors, f"{prefix}.{n}", w, None, store)
        add_linear(tensors, f"decoder.block.0.layer.0.SelfAttention.{n}", w, None, store)
    tensors["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
        torch.zeros(32, n_heads)
    q, c = rand_inputs(gen, b, lq, lk, d_model, d_model)

    def shape(t):
        return t.view(b, -1, n_heads, d_kv).transpose(1, 2)

    qs, ks, vs = shape(linear(q, wq, None)), shape(linear(c, wk, None)), shape(linear(c, wv, None))
    scores = torch.matmul(qs, ks.transpose(3, 2))
    scores += torch.zeros(1, n_heads, lq, lk, dtype=scores.dtype)  # position_bias
    attn = torch.softmax(scores, dim=-1)
    o = torch.matmul(attn, vs).transpose(1, 2).contiguous().view(b, -1, inner)
    write_layout_case(name, tensors, q, c, linear(o, wo, None), prefix, n_heads, "t5")


def torch_decoder_layer(name, *, seed):
    """torch.nn.TransformerDecoderLayer: its multihead_attn (the cross-attention over memory) is
    an nn.MultiheadAttention with packed in_proj_weight; the whole layer's state_dict is saved."""
    torch.manual_seed(seed)
    d_model, nhead, b, lq, lk = 16, 4, 2, 5, 3
    layer = torch.nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward=32, batch_first=True,
                                             dtype=torch.float64).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(rounded(p, torch.float32))
    gen = torch.Generator().manual_seed(seed)
    q, c = rand_inputs(gen, b, lq, lk, d_model, d_model)
    with torch.no_grad():
        out, _ = layer.multihead_attn(q, c, c, need_weights=False)
    tensors = {"decoder.layers.0." + k: v.float() for k, v in layer.state_dict().items()}
    write_layout_case(name, tensors, q, c, out, "decoder.layers.0.multihead_attn", nhead,
                      "torch_packed")


# ---- gradients (the backward pass) ------------------------------------------------------------
# Files grad_*.safetensors, written by main_gradients() (`make_fixtures.py --gradients` writes
# only these). The forward is computed in float64 from float32-rounded weights and inputs as
# above, then autograd runs from a fixed upstream gradient "dout"; every gradient is stored under
# "grad." + the name of what it is the gradient of.
#   module cases (nn.MultiheadAttention, or by hand for grouped-query heads): the layer's weights
#     under "attn." as above, inputs, masks, "output", "dout" [B, Lq, E], and "grad.query",
#     "grad.key", "grad.value" and "grad.q_proj.weight" ... "grad.out_proj.bias" (PyTorch's
#     packed in_proj gradients split into q, k and v, so every case uses the same names);
#   kernel cases (scaled dot-product attention on per-head tensors, by hand): "q" [B, H, Lq, D],
#     "k", "v" [B, Hkv, Lk, D|Dv], "dout", the masks, "output", "lse" and "grad.q", "grad.k",
#     "grad.v" and, with a float mask, "grad.attn_mask_float".

def split_in_proj(mha, embed):
    """The gradients of nn.MultiheadAttention's parameters under q_proj/k_proj/v_proj names."""
    out = {}
    named = dict(mha.named_parameters())
    if "in_proj_weight" in named:
        w = named["in_proj_weight"].grad
        for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"grad.{n}.weight"] = w[i * embed:(i + 1) * embed]
    else:
        for n in ("q_proj", "k_proj", "v_proj"):
            out[f"grad.{n}.weight"] = named[n + "_weight"].grad
    if "in_proj_bias" in named and named["in_proj_bias"] is not None:
        b = named["in_proj_bias"].grad
        for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"grad.{n}.bias"] = b[i * embed:(i + 1) * embed]
    out["grad.out_proj.weight"] = named["out_proj.weight"].grad
    if named.get("out_proj.bias") is not None:
        out["grad.out_proj.bias"] = named["out_proj.bias"].grad
    return out


def grad_mha_case(name, *, embed, heads, kdim, vdim, bias, b, lq, lk, lengths=None,
                  bool_mask=False, float_mask=False, seed):
    gen = torch.Generator().manual_seed(seed)
    mha = random_mha(embed, heads, kdim, vdim, bias, gen, torch.float32)
    q, k, v = inputs(gen, b, lq, lk, embed, kdim, vdim)
    dout = rounded(torch.empty(b, lq, embed, dtype=torch.float64).uniform_(-1, 1, generator=gen),
                   torch.float32)
    tensors = mha_tensors(mha, torch.float32)
    tensors.update(query=q.float(), key=k.float(), value=v.float(), dout=dout.float())
    kwargs = {}
    if lengths is not None:
        pad = torch.arange(lk)[None, :] >= torch.tensor(lengths)[:, None]
        kwargs["key_padding_mask"] = pad
        tensors["key_padding_mask"] = pad.float()
    if bool_mask:
        m = torch.rand(lq, lk, generator=gen) < 0.4
        m[:, 0] = False
        kwargs["attn_mask"] = m
        tensors["attn_mask_bool"] = m.float()
    if float_mask:
        m = rounded(torch.empty(lq, lk, dtype=torch.float64).uniform_(-2, 2, generator=gen),
                    torch.float32)
        kwargs["attn_mask"] = m
        tensors["attn_mask_float"] = m.float()
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = mha(q, k, v, need_weights=False, **kwargs)
    out.backward(dout)
    tensors["output"] = out.detach()
    tensors.update({"grad.query": q.grad, "grad.key": k.grad, "grad.value": v.grad})
    tensors.update(split_in_proj(mha, embed))
    naming = "packed" if mha._qkv_same_embed_dim else "torch_separate"
    meta = dict(model_dim=embed, context_dim=kdim, value_context_dim=vdim, num_heads=heads,
                num_kv_heads=heads, bias=int(bias), naming=naming)
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, meta)


def grad_gqa_case(name, *, embed, context, heads, kv_heads, b, lq, lk, seed):
    """Grouped-query heads by hand (K and V heads repeated), as gqa_case, with autograd."""
    gen = torch.Generator().manual_seed(seed)
    d = embed // heads
    params = {}
    for n, (o, i) in dict(q_proj=(heads * d, embed), k_proj=(kv_heads * d, context),
                          v_proj=(kv_heads * d, context), out_proj=(embed, heads * d)).items():
        w, bias = rand_lin(gen, o, i, torch.float32)
        params[n] = (w.requires_grad_(True), bias.requires_grad_(True))
    q, k, v = inputs(gen, b, lq, lk, embed, context, context)
    dout = rounded(torch.empty(b, lq, embed, dtype=torch.float64).uniform_(-1, 1, generator=gen),
                   torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    lengths = [lk - 2 * i for i in range(b)]
    pad = torch.arange(lk)[None, :] >= torch.tensor(lengths)[:, None]
    Q = linear(q, *params["q_proj"]).view(b, lq, heads, d).transpose(1, 2)
    K = linear(k, *params["k_proj"]).view(b, lk, kv_heads, d).transpose(1, 2)
    V = linear(v, *params["v_proj"]).view(b, lk, kv_heads, d).transpose(1, 2)
    K = K.repeat_interleave(heads // kv_heads, dim=1)
    V = V.repeat_interleave(heads // kv_heads, dim=1)
    s = (Q / d ** 0.5) @ K.transpose(-1, -2)
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    out = linear((torch.softmax(s, dim=-1) @ V).transpose(1, 2).reshape(b, lq, heads * d),
                 *params["out_proj"])
    out.backward(dout)
    tensors = {}
    for n, (w, bias) in params.items():
        tensors[f"attn.{n}.weight"] = w.detach().float()
        tensors[f"attn.{n}.bias"] = bias.detach().float()
        tensors[f"grad.{n}.weight"] = w.grad
        tensors[f"grad.{n}.bias"] = bias.grad
    tensors.update(query=q.detach().float(), key=k.detach().float(), value=v.detach().float(),
                   key_padding_mask=pad.float(), dout=dout.float(), output=out.detach())
    tensors.update({"grad.query": q.grad, "grad.key": k.grad, "grad.value": v.grad})
    meta = dict(model_dim=embed, context_dim=context, value_context_dim=context, num_heads=heads,
                num_kv_heads=kv_heads, bias=1, naming="hf")
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, meta)


def grad_kernel_case(name, *, b, heads, kv_heads, lq, lk, d, dv, lengths=None, bool_mask=False,
                     float_mask=False, causal=None, seed):
    """Scaled dot-product attention on per-head tensors, by hand, with autograd: the reference
    for naive_attention_backward and tiled_attention_backward. causal: "top_left" or
    "bottom_right" (query i sees keys j <= i, or j <= i + Lk - Lq)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, lo=-1.0, hi=1.0):
        return rounded(torch.empty(*shape, dtype=torch.float64).uniform_(lo, hi, generator=gen),
                       torch.float32)

    q, k, v = rnd(b, heads, lq, d), rnd(b, kv_heads, lk, d), rnd(b, kv_heads, lk, dv)
    dout = rnd(b, heads, lq, dv)
    tensors = dict(q=q.float(), k=k.float(), v=v.float(), dout=dout.float())
    leaves = [q, k, v]
    allowed = torch.ones(b, heads, lq, lk, dtype=torch.bool)
    if lengths is not None:
        allowed &= (torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
        tensors["kv_lengths"] = torch.tensor(lengths, dtype=torch.float32)  # read as numbers
    if bool_mask:
        m = torch.rand(lq, lk, generator=gen) < 0.4
        m[:, 0] = False
        allowed &= ~m
        tensors["attn_mask_bool"] = m.float()
    if causal is not None:
        shift = 0 if causal == "top_left" else lk - lq
        allowed &= torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + shift
    bias = None
    if float_mask:
        bias = rnd(lq, lk, lo=-2.0, hi=2.0)
        tensors["attn_mask_float"] = bias.float()
        leaves.append(bias)
    for t in leaves:
        t.requires_grad_(True)
    group = heads // kv_heads
    K, V = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q / d ** 0.5) @ K.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked row weighs nothing
    out = p @ V
    out.backward(dout)
    tensors.update(output=out.detach(), lse=lse.detach())
    tensors.update({"grad.q": q.grad, "grad.k": k.grad, "grad.v": v.grad})
    if bias is not None:
        tensors["grad.attn_mask_float"] = bias.grad
    meta = dict(causal=causal or "none")
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, meta)


# Files half_kernel_*.safetensors, written by main_half() (`make_fixtures.py --half` writes only
# these): scaled dot-product attention computed by PyTorch in bfloat16 as its math path does,
# every step rounded to bf16 (q · scale, Q Kᵀ, + bias or masked_fill -inf, softmax, P V). Stored,
# all in BF16: "q" [B, H, Lq, D], "k", "v" [B, Hkv, Lk, D|Dv], the masks ("kv_lengths" as float,
# "attn_mask_bool" 1 = may attend, "attn_mask_float" [Lq, Lk]), and torch's "output". Metadata:
# "causal" (none, top_left, bottom_right). (PyTorch 1.13 on the CPU multiplies no fp16
# matrices, so there are no fp16 files.)

def half_kernel_case(name, *, b, heads, kv_heads, lq, lk, d, dv, lengths=None, bool_mask=False,
                     float_mask=False, causal="none", seed):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    q = torch.empty(b, heads, lq, d).uniform_(-2, 2, generator=gen).to(dt)
    k = torch.empty(b, kv_heads, lk, d).uniform_(-2, 2, generator=gen).to(dt)
    v = torch.empty(b, kv_heads, lk, dv).uniform_(-1, 1, generator=gen).to(dt)
    tensors = {"q": q, "k": k, "v": v}
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if lengths is not None:
        allowed &= (torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
        tensors["kv_lengths"] = torch.tensor(lengths, dtype=torch.float32).to(dt)
    if causal != "none":
        shift = 0 if causal == "top_left" else lk - lq
        allowed &= (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + shift)[None, None]
    if bool_mask:
        m = torch.rand(lq, lk, generator=gen) < 0.7
        m[:, 0] = True  # every row keeps a key: PyTorch's fully masked rows are NaN
        allowed &= m[None, None]
        tensors["attn_mask_bool"] = m.float().to(dt)
    group = heads // kv_heads
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    scores = (q * torch.tensor(d ** -0.5, dtype=dt)) @ kk.transpose(-2, -1)
    if float_mask:
        m = torch.empty(lq, lk).uniform_(-2, 2, generator=gen).to(dt)
        scores = scores + m
        tensors["attn_mask_float"] = m
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vv
    assert out.dtype == dt and not torch.isnan(out).any()
    tensors["output"] = out
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, {"causal": causal})


# half_module_hf_whisper.safetensors: a Hugging Face Whisper cross-attention layer (k_proj without
# a bias) run in bfloat16 as transformers runs a bf16 model: every linear, the scaling of the
# queries, Q Kᵀ, the softmax and P V computed by PyTorch on bf16 tensors, each result rounded to
# bf16. Weights, "query" [B, Lq, Dm], "context" [B, Lk, Dm] and torch's "output", all BF16.
def half_module_case(name, *, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    d_model, heads, b, lq, lk = 64, 4, 2, 5, 40
    hd = d_model // heads
    prefix = "model.decoder.layers.0.encoder_attn"
    tensors = {}
    lins = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        w, bias = rand_lin(gen, d_model, d_model, dt, bias=proj != "k_proj")
        add_linear(tensors, f"{prefix}.{proj}", w, bias, dt)
        lins[proj] = (w.to(dt), bias.to(dt) if bias is not None else None)
    q, c = rand_inputs(gen, b, lq, lk, d_model, d_model)
    q, c = (2 * q).to(dt), (2 * c).to(dt)  # scores of a few units: softmax far from uniform

    def lin(x, proj):
        return torch.nn.functional.linear(x, *lins[proj])

    def heads_of(t, n):
        return t.view(b, n, heads, hd).transpose(1, 2)

    qs = heads_of(lin(q, "q_proj") * torch.tensor(hd ** -0.5, dtype=dt), lq)
    ks = heads_of(lin(c, "k_proj"), lk)
    vs = heads_of(lin(c, "v_proj"), lk)
    o = (torch.softmax(qs @ ks.transpose(-2, -1), dim=-1) @ vs).transpose(1, 2).reshape(b, lq, d_model)
    out = lin(o, "out_proj")
    assert out.dtype == dt and not torch.isnan(out).any()
    tensors.update(query=q, context=c, output=out)
    write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors,
                      dict(prefix=prefix, num_heads=heads, layout="hugging_face"))


def main_half():
    os.makedirs(OUT, exist_ok=True)
    half_module_case("half_module_hf_whisper", seed=44)
    half_kernel_case("half_kernel_plain", b=2, heads=4, kv_heads=4, lq=7, lk=77, d=40, dv=40,
                     seed=41)
    half_kernel_case("half_kernel_decoder_gqa", b=1, heads=8, kv_heads=2, lq=1, lk=300, d=64,
                     dv=64, lengths=[250], seed=42)
    half_kernel_case("half_kernel_masks", b=2, heads=2, kv_heads=1, lq=20, lk=33, d=16, dv=8,
                     lengths=[33, 20], bool_mask=True, float_mask=True, causal="bottom_right",
                     seed=43)
    for f in sorted(os.listdir(OUT)):
        if f.startswith("half_"):
            print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")


def main_gradients():
    os.makedirs(OUT, exist_ok=True)
    grad_mha_case("grad_mha_kdim_vdim", embed=8, heads=2, kdim=6, vdim=5, bias=True, b=2, lq=3,
                  lk=4, seed=21)
    grad_mha_case("grad_mha_packed_key_padding", embed=8, heads=2, kdim=8, vdim=8, bias=True, b=3,
                  lq=4, lk=5, lengths=[5, 3, 1], seed=22)
    grad_mha_case("grad_mha_bool_attn_mask", embed=6, heads=3, kdim=6, vdim=6, bias=True, b=2,
                  lq=4, lk=5, bool_mask=True, seed=23)
    grad_mha_case("grad_mha_float_attn_mask", embed=8, heads=2, kdim=4, vdim=4, bias=True, b=2,
                  lq=3, lk=5, lengths=[5, 2], float_mask=True, seed=24)
    grad_mha_case("grad_mha_no_bias", embed=8, heads=4, kdim=10, vdim=10, bias=False, b=2, lq=3,
                  lk=4, seed=25)
    grad_gqa_case("grad_gqa_hf_naming", embed=8, context=6, heads=4, kv_heads=2, b=2, lq=3, lk=6,
                  seed=26)
    grad_kernel_case("grad_kernel_gqa_key_padding", b=2, heads=4, kv_heads=2, lq=5, lk=7, d=3,
                     dv=2, lengths=[7, 3], seed=27)
    grad_kernel_case("grad_kernel_bool_mask_causal", b=2, heads=2, kv_heads=1, lq=6, lk=4, d=4,
                     dv=3, bool_mask=True, causal="bottom_right", seed=28)
    grad_kernel_case("grad_kernel_float_mask", b=2, heads=2, kv_heads=2, lq=4, lk=6, d=2, dv=5,
                     lengths=[6, 0], float_mask=True, causal="top_left", seed=29)
    for f in sorted(os.listdir(OUT)):
        if f.startswith("grad_"):
            print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")


def main():
    os.makedirs(OUT, exist_ok=True)
    hf_whisper_or_bart("layout_hf_whisper", k_bias=False, store=torch.float32, seed=11)
    hf_whisper_or_bart("layout_hf_bart", k_bias=True, store=torch.float32, seed=12)
    diffusers_attn2("layout_diffusers_fp16", store=torch.float16, seed=13)
    openai_whisper_cross_attn("layout_openai_whisper", seed=14)
    t5_enc_dec_attention("layout_t5", seed=15)
    torch_decoder_layer("layout_torch_decoder_layer", seed=16)
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
    import sys
    if "--gradients" in sys.argv:
        main_gradients()
    elif "--half" in sys.argv:
        main_half()
    else:
        main()
        main_gradients()
        main_half()
