"""fp8 and scaled-fp8 checkpoints (DiT and umT5): weights stay 8-bit in memory, numerics equal the dequantized
model, parity with ComfyUI's own scaled-fp8 layers, clear errors, and what inspect_checkpoint reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from phantom_core.loading.fp8 import (
    SCALED_FP8_KEY,
    CastLinear,
    detect_fp8_format,
    fp8_ops,
    quantize_fp8,
    quantize_state_dict,
    weight_bytes,
)
from phantom_core.tiny.text import random_text_encoder_state_dict, train_tiny_tokenizer
from phantom_core.wan.dit import DIT_PRESETS, TEXT_LEN, PhantomWanDiT
from phantom_core.wan.inspect import inspect_checkpoint
from phantom_core.wan.load import load_dit, validate_dit_state_dict
from phantom_core.wan.umt5 import PAD_ID, TEXT_ENCODER_PRESETS, load_text_encoder, write_text_encoder_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CFG = DIT_PRESETS["tiny"]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PROMPTS = ["A ginger cat sleeps on a sunny windowsill.", "一只小狗在草地上追逐红色的皮球"]


def linear_weight_keys(model: torch.nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def dit():
    """A tiny DiT with every parameter random, its fp32 state dict and fixed inputs."""
    torch.manual_seed(0)
    model = PhantomWanDiT(CFG).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * r if "norm" in name else 0.1 * r)
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 16, 2, 10, 14, generator=g), torch.tensor([700.0]),
              torch.randn(1, 9, CFG.text_dim, generator=g), torch.randn(1, 16, 2, 10, 14, generator=g))
    return model, {k: v.contiguous() for k, v in model.state_dict().items()}, linear_weight_keys(model), inputs


def dequantized(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 state dict a (scaled) fp8 one stands for: weight.float() * scale_weight, scales dropped."""
    out = {}
    for key, value in sd.items():
        if key == SCALED_FP8_KEY or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = sd.get(key.rsplit(".", 1)[0] + ".scale_weight") if key.endswith(".weight") else None
        out[key] = value.float() * scale if scale is not None else value.float()
    return out


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# ---------------------------------------------------------------------------------------------- DiT


def test_quantize_fp8_round_trip():
    w = torch.randn(64, 48) * 0.03
    for fmt, rel in ((E4M3, 0.07), (E5M2, 0.13)):  # 3 / 2 mantissa bits: half-ulp 2^-4 / 2^-3
        q, scale = quantize_fp8(w, fmt)
        assert q.dtype == fmt and scale.dtype == torch.float32 and scale.ndim == 0
        assert torch.isclose(q.float().abs().max() * scale, w.abs().max(), rtol=1e-6)  # amax maps to fp8 max
        big = w.abs() > 0.01  # away from the subnormals
        assert ((q.float() * scale - w).abs()[big] / w.abs()[big]).max() <= rel
    q, scale = quantize_fp8(torch.zeros(3, 3))
    assert scale.item() == 1.0 and not q.float().any()


@pytest.mark.parametrize("fmt,scaled,prefix", [(E4M3, False, ""), (E5M2, False, "model.diffusion_model."),
                                               (E4M3, True, ""), (E4M3, True, "model.diffusion_model."),
                                               (E5M2, True, "")], ids=str)
