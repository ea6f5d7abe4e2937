"""Reading the LoRA files people have for Wan2.1 T2V (which apply to Phantom-Wan, a Wan2.1 T2V fine-tune).

Every layout is normalised to ``{upstream Wan name: LoraWeights}`` (``read_lora``), the name being a module of
``PhantomWanDiT`` (``blocks.0.self_attn.q``) or, for a full-weight delta, a parameter (``blocks.0.modulation``):

==========================  ======================================================  ================================
written by                  key                                                     weights
==========================  ======================================================  ================================
ComfyUI (and us)            ``diffusion_model.blocks.0.self_attn.q``                ``.lora_up.weight``,
                                                                                    ``.lora_down.weight``, ``.alpha``
kohya / musubi-tuner        ``lora_unet_blocks_0_self_attn_q`` (Wan Fun: ``__``)    same suffixes
diffusion-pipe, ai-toolkit  ``diffusion_model.blocks.0.self_attn.q``                ``.lora_A.weight`` (down),
                                                                                    ``.lora_B.weight`` (up)
diffusers / peft            ``transformer.blocks.0.attn1.to_q``                     ``.lora_A[.default].weight``,
                                                                                    ``.lora_B[.default].weight``
full-weight deltas          any of the names above                                  ``.diff`` (weight), ``.diff_b``
==========================  ======================================================  ================================

Diffusers' Wan names map to upstream's as in diffusers' ``scripts/convert_wan_to_diffusers.py``
(``TRANSFORMER_KEYS_RENAME_DICT``, read in reverse): ``attn1`` -> ``self_attn``, ``attn2`` -> ``cross_attn``,
``to_q/k/v`` -> ``q/k/v``, ``to_out.0`` -> ``o``, ``ffn.net.0.proj`` -> ``ffn.0``, ``ffn.net.2`` -> ``ffn.2``,
``norm2`` -> ``norm3`` (diffusers swaps the two), ``scale_shift_table`` -> ``modulation``,
``condition_embedder.{text,time}_embedder.linear_{1,2}`` -> ``{text,time}_embedding.{0,2}``,
``condition_embedder.time_proj`` -> ``time_projection.1``, ``proj_out`` -> ``head.head``. The prefixes and
suffixes are those ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``, ``load_lora``) and
``comfy/weight_adapter/lora.py`` accept. The scale of a low-rank pair is ``alpha / rank``, or 1 without an alpha.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from phantom_core.loading.files import read_state_dict
from phantom_core.loading.keys import short_listing
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
KOHYA_PREFIX = "lora_unet_"
SUFFIXES: dict[str, str] = {  # key ending -> part of LoraWeights
    ".lora_up.weight": "up", ".lora_down.weight": "down",  # ComfyUI, kohya
    ".lora_B.weight": "up", ".lora_A.weight": "down",  # peft / diffusers, diffusion-pipe, ai-toolkit
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",  # peft with its adapter name
    ".lora.up.weight": "up", ".lora.down.weight": "down",  # older diffusers
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}
UNSUPPORTED: dict[str, str] = {  # key fragment -> the LoRA variant it belongs to
    ".lora_mid.": "LoCon / Tucker (lora_mid)", ".dora_scale": "DoRA (dora_scale)", ".hada_": "LoHa (hada_*)",
    ".lokr_": "LoKr (lokr_*)", ".oft_": "OFT", ".w_norm": "norm deltas (w_norm)", ".b_norm": "norm deltas (b_norm)",
    ".set_weight": "weight replacement (set_weight)", ".reshape_weight": "reshaped LoRA (reshape_weight)",
}
_DIFFUSERS: list[tuple[str, str]] = [  # (regex on the whole dotted name, replacement), diffusers -> upstream
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"proj_out", "head.head"),
    (r"scale_shift_table", "head.modulation"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.attn1\.(norm_[qk])", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.(norm_[qk])", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"blocks\.(\d+)\.norm2", r"blocks.\1.norm3"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
]
_DIFFUSERS_MARKERS = ("attn1.", "attn2.", "condition_embedder.", "proj_out", "ffn.net.", "scale_shift_table")


@dataclass(frozen=True)
class LoraWeights:
    """One module's (or parameter's) part of a LoRA, as stored (any float dtype, CPU).

    down: ``(rank, in)`` (``(rank, in, *kernel)`` for a conv), up: ``(out, rank)``, alpha: None when the file has
    none (scale 1); diff: full delta of ``<name>.weight`` (or of the parameter ``<name>``), diff_b: of
    ``<name>.bias``. keys: the file's own keys, for messages.
    """

    keys: tuple[str, ...]
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    diff: Tensor | None = None
    diff_b: Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    @property
    def scale(self) -> float:
        """``alpha / rank`` of the low-rank pair (1 without an alpha, as ComfyUI and kohya read it)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def low_rank_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight the low-rank pair updates (``in`` flattened over a conv kernel)."""
        return self.up.shape[0], self.down[0].numel()

    def delta(self, device: torch.device | str = "cpu") -> Tensor:
        """``scale * up @ down``: ``(out, in_flat)`` float32 on ``device`` (reshape to the weight's shape)."""
        up = self.up.to(device, torch.float32).flatten(1)
        return self.scale * (up @ self.down.to(device, torch.float32).flatten(1))


@functools.cache
def _kohya_names() -> tuple[dict[str, str], dict[str, str]]:
    """``({underscored top-level name: dotted}, {underscored in-block name: dotted})`` of every module and
    parameter of ``PhantomWanDiT`` (from a meta-device build; names do not depend on the model size)."""
    model = PhantomWanDiT(DIT_PRESETS["tiny"], device="meta")
    names = {n for n, _ in model.named_modules() if n} | {n for n, _ in model.named_parameters()}
    top, block = {}, {}
    for name in names:
        if m := re.fullmatch(r"blocks\.\d+\.(.+)", name):
            block[m.group(1).replace(".", "_")] = m.group(1)
        elif not name.startswith("blocks"):
            top[name.replace(".", "_")] = name
    return top, block


def _from_kohya(name: str) -> str:
    """``lora_unet_blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q``; an unknown name is returned as given."""
    rest = name[len(KOHYA_PREFIX):].lstrip("_")  # Wan Fun LoRAs write "lora_unet__blocks_..."
    top, block = _kohya_names()
    if m := re.fullmatch(r"blocks_(\d+)_(.+)", rest):
        inner = block.get(m.group(2))
        return name if inner is None else f"blocks.{m.group(1)}.{inner}"
    return top.get(rest, name)


def wan_name(name: str, diffusers: bool) -> str:
    """The upstream Wan name of a LoRA module name (prefix stripped, kohya / diffusers names converted)."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith(KOHYA_PREFIX):
        return _from_kohya(name)
    if diffusers:
        for pattern, repl in _DIFFUSERS:
            if (new := re.sub(rf"^{pattern}$", repl, name)) != name:
                return new
    return name


def _split(key: str) -> tuple[str, str] | None:
    """``(module name, part)`` of a LoRA key, or None for a key of no known layout."""
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _check_supported(keys: list[str]) -> None:
    found = sorted({variant for k in keys for frag, variant in UNSUPPORTED.items() if frag in k})
    if found:
        raise ValueError(f"this LoRA uses {', '.join(found)}, which Phantom does not apply; supported: plain "
                         "low-rank pairs (lora_up/lora_down, lora_A/lora_B, with .alpha) and .diff / .diff_b deltas")


def _weights(name: str, parts: dict[str, Tensor], keys: list[str]) -> LoraWeights:
    """Check one module's parts and build its ``LoraWeights``; ValueError naming the keys."""
    up, down, alpha = parts.get("up"), parts.get("down"), parts.get("alpha")
    if (up is None) != (down is None):
        raise ValueError(f"LoRA {name}: {short_listing(keys)} has lora_{'up' if down is None else 'down'} without "
                         f"its lora_{'down' if down is None else 'up'} (B/A) partner")
    if alpha is not None and up is None:
        raise ValueError(f"LoRA {name}: {short_listing(keys)} has an alpha but no lora_up/lora_down weights")
    if up is not None and (up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]):
        raise ValueError(f"LoRA {name}: up {tuple(up.shape)} and down {tuple(down.shape)} do not form a low-rank "
                         "pair (expected up (out, rank), down (rank, in))")
    if alpha is not None and alpha.numel() != 1:
        raise ValueError(f"LoRA {name}: alpha has shape {tuple(alpha.shape)}; expected one number")
    return LoraWeights(tuple(sorted(keys)), down=down, up=up, alpha=None if alpha is None else float(alpha.item()),
                       diff=parts.get("diff"), diff_b=parts.get("diff_b"))


