"""Our LoRA files in ComfyUI, and ComfyUI's in ours: the same tiny DiT weights loaded by ComfyUI's own loader
(``comfy.sd.load_diffusion_model_state_dict`` -> ``comfy.model_base.WAN21`` with ``comfy.ldm.wan.model.WanModel``)
and patched by ComfyUI's own LoRA code (``comfy.sd.load_lora_for_models``: ``model_lora_keys_unet`` +
``comfy.lora.load_lora`` + ``ModelPatcher.add_patches``, what ``LoraLoaderModelOnly`` runs) give the output our model
gives with the same LoRA (merged and unmerged)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from phantom_core.lora.apply import apply_loras
from phantom_core.lora.files import diff_state_dict, lora_metadata, save_lora
from phantom_core.wan.dit import WanDiTConfig
from phantom_core.wan.load import load_dit
from tests.support.lora import random_lora
from tests.support.weights import random_dit_state_dict

CFG = WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2)  # text_dim 4096: ComfyUI's Wan detection fixes it
REL = 2e-5  # fp32; the two networks differ in summation order only (test_wan_dit's parity is 1e-4 on raw outputs)


@pytest.fixture(scope="module")
def comfy(comfy_import):
    comfy_import("comfy.sd")
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    return comfy


@pytest.fixture(scope="module")
def sd() -> dict[str, Tensor]:
    return random_dit_state_dict(CFG, seed=3)


def inputs():
    g = torch.Generator().manual_seed(4)
    return (torch.randn(1, 16, 2, 12, 14, generator=g), torch.tensor([420.0]),
            torch.randn(1, 9, CFG.text_dim, generator=g), torch.randn(1, 16, 2, 12, 14, generator=g))


def comfy_output(comfy, sd, lora: dict[str, Tensor], strength: float, caplog) -> Tensor:
    patcher = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in sd.items()},
                                                       model_options={"dtype": torch.float32})
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not not_loaded, not_loaded  # ComfyUI recognised every key of the file
    comfy.model_management.load_models_gpu([patched])
    x, t, ctx, refs = inputs()
    with torch.no_grad():
        out = patched.model.diffusion_model(x, t, F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1])), time_dim_concat=refs,
                                            transformer_options={})
    patched.unpatch_model()
    return out


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_our_file_in_comfyui_gives_our_output(comfy, sd, tmp_path, caplog):
    lora = random_lora(load_dit({k: v.clone() for k, v in sd.items()}), rank=4, alpha=2.0, seed=9)
    path = save_lora(tmp_path / "ours.safetensors", lora, lora_metadata(4, 2.0, "test", steps=0))
    loaded = comfy.utils.load_torch_file(str(path))  # how LoraLoaderModelOnly reads models/loras
    theirs = comfy_output(comfy, sd, loaded, 0.8, caplog)
    with torch.no_grad():
        base = load_dit({k: v.clone() for k, v in sd.items()})(*inputs())
        merged = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(path, 0.8)])(*inputs())
        unmerged = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(path, 0.8)], merge=False)(*inputs())
    assert rel(theirs, base) > 1e-2  # the LoRA matters
    assert rel(merged, theirs) <= REL
    assert rel(unmerged, theirs) <= REL


def test_a_lora_as_comfyuis_train_node_saves_it_reads_the_same(comfy, sd, caplog):
    """The layout ComfyUI's Train LoRA node writes (comfy_extras/nodes_train.py): ``<module>.<param>`` of each
    ``LoraDiff`` adapter under ``diffusion_model.`` (lora_up.weight, lora_down.weight, alpha), in bf16."""
    from comfy.weight_adapter.lora import LoRAAdapter

    g = torch.Generator().manual_seed(11)
    lora: dict[str, Tensor] = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.1.ffn.0"):
        adapter = LoRAAdapter.create_train(sd[f"{name}.weight"], rank=3, alpha=1.0).to(torch.bfloat16)
        with torch.no_grad():
            for p in adapter.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        lora |= {f"diffusion_model.{name}.{n}": p.detach() for n, p in adapter.named_parameters()}
    assert {k.rsplit(".", 2)[-2] for k in lora if k.endswith("weight")} == {"lora_up", "lora_down"}
    theirs = comfy_output(comfy, sd, lora, 1.0, caplog)
    with torch.no_grad():
        ours = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(lora, 1.0)])(*inputs())
    assert rel(ours, theirs) <= REL


def test_a_full_fine_tune_as_diff_file_in_comfyui_gives_the_tuned_output(comfy, sd, tmp_path, caplog):
    g = torch.Generator().manual_seed(12)
    # block 1 fine-tuned: Linear weights and biases, norms. Not its modulation: ComfyUI's ModelPatcher never
    # patches a parameter of a module that has submodules (our node object-patches it; tests/nodes/test_lora_node)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if k.startswith("blocks.1.") and "modulation" not in k
             else v.clone() for k, v in sd.items()}
    diff = diff_state_dict(sd, tuned)
    assert {"diffusion_model.blocks.1.self_attn.q.diff", "diffusion_model.blocks.1.self_attn.q.diff_b",
            "diffusion_model.blocks.1.norm3.diff", "diffusion_model.blocks.1.ffn.2.diff_b"} <= set(diff)
    assert not any(".blocks.0." in k for k in diff)
    path = save_lora(tmp_path / "full.safetensors", diff, {})
    theirs = comfy_output(comfy, sd, comfy.utils.load_torch_file(str(path)), 1.0, caplog)
    with torch.no_grad():
        want = load_dit({k: v.clone() for k, v in tuned.items()})(*inputs())
        ours = apply_loras(load_dit({k: v.clone() for k, v in sd.items()}), [(path, 1.0)])(*inputs())
    assert rel(ours, want) <= REL
    assert rel(theirs, want) <= REL
