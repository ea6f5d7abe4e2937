"""Checkpoint reading, architecture detection from shapes, validation and loading of the DiT."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from phantom_core.loading.files import read_state_dict
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from phantom_core.wan.load import infer_dit_config, load_dit, preset_name, strip_prefixes, validate_dit_state_dict

TINY = DIT_PRESETS["tiny"]


def meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The full key set of a preset with its shapes, on the meta device (no memory)."""
    return PhantomWanDiT(DIT_PRESETS[name], device="meta").state_dict()


@pytest.mark.parametrize(
    "name, n_keys, n_params",
    [("phantom-wan-1.3b", 825, 1_418_996_800), ("phantom-wan-14b", 1095, 14_288_491_584)],
)
def test_real_key_sets_are_detected(name, n_keys, n_params):
    sd = meta_state_dict(name)
    assert len(sd) == n_keys
    assert sum(v.numel() for v in sd.values()) == n_params
    config = infer_dit_config(sd)
    assert config == DIT_PRESETS[name] and preset_name(config) == name
    validate_dit_state_dict(sd, config)
    # ComfyUI-style prefixes are stripped, and other components of a full checkpoint are ignored
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()} | {"first_stage_model.x": torch.empty(1)}
    assert infer_dit_config(strip_prefixes(prefixed)) == DIT_PRESETS[name]


def test_upstream_key_names():
    sd = meta_state_dict("phantom-wan-1.3b")
    for key, shape in {
        "patch_embedding.weight": (1536, 16, 1, 2, 2),
        "text_embedding.0.weight": (1536, 4096),
        "text_embedding.2.weight": (1536, 1536),
        "time_embedding.0.weight": (1536, 256),
        "time_projection.1.weight": (9216, 1536),
        "blocks.29.self_attn.norm_q.weight": (1536,),
        "blocks.0.norm3.bias": (1536,),
        "blocks.0.cross_attn.o.weight": (1536, 1536),
        "blocks.0.ffn.0.weight": (8960, 1536),
        "blocks.0.ffn.2.weight": (1536, 8960),
        "blocks.0.modulation": (1, 6, 1536),
        "head.head.weight": (64, 1536),
        "head.modulation": (1, 2, 1536),
    }.items():
        assert tuple(sd[key].shape) == shape, key


def test_non_preset_config_is_inferred():
    config = DIT_PRESETS["tiny"].__class__(dim=384, ffn_dim=640, num_heads=3, num_layers=3, text_dim=32)
    sd = PhantomWanDiT(config, device="meta").state_dict()
    inferred = infer_dit_config(sd)
    assert inferred == config and preset_name(inferred) is None


def test_missing_extra_and_misshaped_keys_are_named():
    sd = dict(meta_state_dict("tiny"))
    del sd["blocks.1.cross_attn.k.bias"]
    sd["blocks.0.lora_up.weight"] = torch.empty(4, 4, device="meta")
    sd["blocks.0.ffn.2.weight"] = torch.empty(256, 500, device="meta")
    with pytest.raises(ValueError) as err:
        validate_dit_state_dict(sd, TINY)
    msg = str(err.value)
    assert "1 missing keys: blocks.1.cross_attn.k.bias" in msg
    assert "1 unexpected keys: blocks.0.lora_up.weight" in msg
    assert "blocks.0.ffn.2.weight (256, 500) (expected (256, 512))" in msg


def test_many_missing_keys_are_counted():
    sd = {k: v for k, v in meta_state_dict("tiny").items() if not k.startswith("blocks.1.")}
    sd |= {k.replace("blocks.0.", "blocks.1."): v for k, v in sd.items() if "attn" not in k and "blocks.0." in k}
    with pytest.raises(ValueError, match=r"20 missing keys: blocks\.1\.cross_attn\.k\.bias, .*\(10 more\)$"):
        validate_dit_state_dict(sd, TINY)


@pytest.mark.parametrize(
    "extra, looks_like",
    [
        ({"img_emb.proj.0.weight": torch.empty(1280, device="meta")}, "image-to-video"),
        ({"patch_embedding.weight": torch.empty(256, 36, 1, 2, 2, device="meta")}, "image-to-video"),
        ({"encoder.conv1.weight": torch.empty(96, 3, 3, 3, 3), "decoder.conv1.weight": torch.empty(1)}, "VAE"),
        ({"shared.weight": torch.empty(10, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.empty(1)},
         "text encoder"),
    ],
    ids=["i2v-img_emb", "i2v-36ch", "vae", "t5"],
)
def test_other_models_are_refused_with_what_they_look_like(extra, looks_like):
    base = dict(meta_state_dict("tiny")) if "patch_embedding.weight" in extra or "img_emb" in str(extra) else {}
    with pytest.raises(ValueError, match=looks_like):
        infer_dit_config(base | extra)
    with pytest.raises(ValueError, match=looks_like):
        load_dit(base | extra)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = PhantomWanDiT(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 16, 2, 10, 14, generator=g), torch.tensor([700.0]),
              torch.randn(1, 9, TINY.text_dim, generator=g), torch.randn(1, 16, 2, 10, 14, generator=g))
    with torch.no_grad():
        out = model(*inputs)
    return model, inputs, out


def _check(model: PhantomWanDiT, tiny, dtype=torch.float32) -> None:
    """The loaded weights equal the saved ones bitwise; the output equals the original model's to 1e-5 relative
    (a loaded tensor may be memory-mapped or laid out differently, and CPU kernels promise no bitwise equality
    across memory layouts: an AMD EPYC gives other last bits than an Intel CPU)."""
    original, inputs, expected = tiny
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters())
    saved = original.state_dict()
    assert all(torch.equal(v, saved[k].to(dtype)) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_round_trip_safetensors_pth_and_shards(tiny_model, tmp_path):
    model, _, _ = tiny_model
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "dit.safetensors")
    torch.save(sd, tmp_path / "dit.pth")
    keys = sorted(sd)
    shards = {"dit-00001-of-00002.safetensors": keys[::2], "dit-00002-of-00002.safetensors": keys[1::2]}
    (tmp_path / "sharded").mkdir()
    for shard, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / "sharded" / shard)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
    (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    for source in ("dit.safetensors", "dit.pth", "sharded", "sharded/diffusion_pytorch_model.safetensors.index.json"):
        assert set(read_state_dict(tmp_path / source)) == set(sd), source
        _check(load_dit(tmp_path / source), tiny_model)


def test_prefixed_keys_and_in_memory_dicts_load(tiny_model, tmp_path):
    model, _, _ = tiny_model
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "comfy.safetensors")
    _check(load_dit(tmp_path / "comfy.safetensors"), tiny_model)
    plain = {k.removeprefix("model.diffusion_model."): v.clone() for k, v in sd.items()}
    keys_before = list(plain)
    _check(load_dit(plain), tiny_model)
    assert list(plain) == keys_before  # the caller's dict is left alone
    half = load_dit(plain, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_pickles_needing_more_than_weights_are_refused(tiny_model, tmp_path):
    model, _, _ = tiny_model
    torch.save({"state": model.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "full.pth")
    with pytest.raises(ValueError, match="holds more than tensors .*argparse.Namespace") as err:
        read_state_dict(tmp_path / "full.pth")
    assert "weights_only=False" not in str(err.value)  # torch's advice to run the pickle is never passed on
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"0")
    with pytest.raises(ValueError, match="unknown extension"):
        read_state_dict(tmp_path / "model.onnx")
