"""8-bit float weights: fp8 / "scaled fp8" checkpoints, cast-on-forward layers, and the per-tensor load plan.

Two on-disk forms are read (the second is the one ComfyUI ships, e.g. ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``):

- **fp8**: weights stored as ``float8_e4m3fn`` or ``float8_e5m2``; the real weight is the stored value.
- **scaled fp8**: each quantized Linear has ``<layer>.weight`` (fp8) and ``<layer>.scale_weight`` (a 0-d fp32
  tensor), so that ``real weight = weight.float() * scale_weight``; optionally ``<layer>.scale_input`` (used by
  fp8 matrix-multiply kernels to quantize activations; irrelevant when computing in a wider dtype, so ignored);
  and a marker key ``scaled_fp8``: an empty tensor whose dtype is the fp8 format (ComfyUI reads the format from
  that dtype). Everything else (norms, biases, modulation, small convs) is stored in a float dtype.

Weights that stay in fp8 live in the layers of ``fp8_ops(compute_dtype)``, which keep the stored tensor and cast
it (times its scale) to the compute dtype inside every forward, so an fp8 model holds ~1 byte per weight. When
a full-precision weight dtype is asked for instead, ``convert_tensor`` dequantizes tensor by tensor while loading.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phantom_core.loading.gguf_quants import dequantize_ggml
from phantom_core.log import logger

GGUF_TYPE_ATTR, GGUF_SHAPE_ATTR = "gguf_type", "gguf_shape"  # set on a cast layer whose weight stays GGUF-packed

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8_KEY = "scaled_fp8"  # ComfyUI's marker: an empty tensor whose dtype is the fp8 format
SCALE_WEIGHT, SCALE_INPUT = "scale_weight", "scale_input"
COMPUTE_DTYPES: dict[str, torch.dtype] = {  # user-facing activation-dtype names (CLI --compute-dtype)
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
WEIGHT_DTYPES: dict[str, torch.dtype] = {  # user-facing weight-dtype names (loader nodes, CLI --dtype)
    **COMPUTE_DTYPES, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


def is_fp8(dtype: torch.dtype) -> bool:
    """True for ``float8_e4m3fn`` / ``float8_e5m2``."""
    return dtype in FP8_DTYPES


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a CUDA device that supports it (fp16 otherwise); fp32 elsewhere (fp8 -> fp32 is cheap on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------- layers


def _cast_weight(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``layer.weight`` as ``dtype`` on ``device``, multiplied by ``layer.scale_weight`` when there is one, or
    dequantized when it holds GGUF blocks (``gguf.attach_packed`` marks such a layer).

    The scale is applied in float32 and the product rounded once to ``dtype``: ComfyUI multiplies in the compute
    dtype, which in bf16 rounds the scale itself and so shifts the gain of the whole layer (by up to 0.2 %).
    """
    if (ggml_type := getattr(layer, GGUF_TYPE_ATTR, None)) is not None:  # GGUF: packed bytes, unpacked here
        return dequantize_ggml(layer.weight.to(device), ggml_type, getattr(layer, GGUF_SHAPE_ATTR), dtype)
    scale = layer.scale_weight
    if scale is None:
        return layer.weight.to(device=device, dtype=dtype)
    w = layer.weight.to(device=device, dtype=torch.float32)
    s = scale.to(device=device, dtype=torch.float32)
    return (w.mul_(s) if w is not layer.weight else w * s).to(dtype)  # never scale the stored weight in place