def test_fp8_dit_stays_8bit_and_equals_the_dequantized_model(dit, tmp_path, fmt, scaled, prefix):
    model, sd, linears, inputs = dit
    q = quantize_state_dict(sd, linears, fmt, scaled=scaled)
    if scaled:  # ComfyUI files may also carry scale_input (for fp8 matmuls); it must be accepted and ignored
        q["blocks.1.ffn.0.scale_input"] = torch.tensor(0.5)
    path = tmp_path / "dit_fp8.safetensors"
    save_file({prefix + k: v for k, v in q.items()}, path)
    assert detect_fp8_format(q).fp8_dtype == fmt and detect_fp8_format(q).scaled == scaled

    ours = load_dit(path, dtype=None)  # keep the stored dtype
    assert ours.compute_dtype == torch.float32  # CPU default for fp8 weights
    for key in linears:
        layer = ours.get_submodule(key.rsplit(".", 1)[0])
        assert isinstance(layer, CastLinear) and layer.weight.dtype == fmt
        assert (layer.scale_weight is not None) == scaled
    nbytes, full = weight_bytes(ours), weight_bytes(model)["float32"]
    fp8_name = str(fmt).removeprefix("torch.")
    assert nbytes[fp8_name] == sum(sd[k].numel() for k in linears)
    assert sum(nbytes.values()) < 0.3 * full  # 1 byte per Linear weight instead of 4

    reference = load_dit(dequantized(q))  # plain fp32 model on the dequantized weights
    expanded = load_dit(path, dtype=torch.float32)  # our own dequantize-while-loading path
    assert all(p.dtype == torch.float32 for p in expanded.parameters())
    a, b, c = run(ours, inputs), run(reference, inputs), run(expanded, inputs)
    # same maths, other memory layout: CPU kernels promise no bitwise equality there
    torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    err = (a - b).abs().max().item()
    print(f"fp8 {fmt} scaled={scaled}: max |ours - dequantized fp32| = {err:.2e}")
    assert err <= 1e-5 * b.abs().max().item()
    # and fp8 is a real approximation of the original weights, not a copy of them
    rel = ((a - run(model, inputs)).norm() / b.norm()).item()
    assert 1e-4 < rel < (0.2 if fmt == E4M3 else 0.4)


def test_scaled_state_dict_round_trips_through_the_model(dit):
    _, sd, linears, _ = dit
    q = quantize_state_dict(sd, linears, E4M3)
    back = load_dit(dict(q), dtype=None).state_dict()
    assert set(back) == set(q) - {SCALED_FP8_KEY}
    assert all(torch.equal(back[k].float(), q[k].float()) for k in back)


def test_bf16_compute_and_fp8_on_request(dit):
    model, sd, linears, inputs = dit
    q = quantize_state_dict(sd, linears, E4M3)
    exact = run(load_dit(dict(q), dtype=None), inputs)
    bf16 = load_dit(dict(q), dtype=None, compute_dtype=torch.bfloat16)
    assert bf16.compute_dtype == torch.bfloat16 and bf16.blocks[0].self_attn.q.weight.dtype == E4M3
    assert bf16.blocks[0].norm3.weight.dtype == torch.bfloat16
    out = run(bf16, inputs)
    assert out.dtype == torch.float32
    rel = ((out - exact).norm() / exact.norm()).item()
    assert 1e-5 < rel < 0.05, rel
    # an fp32 checkpoint quantized while loading == the same weights quantized on disk
    on_load = load_dit(dict(sd), dtype=E4M3)
    assert on_load.blocks[1].ffn[2].weight.dtype == E4M3 and on_load.patch_embedding.weight.dtype == torch.float32
    torch.testing.assert_close(run(on_load, inputs), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    with pytest.raises(ValueError, match="compute_dtype"):
        load_dit(dict(q), dtype=None, compute_dtype=E4M3)
    with pytest.raises(ValueError, match="compute_dtype"):
        fp8_ops(torch.int8)


def test_missing_or_stray_scale_keys_are_named(dit):
    _, sd, linears, _ = dit
    q = quantize_state_dict(sd, linears, E4M3)
    broken = {k: v for k, v in q.items() if k != "blocks.0.cross_attn.v.scale_weight"}
    with pytest.raises(ValueError, match=r"blocks\.0\.cross_attn\.v\.scale_weight is missing"):
        load_dit(broken, dtype=None)
    with pytest.raises(ValueError, match=r"blocks\.0\.cross_attn\.v\.scale_weight is missing"):
        load_dit(broken, dtype=torch.float32)  # dequantizing would be silently wrong too
    stray = dict(q) | {"blocks.0.modulation.scale_weight": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.modulation\.scale_weight"):
        validate_dit_state_dict(stray, CFG)
    validate_dit_state_dict(q, CFG)  # marker and per-layer scales are part of the format


def test_parity_with_comfyui_scaled_fp8_ops(comfy_import, dit):
    wan = comfy_import("comfy.ldm.wan.model")
    import comfy.ops

    _, sd, linears, inputs = dit
    # ComfyUI's scaled_fp8_ops creates the whole Linear in fp8, so it also rounds the (float-stored) biases to
    # fp8 when it loads them; we keep biases as stored. Biases already representable in fp8 make both exact.
    sd = {k: v.to(E4M3).float() if k.rsplit(".", 1)[0] + ".weight" in linears and k.endswith(".bias") else v
          for k, v in sd.items()}
    q = quantize_state_dict(sd, linears, E4M3)
    ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False, override_dtype=E4M3)
    theirs = wan.WanModel(
        model_type="t2v", patch_size=CFG.patch_size, text_len=CFG.text_len, in_dim=CFG.in_dim, dim=CFG.dim,
        ffn_dim=CFG.ffn_dim, freq_dim=CFG.freq_dim, text_dim=CFG.text_dim, out_dim=CFG.out_dim,
        num_heads=CFG.num_heads, num_layers=CFG.num_layers, qk_norm=True, cross_attn_norm=True, eps=CFG.eps,
        dtype=torch.float32, device="cpu", operations=ops,
    ).eval()
    missing, unexpected = theirs.load_state_dict({k: v for k, v in q.items() if k != SCALED_FP8_KEY}, strict=False)
    assert not missing and not unexpected
    assert theirs.blocks[0].ffn[0].weight.dtype == E4M3
    x, t, ctx, refs = inputs
    with torch.no_grad():
        b = theirs(x, t, F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1])), time_dim_concat=refs, transformer_options={})
    a = run(load_dit(dict(q), dtype=None), inputs)
    err = (a - b).abs().max().item()
    print(f"scaled fp8 DiT vs ComfyUI scaled_fp8_ops: max abs diff {err:.2e} (output max {b.abs().max():.2f})")
    assert b.abs().max() > 0.1 and err < 1e-4 * b.abs().max().item()