def read_lora(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, LoraWeights]:
    """Read a LoRA file (``.safetensors`` / ``.pt`` ...) or state dict in any layout of the module docstring.

    Returns:
        ``{upstream Wan name: LoraWeights}``, sorted by name. Names are not yet checked against a model
        (``apply.check_lora`` does that: keys matching no module, shapes of another model size).

    Raises:
        ValueError: naming the keys: keys of no LoRA layout, a variant we do not apply (LoHa, LoKr, DoRA, LoCon
            mid), an up without its down, two spellings of one module's weights, an empty file.
    """
    sd = read_state_dict(Path(source)) if isinstance(source, (str, os.PathLike)) else dict(source)
    where = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
    if not sd:
        raise ValueError(f"{where}the LoRA has no tensors")
    _check_supported(list(sd))
    unknown = sorted(k for k in sd if _split(k) is None)
    if unknown:
        raise ValueError(f"{where}{len(unknown)} LoRA keys are of no layout we read (expected <module>.lora_up."
                         f"weight / .lora_down.weight / .lora_A.weight / .lora_B.weight / .alpha / .diff / .diff_b): "
                         f"{short_listing(unknown)}")
    diffusers = any(marker in k for k in sd for marker in _DIFFUSERS_MARKERS)
    grouped: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, list[str]] = {}
    for key, value in sd.items():
        raw, part = _split(key)
        name = wan_name(raw, diffusers)
        if part in grouped.setdefault(name, {}):
            other = next(k for k in keys[name] if _split(k)[1] == part)
            raise ValueError(f"{where}LoRA keys {other} and {key} both give the {part} of {name}")
        grouped[name][part] = value
        keys.setdefault(name, []).append(key)
    try:
        return {name: _weights(name, grouped[name], keys[name]) for name in sorted(grouped)}
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None
