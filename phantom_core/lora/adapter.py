"""The LoRA adapter: a frozen Linear plus a trainable low-rank update, wrapped in place on named modules.

LoRA (Hu et al. 2021, arXiv 2106.09685, Eq. 3): ``h = W x + (alpha / rank) * B A x`` with ``A = lora_down``
``(rank, in)`` and ``B = lora_up`` ``(out, rank)``. ``B`` starts at zero, so an injected model computes exactly what
the base model does until the first optimizer step; ``A`` starts as PyTorch's default Linear init
(Kaiming-uniform, ``a = sqrt(5)``), as peft and kohya do.

Why our own module and not ``peft``: peft's LoRA layers fit ``nn.Linear`` (our ``fp8.CastLinear`` is one) for the
unmerged forward, but (1) merging writes ``base_layer.weight.data += delta``, which is wrong for our fp8 and
scaled-fp8 layers (the delta must be added to ``weight * scale_weight`` and the sum re-quantized; peft only knows
its own quantization back-ends, bitsandbytes, GPTQ, EETQ ...); (2) its state-dict names (``base_model.model.
<module>.lora_A.default.weight``) are neither ComfyUI's nor upstream Wan's, so every file would need renaming;
(3) inside ComfyUI the LoRA is not a module at all but ModelPatcher weight patches (``nodes/lora.py``). What is
left, a wrapper with two Linears and a scale, is ~40 lines, needs no new dependency, and its parameter names are
already those of ComfyUI's LoRA file (``<module>.lora_down.weight``, ``<module>.lora_up.weight``).

Dtypes: the base layer keeps its stored dtype (fp32 / bf16 / fp16 / fp8, scaled or not) and is frozen; the
adapter's weights are float32 and trainable; the low-rank path runs in float32 and its output is cast to the base
output's dtype before the sum.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TARGETS: tuple[str, ...] = (
    r"blocks\.\d+\.self_attn\.[qkvo]",  # self-attention q, k, v and output projections of every block
    r"blocks\.\d+\.cross_attn\.[qkvo]",  # cross-attention (to the text) projections
    r"blocks\.\d+\.ffn\.[02]",  # the FFN's two Linears (ffn.1 is the GELU)
)
"""Module-name patterns (regular expressions matched against the whole name from ``model.named_modules()``) of the
Linears LoRA adapts by default: attention and FFN of every block of ``PhantomWanDiT`` (upstream Wan2.1 names)."""


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_up(lora_down(dropout(x)))``, ``scale = alpha / rank``.

    Args:
        base: the frozen Linear (``nn.Linear``, ``fp8.CastLinear`` or any module with ``in_features`` /
            ``out_features`` mapping ``(..., in)`` to ``(..., out)``); kept as ``self.base`` in its own dtype.
        rank: inner width r of the update (>= 1).
        alpha: LoRA alpha (> 0); the update is multiplied by ``alpha / rank``.
        dropout: probability of zeroing input features of the low-rank path while training (0 <= p < 1).
        generator: RNG for ``lora_down``'s init (None: torch's default one).

    ``lora_down.weight`` ``(rank, in)`` and ``lora_up.weight`` ``(out, rank)`` are float32 on the base weight's
    device; ``lora_up`` is zero, so the output equals ``base(x)`` until it is trained.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        device = next(base.parameters()).device
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        """``alpha / rank``: the factor on the low-rank update."""
        return self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> Tensor:
        """The update as a full weight, ``scale * lora_up @ lora_down``: ``(out, in)`` float32."""
        return self.scale * (self.lora_up.weight @ self.lora_down.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in)`` -> ``(..., out)`` in the base layer's output dtype; the low-rank path in float32."""
        y = self.base(x)  # (..., out)
        down = self.lora_down.weight.to(x.device)  # (r, in); moved for a host that offloads the weights
        up = self.lora_up.weight.to(x.device)  # (out, r)
        h = F.linear(self.dropout(x.to(down.dtype)), down)  # (..., r) fp32
        return y + (F.linear(h, up) * self.scale).to(y.dtype)  # (..., out)