def test_inspect_reports_fp8_formats(dit, tmp_path):
    _, sd, linears, _ = dit
    save_file(quantize_state_dict(sd, linears, E4M3), tmp_path / "scaled.safetensors")
    save_file(quantize_state_dict(sd, linears, E5M2, scaled=False), tmp_path / "plain.safetensors")
    scaled = inspect_checkpoint(tmp_path / "scaled.safetensors")
    assert scaled["kind"] == "dit" and scaled["preset"] == "tiny" and not scaled["problems"]
    assert scaled["weight_format"] == "scaled fp8 (float8_e4m3fn)"
    assert scaled["parameter_count"] == sum(v.numel() for v in sd.values())  # scales are not parameters
    assert scaled["dtypes"]["float8_e4m3fn"] == len(linears) + 1  # + the scaled_fp8 marker
    plain = inspect_checkpoint(tmp_path / "plain.safetensors")
    assert plain["weight_format"] == "fp8 (float8_e5m2)" and not plain["problems"]
    broken = {k: v for k, v in quantize_state_dict(sd, linears, E4M3).items() if k != "head.head.scale_weight"}
    save_file(broken, tmp_path / "broken.safetensors")
    assert any("head.head.scale_weight is missing" in p for p in inspect_checkpoint(tmp_path / "broken.safetensors")["problems"])


# ---------------------------------------------------------------------------------------------- umT5

