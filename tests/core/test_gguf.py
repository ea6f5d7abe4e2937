"""GGUF DiT checkpoints: our torch dequantization against gguf-py's (an independent implementation), a DiT that
keeps its weights packed against the same weights dequantized at load, ComfyUI-GGUF's reshaped tensors, inspect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phantom_core.loading.files import read_state_dict
from phantom_core.loading.fp8 import weight_bytes
from phantom_core.loading.gguf import PackedTensor, read_gguf
from phantom_core.loading.gguf_quants import GGML_TYPES, dequantize_ggml
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.inspect import inspect_checkpoint
from phantom_core.wan.load import load_dit
from tests.support.gguf_files import BLOCK_QUANT, random_blocks, write_gguf

gguf = pytest.importorskip("gguf")
TINY = DIT_PRESETS["tiny"]
TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}


@pytest.mark.parametrize("type_name", BLOCK_QUANT)
def test_dequantization_matches_gguf_py(type_name):
    rng = np.random.default_rng(1)
    per_block = GGML_TYPES[TYPE_IDS[type_name]][1]
    rows, cols = 5, 2 * per_block if per_block > 32 else 8 * per_block
    blocks = random_blocks(type_name, rows * cols // per_block, rng).reshape(rows, -1)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name])  # (rows, cols) float32
    ours = dequantize_ggml(torch.from_numpy(blocks), TYPE_IDS[type_name], (rows, cols)).numpy()
    assert ours.shape == theirs.shape == (rows, cols)
    # same arithmetic in another order: float32 rounding only
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * np.abs(theirs).max())


def test_bad_sizes_and_types_are_named():
    with pytest.raises(ValueError, match="Q4_K tensor of shape .* needs 144 bytes"):
        dequantize_ggml(torch.zeros(100, dtype=torch.uint8), TYPE_IDS["Q4_K"], (1, 256))
    with pytest.raises(ValueError, match="GGML type 10 is not supported; supported: F32"):
        dequantize_ggml(torch.zeros(84, dtype=torch.uint8), 10, (1, 256))  # Q2_K


def quant_of(key: str, tensor: torch.Tensor) -> str:
    """ComfyUI-GGUF's choice, mixed as in a *_K_M file: 1-D and small tensors F32, FFN-out Q6_K, other weights
    rotating through the block types; the text embedding's first Linear (64 inputs, no whole block) F16."""
    if tensor.ndim == 1 or tensor.numel() <= 4096 or key.startswith("text_embedding.0"):
        return "F16" if key.startswith("text_embedding.0") else "F32"
    if key.endswith("ffn.2.weight"):
        return "Q6_K"
    return BLOCK_QUANT[sum(map(ord, key)) % 3]  # Q8_0 / Q4_K / Q5_K


@pytest.fixture(scope="module")
def gguf_dit(tmp_path_factory):
    torch.manual_seed(0)
    model = PhantomWanDiT(TINY)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "phantom_tiny-Q4_K_M.gguf", sd, quant_of)
    gen = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 16, 2, 8, 8, generator=gen), torch.tensor([700.0]),
              torch.randn(1, 12, TINY.text_dim, generator=gen), torch.randn(1, 16, 2, 8, 8, generator=gen))
    return path, sd, inputs


def test_reader_keeps_block_types_packed_and_restores_reshaped_shapes(gguf_dit):
    path, sd, _ = gguf_dit
    read = read_gguf(path)
    assert set(read) == set(sd)
    packed = {k: v for k, v in read.items() if isinstance(v, PackedTensor)}
    assert {p.type_name for p in packed.values()} == set(BLOCK_QUANT)
    assert all(tuple(v.shape) == tuple(sd[k].shape) for k, v in read.items())  # incl. the 5-D patch embedding
    assert packed["patch_embedding.weight"].shape == (256, 16, 1, 2, 2)  # stored as rows of 256 + orig_shape
    key = next(k for k, p in packed.items() if p.type_name == "Q8_0")  # quantized from the real weights
    torch.testing.assert_close(packed[key].dequantize(), sd[key], rtol=0, atol=sd[key].abs().max().item() / 100)
    with pytest.raises(ValueError, match="only the DiT loader reads GGUF"):
        read_state_dict(path)


@torch.no_grad()
def test_packed_dit_equals_the_dequantized_state_dict(gguf_dit):
    path, _, inputs = gguf_dit
    packed = load_dit(path, dtype=None)  # stays block-quantized, dequantized per layer on the forward
    unpacked = load_dit(path, dtype=torch.float32)  # dequantized while loading: the reference
    assert packed.blocks[0].self_attn.q.weight.dtype == torch.uint8
    assert unpacked.blocks[0].self_attn.q.weight.dtype == torch.float32
    bytes_packed, bytes_float = sum(weight_bytes(packed).values()), sum(weight_bytes(unpacked).values())
    assert bytes_packed < 0.45 * bytes_float  # ~4-8 bits per weight instead of 32
    a, b = packed(*inputs), unpacked(*inputs)
    assert a.shape == inputs[0].shape and torch.isfinite(a).all()
    # the same weights through another code path (per-forward unpacking): float32 rounding only
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    bf16 = load_dit(path, dtype=None, compute_dtype=torch.bfloat16)
    rel = ((bf16(*inputs).float() - b).norm() / b.norm()).item()
    assert rel < 0.05, rel


def test_inspect_reports_the_quantization(gguf_dit):
    path, sd, _ = gguf_dit
    report = inspect_checkpoint(path)
    assert report["format"] == "gguf" and report["kind"] == "dit" and report["preset"] == "tiny"
    assert report["weight_format"].startswith("GGUF Q")
    assert set(report["dtypes"]) >= {"F32", "Q6_K"} and report["problems"] == []
    assert report["parameter_count"] == sum(v.numel() for v in sd.values())
    assert report["metadata"] == {"architecture": "wan"}