def _cast_bias(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    return None if layer.bias is None else layer.bias.to(device=device, dtype=dtype)


def _dtype_for(layer: _CastLayer, x: Tensor) -> torch.dtype:
    """float32 for a float32 input, else ``layer.compute_dtype``: a caller that needs full precision passes
    float32 and gets it whatever the weights' dtype (the DiT's time MLP does, see ``wan.dit.run_fp32``). The
    models cast their activations to the compute dtype, so their other layers never see a float32 input
    unless compute_dtype is float32."""
    return torch.float32 if x.dtype == torch.float32 else layer.compute_dtype


class _CastLayer:
    """What every cast-on-forward layer shares: an optional ``scale_weight`` buffer (0-d fp32, registered by
    ``attach_scales`` for scaled fp8) and no random init when built on the meta device (the loader's build).
    ``compute_dtype`` (class attribute, set by ``fp8_ops``) is the dtype the layer computes in."""

    compute_dtype: torch.dtype = torch.float32

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer(SCALE_WEIGHT, None)

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


class CastLinear(_CastLayer, nn.Linear):
    """``nn.Linear`` whose weight keeps its stored dtype (e.g. fp8) and is cast per forward.

    ``compute_dtype`` (class attribute, set by ``fp8_ops``): input, weight and output dtype of the matmul;
    a float32 input is computed in float32 instead (``_dtype_for``).
    ``scale_weight``: None, or a 0-d float32 buffer registered by ``attach_scales`` (scaled fp8).
    The weight may also live on another device than the input (it is moved for the call only).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features)`` -> ``(..., out_features)`` in ``compute_dtype`` (float32 for a float32 input)."""
        dt = _dtype_for(self, x)
        return F.linear(x.to(dt), _cast_weight(self, x.device, dt), _cast_bias(self, x.device, dt))


class CastConv3d(_CastLayer, nn.Conv3d):
    """``nn.Conv3d`` with the weight cast per forward (see ``CastLinear``)."""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, T, H, W)`` -> ``(B, C_out, T', H', W')`` in ``compute_dtype`` (float32 for float32 input)."""
        dt = _dtype_for(self, x)
        return self._conv_forward(x.to(dt), _cast_weight(self, x.device, dt), _cast_bias(self, x.device, dt))


class CastEmbedding(_CastLayer, nn.Embedding):
    """``nn.Embedding`` whose table keeps its stored dtype; only the looked-up rows are cast."""

    bias = None  # so that _cast_bias and the loader treat it like the other cast layers

    def forward(self, ids: Tensor) -> Tensor:
        """``(...)`` int64 ids -> ``(..., embedding_dim)`` in ``compute_dtype``."""
        rows = F.embedding(ids, self.weight.to(ids.device))  # (..., D) stored dtype
        if self.scale_weight is None:
            return rows.to(self.compute_dtype)
        return (rows.float() * self.scale_weight.to(rows.device, torch.float32)).to(self.compute_dtype)


CAST_LAYERS = (CastLinear, CastConv3d, CastEmbedding)


@functools.cache  # one set of layer classes per compute dtype
def fp8_ops(compute_dtype: torch.dtype) -> SimpleNamespace:
    """A layer namespace (``Linear``, ``Conv3d``, ``Embedding``, ``LayerNorm``, ``RMSNorm``, ``compute_dtype``)
    for the house ``ops`` argument: the weighted layers keep whatever dtype is loaded into them (fp8 included)
    and compute in ``compute_dtype`` (a float32 input in float32); the norms are plain torch layers (their
    weights are loaded in ``compute_dtype``). ``PhantomWanDiT`` reads ``ops.compute_dtype`` as its activation dtype.
    """
    if is_fp8(compute_dtype) or not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype is {compute_dtype}; expected torch.float32, torch.bfloat16 or torch.float16")
    name = str(compute_dtype).removeprefix("torch.")
    make = lambda base: type(f"{base.__name__}_{name}", (base,), {"compute_dtype": compute_dtype})  # noqa: E731
    return SimpleNamespace(Linear=make(CastLinear), Conv3d=make(CastConv3d), Embedding=make(CastEmbedding),
                           LayerNorm=nn.LayerNorm, RMSNorm=nn.RMSNorm, compute_dtype=compute_dtype)


# ---------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Fp8Format:
    """How a state dict stores its weights.

    fp8_dtype: the fp8 dtype of its 8-bit tensors (the most frequent one), or None when it has none.
    scaled: it carries ``*.scale_weight`` keys or the ``scaled_fp8`` marker.
    stored_dtype: ``fp8_dtype`` when set, else the most frequent floating dtype (the "stored dtype").
    """

    fp8_dtype: torch.dtype | None
    scaled: bool
    stored_dtype: torch.dtype

    @property
    def label(self) -> str:
        """``"scaled fp8 (float8_e4m3fn)"``, ``"fp8 (float8_e5m2)"`` or the stored dtype's name (``"bfloat16"``)."""
        name = str(self.stored_dtype).removeprefix("torch.")
        if self.fp8_dtype is None:
            return name
        return f"{'scaled fp8' if self.scaled else 'fp8'} ({name})"


def _most_common(dtypes: Iterable[torch.dtype]) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for d in dtypes:
        counts[d] = counts.get(d, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def detect_fp8_format(sd: Mapping[str, Tensor]) -> Fp8Format:
    """Read the storage format from dtypes and key names only (works on meta stand-ins too)."""
    scaled = SCALED_FP8_KEY in sd or any(k.endswith(f".{SCALE_WEIGHT}") for k in sd)
    weights = [v.dtype for k, v in sd.items() if k != SCALED_FP8_KEY and not is_scale_key(k)]
    fp8 = _most_common(d for d in weights if is_fp8(d))
    if fp8 is None and SCALED_FP8_KEY in sd and is_fp8(sd[SCALED_FP8_KEY].dtype):
        fp8 = sd[SCALED_FP8_KEY].dtype
    stored = fp8 or _most_common(d for d in weights if d.is_floating_point) or torch.float32
    return Fp8Format(fp8, scaled, stored)


def is_scale_key(key: str) -> bool:
    return key.endswith((f".{SCALE_WEIGHT}", f".{SCALE_INPUT}"))


def split_scales(sd: dict[str, Tensor], weight_keys: Iterable[str]) -> dict[str, Tensor]:
    """Remove the marker, ``*.scale_input`` and ``*.scale_weight`` keys from ``sd`` (in place).

    Returns ``{weight key: scale_weight}``. Raises ``ValueError`` naming the key when a scale belongs to no
    weight in ``weight_keys``, or when a scaled file has an fp8 weight without its ``scale_weight``.
    """
    marker = sd.pop(SCALED_FP8_KEY, None)
    weight_keys = set(weight_keys)
    scales: dict[str, Tensor] = {}
    n_input = sum(k.endswith(f".{SCALE_INPUT}") for k in sd)
    if n_input:
        logger.debug("ignoring %d %s keys (only fp8 matmul kernels use them)", n_input, SCALE_INPUT)
    for key in [k for k in sd if is_scale_key(k)]:
        value = sd.pop(key)
        owner = key.rsplit(".", 1)[0] + ".weight"
        if owner not in weight_keys:
            raise ValueError(f"checkpoint key {key} is a per-layer fp8 scale, but the checkpoint has no {owner} "
                             "for it to scale")
        if key.endswith(SCALE_WEIGHT):
            if value.numel() != 1:
                raise ValueError(f"{key} has shape {tuple(value.shape)}; a scaled-fp8 scale_weight is one number")
            scales[owner] = value.reshape(()).float()
    if marker is not None or scales:
        unscaled = sorted(k for k in weight_keys if k in sd and is_fp8(sd[k].dtype) and k not in scales)
        if unscaled:
            more = f" and {len(unscaled) - 5} more" if len(unscaled) > 5 else ""
            raise ValueError(
                f"scaled fp8 checkpoint: {', '.join(unscaled[:5])}{more} is stored as {sd[unscaled[0]].dtype} but "
                f"{unscaled[0].rsplit('.', 1)[0]}.{SCALE_WEIGHT} is missing (the file is incomplete or mixes "
                "formats); every fp8 Linear weight of a scaled file needs its scale_weight")
    return scales


# ---------------------------------------------------------------------------------------------- conversion


def quantize_fp8(weight: Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """Per-tensor scaled quantization: ``scale = amax / fp8_max``, ``q = (w / scale).to(fp8)``.

    Returns ``(q, scale)``, ``scale`` a 0-d float32 tensor (1 for an all-zero tensor), so that
    ``q.float() * scale`` approximates ``weight`` with about 2 (e4m3) or 1 (e5m2) significant decimal digits.
    """
    if not is_fp8(fp8_dtype):
        raise ValueError(f"fp8_dtype is {fp8_dtype}; expected one of {FP8_DTYPES}")
    fmax = torch.finfo(fp8_dtype).max
    amax = weight.detach().abs().max().float()
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).cpu()
    q = (weight.detach().float() / scale.to(weight.device)).clamp_(-fmax, fmax).to(fp8_dtype)
    return q, scale


def dequantize(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``weight * scale`` (computed in float32) as ``dtype``; a plain cast when ``scale`` is None."""
    if scale is None:
        return weight.to(dtype)
    return (weight.to(torch.float32) * scale.to(weight.device, torch.float32)).to(dtype)


def quantize_state_dict(sd: Mapping[str, Tensor], weight_keys: Iterable[str],
                        fp8_dtype: torch.dtype = torch.float8_e4m3fn, scaled: bool = True) -> dict[str, Tensor]:
    """Write ``sd`` in ComfyUI's scaled-fp8 layout (``scaled=True``) or as plain fp8 (a bare cast).

    Each key of ``weight_keys`` becomes fp8 (+ ``<layer>.scale_weight`` and the ``scaled_fp8`` marker when
    scaled); the other tensors are copied unchanged. Raises ``KeyError`` for a weight key not in ``sd``.
    """
    out: dict[str, Tensor] = {}
    keys = set(weight_keys)
    for key, value in sd.items():
        if key not in keys:
            out[key] = value
        elif scaled:
            out[key], out[key.rsplit(".", 1)[0] + "." + SCALE_WEIGHT] = quantize_fp8(value, fp8_dtype)
        else:
            out[key] = value.to(fp8_dtype)
    missing = keys - set(sd)
    if missing:
        raise KeyError(f"weight keys not in the state dict: {sorted(missing)[:5]}")
    if scaled:
        out[SCALED_FP8_KEY] = torch.empty(0, dtype=fp8_dtype)
    return out


@dataclass(frozen=True)
class LoadPlan:
    """What ``plan_load`` decided. weight_dtype: dtype of the cast-layer weights (maybe fp8); compute_dtype:
    activations and every other tensor; cast_ops: whether the layers must cast per forward (``fp8_ops``)."""

    weight_dtype: torch.dtype
    compute_dtype: torch.dtype
    cast_ops: bool


def plan_load(stored: Fp8Format, dtype: torch.dtype | None, compute_dtype: torch.dtype | None,
              device: torch.device | str) -> LoadPlan:
    """Resolve the user's ``dtype`` (None: keep the stored dtype) and ``compute_dtype`` for one checkpoint.

    fp8 weights (stored and kept, or asked for) compute in ``compute_dtype`` (default: ``default_compute_dtype``);
    float weights compute in their own dtype unless ``compute_dtype`` says otherwise.
    """
    weight = stored.stored_dtype if dtype is None else dtype
    if not weight.is_floating_point:
        raise ValueError(f"dtype is {dtype}; expected None (stored), fp32, fp16, bf16, float8_e4m3fn or float8_e5m2")
    if compute_dtype is not None and (is_fp8(compute_dtype) or not compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype is {compute_dtype}; expected torch.float32, torch.bfloat16 or torch.float16")
    if is_fp8(weight):
        return LoadPlan(weight, compute_dtype or default_compute_dtype(device), True)
    compute = compute_dtype or weight
    return LoadPlan(weight, compute, compute != weight)


def convert_tensor(value: Tensor, scale: Tensor | None, kind: str | None, plan: LoadPlan,
                   device: torch.device | str) -> tuple[Tensor, Tensor | None]:
    """Convert one checkpoint tensor (on its own) following ``plan`` -> ``(tensor, scale_weight or None)``.

    kind: ``"linear"``, ``"conv"`` or ``"embedding"`` when the tensor is the weight of a cast layer, else None.
    Cast-layer weights keep their fp8 storage when the plan's weight dtype is that fp8 format (the scale kept
    beside), are re-quantized with a fresh per-tensor scale when an fp8 weight dtype is asked for (Linear weights
    only), and are otherwise dequantized to the weight dtype. Every other floating tensor (norms, biases,
    modulation, position biases: small) becomes the compute dtype, or the weight dtype without cast layers;
    integer tensors are only moved.
    """
    if not value.is_floating_point():
        return value.to(device), None
    weight_fp8 = is_fp8(plan.weight_dtype)
    if kind is not None and weight_fp8 and value.dtype == plan.weight_dtype:
        return value.to(device), scale
    if kind == "linear" and weight_fp8:
        q, new_scale = quantize_fp8(dequantize(value, scale, torch.float32), plan.weight_dtype)
        return q.to(device), new_scale
    target = plan.weight_dtype if not plan.cast_ops or (kind is not None and not weight_fp8) else plan.compute_dtype
    return dequantize(value.to(device), scale, target), None  # moved first, so that a GPU does the cast


def convert_state_dict(sd: dict[str, Tensor], kinds: Mapping[str, str], plan: LoadPlan,
                       device: torch.device | str) -> dict[str, Tensor]:
    """Convert ``sd`` in place, tensor by tensor (each stored tensor is released as soon as its converted one
    replaces it), consuming the marker and scale keys (``split_scales``, whose errors it raises).

    kinds: ``cast_layer_weights(model)``. Returns ``{weight key: scale}`` to ``attach_scales`` after loading.
    """
    scales = split_scales(sd, [k for k in sd if k.endswith(".weight")])
    kept: dict[str, Tensor] = {}
    for key in list(sd):
        sd[key], scale = convert_tensor(sd[key], scales.pop(key, None), kinds.get(key), plan, device)
        if scale is not None:
            kept[key] = scale
    return kept


def cast_layer_weights(model: nn.Module) -> dict[str, str]:
    """``{"<module>.weight": kind}`` for every cast layer of ``model`` (kind: linear / conv / embedding)."""
    kinds = {CastLinear: "linear", CastConv3d: "conv", CastEmbedding: "embedding"}
    out = {}
    for name, module in model.named_modules():
        for cls, kind in kinds.items():
            if isinstance(module, cls):
                out[f"{name}.weight" if name else "weight"] = kind
    return out


def attach_scales(model: nn.Module, scales: Mapping[str, Tensor]) -> None:
    """Register each ``{"<module>.weight": scale}`` as ``<module>.scale_weight`` (a persistent fp32 buffer), so
    ``model.state_dict()`` writes the scaled-fp8 layout back. Raises ``ValueError`` for a non-cast module."""
    for key, scale in scales.items():
        module = model.get_submodule(key.rsplit(".", 1)[0])
        if not isinstance(module, CAST_LAYERS):
            raise ValueError(f"{key} has a scale_weight but {type(module).__name__} cannot apply it")
        module.scale_weight = scale.reshape(()).to(module.weight.device, torch.float32)  # the registered buffer


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """``{dtype name: bytes}`` over the parameters and buffers of ``model`` (for logs and tests)."""
    out: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out