TINY_T5 = TEXT_ENCODER_PRESETS["tiny"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """Tiny umT5 weights, ComfyUI-style scaled fp8 file (+ marker + spiece_model), its fp32 encoder."""
    spiece = train_tiny_tokenizer()
    weights = random_text_encoder_state_dict(TINY_T5, seed=1)
    linears = [k for k, v in weights.items() if v.ndim == 2 and "relative_attention_bias" not in k and k != "shared.weight"]
    q = quantize_state_dict(weights, linears, E4M3)
    folder = tmp_path_factory.mktemp("t5fp8")
    path = write_text_encoder_checkpoint(folder / "umt5_tiny_fp8_e4m3fn_scaled.safetensors", q, spiece)
    return weights, q, linears, spiece, path


def test_umt5_scaled_fp8_stays_8bit_and_equals_the_dequantized_model(t5):
    weights, q, linears, spiece, path = t5
    ours = load_text_encoder(path, dtype=None)  # tokenizer from the embedded spiece_model
    assert ours.compute_dtype == torch.float32
    layer = ours.model.encoder.block[1].layer[1].DenseReluDense.wo
    assert isinstance(layer, CastLinear) and layer.weight.dtype == E4M3 and layer.scale_weight is not None
    assert ours.model.encoder.embed_tokens is ours.model.shared
    nbytes = weight_bytes(ours.model)
    assert nbytes["float8_e4m3fn"] == sum(weights[k].numel() for k in linears)
    reference = load_text_encoder(dequantized(q), tokenizer=spiece)
    a, b = ours.encode_padded(PROMPTS), reference.encode_padded(PROMPTS)
    rel = ((a - b).norm() / b.norm()).item()
    print(f"scaled fp8 umT5 vs dequantized fp32: relative difference {rel:.2e}")
    assert rel < 1e-6
    full = load_text_encoder(path, dtype=torch.bfloat16)  # asking for a float dtype dequantizes
    assert full.dtype == torch.bfloat16 and full.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16


def test_umt5_fp8_embedding_and_bf16_compute(t5):
    weights, _, linears, spiece, _ = t5
    plain = quantize_state_dict(weights, [*linears, "shared.weight"], E5M2, scaled=False)  # embedding in fp8 too
    ours = load_text_encoder(plain, tokenizer=spiece, dtype=None)
    assert ours.dtype == E5M2 and ours.model.shared.weight.dtype == E5M2
    reference = load_text_encoder(dequantized(plain), tokenizer=spiece)
    b = reference.encode_padded(PROMPTS)
    assert ((ours.encode_padded(PROMPTS) - b).norm() / b.norm()).item() < 1e-6
    half = load_text_encoder(plain, tokenizer=spiece, dtype=None, compute_dtype=torch.bfloat16)
    assert half.compute_dtype == torch.bfloat16
    rel = ((half.encode_padded(PROMPTS) - b).norm() / b.norm()).item()
    assert 1e-5 < rel < 0.05, rel
    broken = {k: v for k, v in quantize_state_dict(weights, linears, E4M3).items()
              if k != "encoder.block.0.layer.1.DenseReluDense.wi_1.scale_weight"}
    with pytest.raises(ValueError, match=r"DenseReluDense\.wi_1\.scale_weight is missing"):
        load_text_encoder(broken, tokenizer=spiece, dtype=None)


def test_umt5_scaled_fp8_matches_comfyui(comfy_import, t5):
    sd1_clip = comfy_import("comfy.sd1_clip")
    t5_module = comfy_import("comfy.text_encoders.t5")
    _, q, _, _, path = t5
    config = json.loads((ROOT / ".comfyui/comfy/text_encoders/umt5_config_xxl.json").read_text())
    config.update({k: getattr(TINY_T5, k) for k in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers")})
    theirs = sd1_clip.SDClipModel(device="cpu", textmodel_json_config=config, dtype=torch.float32,
                                  special_tokens={"end": 1, "pad": 0}, model_class=t5_module.T5,
                                  enable_attention_masks=True, zero_out_masked=True,
                                  model_options={"scaled_fp8": E4M3})  # as ComfyUI loads a *_fp8_scaled file
    missing, unexpected = theirs.load_sd(dict(q))
    assert not missing and not unexpected
    assert theirs.transformer.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == E4M3
    ours = load_text_encoder(path, dtype=None)
    tokens = [x + [PAD_ID] * (TEXT_LEN - len(x)) for x in ours.tokenize(PROMPTS)]
    with torch.no_grad():
        ref = theirs(tokens)[0]  # (B, 512, d_model)
    rel = ((ours.encode_padded(PROMPTS) - ref).norm() / ref.norm()).item()
    print(f"scaled fp8 umT5 vs ComfyUI: relative difference {rel:.2e}")
    assert rel < 1e-4
