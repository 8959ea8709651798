#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Writes the hand-made seeds of fuzz/corpus/safetensors/: small valid files and one broken file
# for each check the loader makes. The valid PyTorch fixtures copied there come from
# tests/make_fixtures.py. Run from the repository root: python3 fuzz/make_safetensors_corpus.py
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "safetensors")


def raw(header_text, data=b"", length=None):
    """8-byte little-endian header length (the real one unless given), header, data."""
    h = header_text.encode()
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def valid_file(tensors, metadata=None):
    """A well-formed file: tensors is a list of (name, dtype, shape, bytes)."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, payload in tensors:
        header[name] = entry(dtype, shape, len(data), len(data) + len(payload))
        data += payload
    text = json.dumps(header, separators=(",", ":"))
    text += " " * ((8 - len(text) % 8) % 8)
    return raw(text, data)


def f32(*xs):
    return struct.pack("<%df" % len(xs), *xs)


def f64(*xs):
    return struct.pack("<%dd" % len(xs), *xs)


def hf_layer(dtype, width, model_dim=4, num_heads=2, bias=True):
    """Hugging Face naming under "attn.", model_dim = context_dim, every weight 0x3c (or so)."""
    meta = {"model_dim": str(model_dim), "num_heads": str(num_heads), "bias": "1" if bias else "0"}
    tensors = []
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        tensors.append(("attn.%s.weight" % p, dtype, [model_dim, model_dim],
                        bytes([0x3c]) * (width * model_dim * model_dim)))
        if bias:
            tensors.append(("attn.%s.bias" % p, dtype, [model_dim], bytes([0x3c]) * (width * model_dim)))
    return valid_file(tensors, meta)


def packed_layer(model_dim=4):
    meta = {"model_dim": str(model_dim), "num_heads": "1"}
    e = model_dim
    return valid_file([
        ("attn.in_proj_weight", "F32", [3 * e, e], f32(*([0.5] * (3 * e * e)))),
        ("attn.in_proj_bias", "F32", [3 * e], f32(*([0.25] * (3 * e)))),
        ("attn.out_proj.weight", "F32", [e, e], f32(*([1.0] * (e * e)))),
        ("attn.out_proj.bias", "F32", [e], f32(*([0.0] * e))),
    ], meta)


SEEDS = {
    # Valid files.
    "valid-empty-header": raw("{}"),
    "valid-metadata-only": raw('{"__metadata__":{"format":"pt","k":"v"}}'),
    "valid-every-dtype": valid_file([
        ("a", "F32", [2, 2], f32(1.0, -2.5, float("inf"), float("nan"))),
        ("b", "F64", [3], f64(1e300, -0.0, 5e-324)),
        ("c", "F16", [4], bytes.fromhex("003c00fc017c0100")),
        ("d", "BF16", [2, 1], bytes.fromhex("803f7fff")),
        ("e", "F32", [0, 7], b""),
        ("s", "F64", [], f64(3.0)),
    ]),
    # Integer, BOOL and F8 tensors beside a layer (position_ids ship next to attention weights).
    "valid-other-dtypes-beside-layer": valid_file([
        ("position_ids", "I64", [1, 2], bytes.fromhex("00000000000000000100000000000000")),
        ("flags", "BOOL", [2], bytes.fromhex("0100")),
        ("codes", "F8_E4M3", [2], bytes.fromhex("3844")),
        ("small", "I8", [1], bytes.fromhex("ff")),
        ("attn.in_proj_weight", "F32", [12, 4], f32(*([0.5] * 48))),
        ("attn.in_proj_bias", "F32", [12], f32(*([1.0] * 12))),
        ("attn.out_proj.weight", "F32", [4, 4], f32(*([0.25] * 16))),
        ("attn.out_proj.bias", "F32", [4], f32(*([0.0] * 4))),
    ], {"model_dim": "4"}),
    # Read as float, 1e300 is out of range: a format_error naming the tensor.
    "valid-f64-beyond-float": valid_file([("big", "F64", [2], f64(1.0, 1e300))]),
    "valid-hf-f16": hf_layer("F16", 2),
    "valid-hf-bf16-no-bias": hf_layer("BF16", 2, bias=False),
    "valid-packed-f32": packed_layer(),
    # Broken files.
    "broken-empty": b"",
    "broken-7-bytes": b"\x02\x00\x00\x00\x00\x00\x00",
    "broken-truncated-header": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')[:30],
    "broken-header-past-end": raw("{}", length=100),
    "broken-header-length-2p64-1": raw("{}", length=2**64 - 1),
    "broken-header-length-2p63": raw("{}", length=2**63),
    "broken-header-length-wraps": raw("{}", length=2**64 - 8),
    "broken-bad-json": raw('{"a": [1, 2'),
    "broken-json-array": raw("[1, 2]"),
    "broken-json-nested": raw("[" * 200 + "]" * 200),
    "broken-offsets-past-end": raw(json.dumps({"w": entry("F32", [2], 0, 8)}), b"\0" * 4),
    "broken-offsets-huge": raw(json.dumps({"w": entry("F32", [2], 2**64 - 8, 2**64 - 1)}), b"\0" * 8),
    "broken-offsets-reversed": raw(json.dumps({"w": entry("F32", [0], 8, 4)}), b"\0" * 8),
    "broken-offsets-overlap": raw(json.dumps({"a": entry("F32", [2], 0, 8),
                                              "b": entry("F32", [2], 4, 12)}), b"\0" * 12),
    "broken-offsets-not-pair": raw(json.dumps({"w": {"dtype": "F32", "shape": [2],
                                                     "data_offsets": [0]}}), b"\0" * 8),
    "broken-offsets-negative": raw(json.dumps({"w": entry("F32", [2], -8, 0)}), b"\0" * 8),
    "broken-shape-size-mismatch": raw(json.dumps({"w": entry("F32", [3, 2], 0, 20)}), b"\0" * 24),
    "broken-shape-negative": raw(json.dumps({"w": entry("F32", [-2], 0, 0)})),
    "broken-shape-float": raw(json.dumps({"w": entry("F32", [2.5], 0, 10)}), b"\0" * 10),
    "broken-shape-not-array": raw(json.dumps({"w": entry("F32", 4, 0, 16)}), b"\0" * 16),
    "broken-shape-product-overflows": raw(json.dumps({"w": entry("F64", [2**32, 2**32], 0, 0)})),
    "broken-shape-bytes-overflow": raw(json.dumps({"w": entry("F64", [2**61], 0, 0)})),
    "broken-shape-huge-dim": raw(json.dumps({"w": entry("F32", [2**64 - 1], 0, 0)})),
    "broken-shape-nested": raw('{"w":{"dtype":"F32","shape":[[[[[1]]]]],"data_offsets":[0,4]}}',
                               b"\0" * 4),
    # Found by fuzzing: quoting a deeply nested shape entry in the error overflowed the stack.
    "crash-shape-deep-nesting": raw('{"w":{"dtype":"F32","shape":[' + "[" * 64000 + "]" * 64000 +
                                    '],"data_offsets":[0,0]}}'),
    "broken-dtype-unknown": raw(json.dumps({"w": entry("Q4", [2], 0, 1)}), b"\0"),
    "broken-dtype-not-string": raw(json.dumps({"w": entry(4, [1], 0, 4)}), b"\0" * 4),
    "broken-entry-missing-keys": raw(json.dumps({"w": {"dtype": "F32", "shape": [2]}}), b"\0" * 8),
    "broken-entry-not-object": raw('{"w": 3}'),
    "broken-metadata-not-string": raw('{"__metadata__": {"k": 1}}'),
    "broken-metadata-not-object": raw('{"__metadata__": [1]}'),
    "broken-data-cut-short": valid_file([("x", "F32", [4], f32(1, 2, 3, 4))])[:-3],
    "broken-layer-wrong-shape": valid_file(
        [("attn.q_proj.weight", "F32", [4, 3], f32(*([1.0] * 12)))],
        {"model_dim": "4", "num_heads": "2"}),
    "broken-layer-bias-without-weight": valid_file(
        [("attn.in_proj_bias", "F32", [12], f32(*([1.0] * 12)))], {"model_dim": "4"}),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, content in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(content)


if __name__ == "__main__":
    main()