def _check_hyper(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank is {rank!r}; expected an integer >= 1 (e.g. 16, 32, 64)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha is {alpha!r}; expected a finite number > 0 (commonly equal to the rank, or 1)")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout is {dropout!r}; expected a probability in [0, 1)")


def match_linears(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the Linears of ``model`` whose whole name matches one of ``targets`` (regular expressions), in
    ``named_modules`` order.

    Raises:
        ValueError: naming each pattern that matches no Linear (a typo, or a model without such layers), or an
            invalid regular expression; when ``model`` already carries LoRA adapters.
    """
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets is {targets!r}; expected a non-empty list of module-name patterns, e.g. "
                         f"{list(DEFAULT_TARGETS)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already carries LoRA adapters (LoRALinear); inject into a fresh model")
    try:
        compiled = [re.compile(t) for t in targets]
    except re.error as e:
        raise ValueError(f"LoRA targets: {e.pattern!r} is not a valid regular expression ({e})") from None
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = {t.pattern: [n for n in linears if t.fullmatch(n)] for t in compiled}
    unmatched = [p for p, names in found.items() if not names]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no Linear of {type(model).__name__} (patterns match the "
                         f"whole module name, e.g. {linears[:3]})")
    return [n for n in linears if any(n in names for names in found.values())]


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
                dropout: float = 0.0, generator: torch.Generator | None = None) -> list[str]:
    """Wrap, in place, each Linear of ``model`` whose name matches ``targets`` in a ``LoRALinear``.

    Every parameter ``model`` had is frozen (``requires_grad=False``), as peft's ``get_peft_model`` does; only the
    adapters' ``lora_down`` / ``lora_up`` weights (float32) are trainable. Zero-initialised ``lora_up``: the model's
    output is unchanged. Works on ``nn.Linear``, ComfyUI's ops Linears and ``fp8.CastLinear`` (fp8 weights stay fp8).

    Args:
        model: e.g. ``PhantomWanDiT`` (pass the bare model, not a DDP / compile wrapper, so names stay upstream's).
        rank, alpha: LoRA rank (int >= 1) and alpha (> 0); the update is scaled by ``alpha / rank``.
        targets: module-name patterns (regular expressions, whole-name match); default ``DEFAULT_TARGETS``.
        dropout: dropout probability on the adapters' input while training, in [0, 1).
        generator: RNG for the ``lora_down`` inits (a fixed seed gives the same adapters).

    Returns:
        The wrapped module names (e.g. ``"blocks.0.self_attn.q"``), in model order.

    Raises:
        ValueError: for a bad rank / alpha / dropout, a pattern that matches no Linear (named), or a model that
            already carries adapters.
    """
    _check_hyper(rank, alpha, dropout)
    names = match_linears(model, targets)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, generator))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` of every adapter in ``model`` (empty when there is none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module, prefix: str = "diffusion_model.",
                    dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The adapters of ``model`` in ComfyUI's own LoRA layout (what its Train LoRA node saves and its
    ``LoraLoaderModelOnly`` loads for Wan models; read from ComfyUI's ``comfy/weight_adapter/lora.py`` and
    ``comfy/lora.py``, ``model_lora_keys_unet``):

    - ``<prefix><module>.lora_up.weight``: ``(out, rank)`` in ``dtype``;
    - ``<prefix><module>.lora_down.weight``: ``(rank, in)`` in ``dtype``;
    - ``<prefix><module>.alpha``: 0-d float32 (ComfyUI reads it with ``.item()`` and scales by ``alpha / rank``).

    ``<module>`` is the upstream Wan2.1 name (``blocks.0.self_attn.q``). Tensors are detached, contiguous CPU
    copies. Raises ``ValueError`` when ``model`` has no adapters or ``dtype`` is not a float dtype.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype is {dtype}; a LoRA file stores torch.float32, torch.bfloat16 or torch.float16")
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError(f"{type(model).__name__} carries no LoRA adapters (inject_lora adds them)")
    sd: dict[str, Tensor] = {}
    for name, m in adapters.items():
        key = f"{prefix}{name}"
        sd[f"{key}.lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dtype).contiguous()
        sd[f"{key}.lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return sd
