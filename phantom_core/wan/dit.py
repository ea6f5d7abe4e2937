"""The Phantom-Wan DiT: a Wan2.1 text-to-video diffusion transformer that also attends to reference latents.

Phantom (arXiv 2502.11079) fine-tunes Wan2.1 T2V without adding a single parameter: each reference image is
VAE-encoded as its own 1-frame latent, the references are appended after the video latents on the time axis,
kept clean (never noised) at every step, and their output frames are cut off at the end. So this module is
the Wan2.1 T2V DiT (same parameter names and shapes as the upstream checkpoints, no renaming) whose forward
takes the references as a separate input.

Architecture (source: Wan2.1 ``wan/modules/model.py``; cross-checked against ComfyUI's
``comfy/ldm/wan/model.py`` in ``tests/test_wan_dit.py``):

- Conv3d patchify (patch 1x2x2) to ``dim`` channels; 3-D RoPE on q and k (``rope.py``);
- sinusoidal timestep embedding (cos half first) -> time MLP -> per-block 6-way modulation, all in fp32
  (``run_fp32``: each layer's own call, so hooks and adapters on it apply);
- each block: LayerNorm + modulation -> self-attention (RMSNorm on q and k over the full width) -> gated
  residual; affine LayerNorm (``norm3``) -> cross-attention to the text -> residual; LayerNorm + modulation
  -> GELU(tanh) FFN -> gated residual;
- head: LayerNorm + 2-way modulation -> Linear -> unpatchify.

The attention, block and head layers live in ``dit_blocks.py``; this module holds the config, the model and its
forward, and the seams for training and caching (``run_blocks``, gradient checkpointing, ``init_weights``).

Heads are not stored in a checkpoint; every Wan2.1 model uses 128 channels per head, so
``num_heads = dim // 128`` (``HEAD_DIM``), which is how ``checkpoint.infer_dit_config`` recovers them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from phantom_core.loading.fp8 import is_fp8
from phantom_core.log import logger
from phantom_core.wan.context_reuse import ContextMemo, active_memo
from phantom_core.wan.dit_blocks import WanBlock, WanHead
from phantom_core.wan.rope import rope_axis_pairs, rope_table

HEAD_DIM = 128  # channels per attention head in every Wan2.1 model (1.3B: 1536 / 12, 14B: 5120 / 40)
TEXT_LEN = 512  # upstream wan_shared_cfg.text_len: umT5 tokens per prompt (</s> included), the DiT's context length


@dataclass(frozen=True)
class WanDiTConfig:
    """Architecture of a Wan2.1 T2V / Phantom-Wan DiT (everything a checkpoint's shapes determine, plus heads).

    ``qk_norm`` and ``cross_attn_norm`` are always on in Wan2.1 and are therefore not parameters here.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = TEXT_LEN  # the text context is zero-padded (or truncated) to exactly this many tokens
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanDiTConfig.{name} is {getattr(self, name)}; it must be a positive integer")
        if self.dim % self.num_heads:
            raise ValueError(f"WanDiTConfig.dim {self.dim} is not divisible by num_heads {self.num_heads}")
        rope_axis_pairs(self.dim // self.num_heads)  # raises for a head_dim RoPE cannot split
        if self.freq_dim % 2:
            raise ValueError(f"WanDiTConfig.freq_dim is {self.freq_dim}; it must be even")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"WanDiTConfig.patch_size is {self.patch_size}; expected 3 positive ints (t, h, w)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIT_PRESETS: dict[str, WanDiTConfig] = {
    # 825 state-dict keys, 1,418,996,800 parameters
    "phantom-wan-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # 1095 state-dict keys, 14,288,491,584 parameters
    "phantom-wan-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tests and the embedded demo default; head_dim 128 like the real models, text_dim of the tiny umT5
    "tiny": WanDiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64),
    # the trained embedded default of the miniature world (phantom_core.world.default_model), 4.9 M parameters;
    # head_dim 128 as every Wan2.1 file, because loaders (ours, ComfyUI's) infer num_heads = dim // 128
    "world": WanDiTConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, text_dim=64),
}


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Timestep embedding ``[cos(t w_i), sin(t w_i)]`` with ``w_i = 10000 ** (-i / (dim / 2))``.

    Args:
        t: ``(B,)`` timesteps in [0, 1000] (any float dtype).
        dim: embedding width (even).

    Returns:
        ``(B, dim)`` float32, cosine half first (Wan2.1 ``sinusoidal_embedding_1d``; phases in float64).
    """
    half = dim // 2
    f64 = torch.float32 if t.device.type == "mps" else torch.float64  # MPS has no float64
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=f64, device=t.device) / half)  # (half,)
    phase = torch.outer(t.to(f64), freqs)  # (B, half)
    return torch.cat([phase.cos(), phase.sin()], dim=1).float()  # (B, dim)


def pad_to_patch(x: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """Pad ``(B, C, T, H, W)`` at the end of each of T, H, W up to a multiple of the patch (circular padding,
    as ComfyUI's ``pad_to_patch_size``); returns ``x`` itself when nothing is needed."""
    pad: list[int] = []
    for size, p in zip(reversed(x.shape[2:]), reversed(patch_size)):
        pad += [0, (p - size % p) % p]
    return F.pad(x, pad, mode="circular") if any(pad) else x


def run_fp32(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` computed in float32 through the layer's own call, whatever dtype its weights are stored in.

    Upstream Wan2.1 runs the time MLP and the modulation projection under ``autocast(dtype=float32)``. Here every
    floating parameter and buffer of ``layer`` (children included) is swapped, for this call only, for a float32
    copy on ``x``'s device (``torch.func.functional_call``), and the module itself is called on ``x.float()``. So
    forward hooks, a wrapper that replaced the Linear (e.g. a LoRA adapter adding a low-rank delta) and
    ComfyUI's weight patches all take effect, and the casts are differentiable: gradients reach the stored
    weights. A plain ``nn.Linear`` then computes in float32; so does ``fp8.CastLinear`` (fp8 or scaled fp8),
    which computes in float32 when given float32 input, its ``scale_weight`` applied in float32. Autocast is
    switched off inside, so a bf16-autocast training step keeps this path in float32 too.

    Args:
        layer: any module mapping ``(..., in)`` to ``(..., out)``.
        x: ``(..., in)``, any float dtype.

    Returns:
        ``(..., out)`` float32.
    """
    tensors = chain(layer.named_parameters(), layer.named_buffers())
    fp32 = {name: t.to(device=x.device, dtype=torch.float32) for name, t in tensors if t.is_floating_point()}
    # bf16 autocast (training) would compute these Linears in bf16; "meta" (shape-only runs) has no autocast
    off = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) \
        else contextlib.nullcontext()
    with off:
        return functional_call(layer, fp32, (x.float(),)).float()


def check_velocity_inputs(x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None, in_dim: int,
                          text_dim: int) -> None:
    """The velocity contract's input checks, shared by the Phantom-Wan DiT and the MMDiT.

    Raises:
        ValueError: ``x`` not ``(B, in_dim, F, H, W)``, ``t`` not ``(B,)``, ``context`` not ``(B, L, text_dim)``, or
            ``ref_latents`` (when given) not ``(B, in_dim, N, H, W)`` with the video's H, W.
    """
    if x.ndim != 5 or x.shape[1] != in_dim:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {in_dim}, F, H, W) video latents")
    B = x.shape[0]
    if t.ndim != 1 or t.shape[0] != B:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected ({B},): one timestep in [0, 1000] per sample")
    if context.ndim != 3 or context.shape[0] != B or context.shape[2] != text_dim:
        raise ValueError(f"context has shape {tuple(context.shape)}; expected ({B}, L, {text_dim})")
    if ref_latents is not None:
        want = (B, in_dim, x.shape[3], x.shape[4])
        got = (ref_latents.shape[0], ref_latents.shape[1], *ref_latents.shape[3:])
        if ref_latents.ndim != 5 or got != want:
            raise ValueError(
                f"ref_latents has shape {tuple(ref_latents.shape)}; expected ({B}, {in_dim}, N, "
                f"{x.shape[3]}, {x.shape[4]}): one 1-frame latent per reference, same size as the video"
            )


def xavier_init_(model: nn.Module, patch_embedding: nn.Module, generator: torch.Generator | None) -> None:
    """Xavier-uniform every Linear weight of ``model`` (biases zero) and the Conv3d ``patch_embedding`` weight on its
    ``(D, C * pt * ph * pw)`` view: the DiT / SD3 / Wan2.1 init of the projections, in place."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    pe = patch_embedding.weight
    nn.init.xavier_uniform_(pe.view(pe.shape[0], -1), generator=generator)  # (D, C * pt * ph * pw) view


class PhantomWanDiT(nn.Module):
    """Phantom-Wan DiT (Wan2.1 T2V architecture, upstream parameter names).

    Args:
        config: architecture (see ``DIT_PRESETS``).
        ops: namespace providing ``Linear``, ``Conv3d``, ``LayerNorm``, ``RMSNorm`` (default ``torch.nn``;
            ComfyUI's ``comfy.ops.manual_cast`` etc. fit; ``fp8.fp8_ops(compute_dtype)`` for fp8 weights, whose
            ``compute_dtype`` attribute becomes the activation dtype).
        dtype, device: passed to every layer; build on ``torch.device("meta")`` and load with
            ``load_state_dict(sd, assign=True)`` (``checkpoint.load_dit`` does that), or ``to_empty`` then
            ``init_weights()`` to train from scratch.

    Seams for training and speed-ups: ``enable_gradient_checkpointing``, ``run_blocks`` (the block loop, which a
    step cache wraps), ``init_weights``; the time path runs each layer's own call (``run_fp32``), so hooks and
    adapters on ``time_embedding`` / ``time_projection`` apply.
    """

    def __init__(self, config: WanDiTConfig, ops: Any = nn, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.config = config
        self._ops_compute_dtype: torch.dtype | None = getattr(ops, "compute_dtype", None)  # fp8.fp8_ops sets it
        cfg, kw = config, {"dtype": dtype, "device": device}
        self.patch_embedding = ops.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size, **kw)
        self.text_embedding = nn.Sequential(
            ops.Linear(cfg.text_dim, cfg.dim, **kw), nn.GELU(approximate="tanh"), ops.Linear(cfg.dim, cfg.dim, **kw)
        )
        self.time_embedding = nn.Sequential(
            ops.Linear(cfg.freq_dim, cfg.dim, **kw), nn.SiLU(), ops.Linear(cfg.dim, cfg.dim, **kw)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(cfg.dim, 6 * cfg.dim, **kw))
        self.blocks = nn.ModuleList(WanBlock(cfg, ops, dtype, device) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg, ops, dtype, device)
        self.gradient_checkpointing = False  # see enable_gradient_checkpointing
        self.text_memo: ContextMemo | None = None  # set inside context_reuse.reuse_text_context (one sampling run)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: ``ops.compute_dtype`` when the layers cast their weights per forward
        (``fp8.fp8_ops``), else that of the weights, or bfloat16 for 8-bit weights cast on the fly by ``ops``."""
        if self._ops_compute_dtype is not None:
            return self._ops_compute_dtype
        layer = self.time_embedding[0]  # a wrapper (adapter) put in its place may have no .weight
        dt = (layer if isinstance(layer, nn.Linear) else self.patch_embedding).weight.dtype
        return dt if dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.bfloat16

    def enable_gradient_checkpointing(self, on: bool = True) -> PhantomWanDiT:
        """Turn gradient checkpointing on (or off): while autograd records (``torch.is_grad_enabled()``), each
        block's activations are recomputed in the backward pass instead of kept (``torch.utils.checkpoint``,
        non-reentrant), trading one more block forward for the memory of all of them. Inference is unaffected.
        Sets ``self.gradient_checkpointing``; returns ``self``."""
        self.gradient_checkpointing = on
        return self

    def run_blocks(self, tokens: Tensor, e0: Tensor, cos: Tensor, sin: Tensor, ctx: Tensor) -> Tensor:
        """Stage 5 of ``forward``: every transformer block, in order, over the video + reference tokens.

        The seam a step cache (TeaCache / FirstBlockCache-like residual reuse) wraps or replaces: override it in
        a subclass, or assign a plain function with this signature to the instance (``model.run_blocks = f``;
        ``f`` may call the original bound method; an ``nn.Module`` assigned there would become a submodule and
        not shadow this method). What a cache keys on are these inputs: ``e0`` is the step's modulation (the
        Wan2.1 TeaCache compares ``e0`` between steps; block 0 builds its modulated input
        ``LayerNorm(tokens) * (1 + e0[:, 1]) + e0[:, 0]`` from it), ``tokens`` the input of block 0. A
        first-block cache runs ``self.blocks[0]`` itself and compares residuals; returning
        ``tokens + cached_residual`` skips the blocks. Honours ``gradient_checkpointing``.

        Args:
            tokens: ``(B, L, D)`` in ``compute_dtype``: video tokens, then reference tokens (L = f * h * w).
            e0: ``(B, 6, D)`` float32 time projection (shift, scale, gate of the attention, then of the FFN).
            cos, sin: ``(L, 1, head_dim / 2)`` float32 RoPE tables.
            ctx: ``(B, text_len, D)`` embedded text context.

        Returns:
            ``(B, L, D)``: the tokens after the last block.
        """
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                tokens = checkpoint(block, tokens, e0, cos, sin, ctx, use_reentrant=False)  # (B, L, D)
            else:
                tokens = block(tokens, e0, cos, sin, ctx)  # (B, L, D)
        return tokens

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter as upstream Wan2.1 ``WanModel.init_weights`` does (training from scratch).

        Linear weights Xavier-uniform, biases zero; ``patch_embedding`` weight Xavier-uniform on its
        ``(D, C * pt * ph * pw)`` view, its bias PyTorch's default Conv3d init U(+-1/sqrt(fan_in)) (upstream leaves
        it); text and time MLP weights N(0, 0.02^2); ``head.head`` weight zero, so the first velocity is 0;
        modulations N(0, 1/dim); RMSNorm / LayerNorm weights one, biases zero. For a model built with
        ``device="meta"`` and allocated with ``to_empty(device=...)`` (a meta build allocates nothing).

        Args:
            generator: RNG on the parameters' device; None uses torch's default one (``torch.manual_seed``).

        Raises:
            ValueError: when a parameter is still on the meta device or is stored in fp8.
        """
        self._check_initialisable()
        g = {"generator": generator}
        xavier_init_(self, self.patch_embedding, generator)
        pe = self.patch_embedding.weight
        bound = pe[0].numel() ** -0.5
        nn.init.uniform_(self.patch_embedding.bias, -bound, bound, **g)
        for m in (*self.text_embedding.modules(), *self.time_embedding.modules()):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02, **g)
        nn.init.zeros_(self.head.head.weight)
        for mod in (*(b.modulation for b in self.blocks), self.head.modulation):
            nn.init.normal_(mod, std=self.config.dim**-0.5, **g)
        for norm in self._norms():
            nn.init.ones_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                nn.init.zeros_(norm.bias)

    def _norms(self) -> list[nn.Module]:
        """The affine norms: each block's ``norm3`` and the q / k RMSNorms of both attentions."""
        attns = [a for b in self.blocks for a in (b.self_attn, b.cross_attn)]
        return [b.norm3 for b in self.blocks] + [n for a in attns for n in (a.norm_q, a.norm_k)]

    def _check_initialisable(self) -> None:
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                raise ValueError(f"parameter {name} is on the meta device; allocate the model first "
                                 "(model.to_empty(device=...)), then call init_weights()")
            if is_fp8(p.dtype):
                raise ValueError(f"parameter {name} is stored as {p.dtype}; init_weights needs float32, bfloat16 "
                                 "or float16 weights")

    def _embed_text(self, context: Tensor) -> Tensor:
        """``(B, L, text_dim)`` -> zero-pad / truncate to ``text_len`` -> ``(B, text_len, D)``.

        Wan2.1 was trained with the umT5 output zero-padded to 512 tokens and attends to all 512 without a
        mask, so the padding rows (which become non-zero after ``text_embedding``'s biases) matter; they are all
        equal, so one is embedded and repeated (the cross-attention folds them, ``context_reuse``). Inside
        ``context_reuse.reuse_text_context`` a context already embedded in this run is not embedded again.
        """
        memo = active_memo(self.text_memo)
        if memo is not None:
            return memo.get(context, self._embed_text_now)
        return self._embed_text_now(context)

    def _embed_text_now(self, context: Tensor) -> Tensor:
        n = self.config.text_len
        if context.shape[1] > n:
            logger.warning("text context has %d tokens; truncating to %d (as upstream Wan2.1)", context.shape[1], n)
            context = context[:, :n]
        real = context.shape[1]
        # every zero-padding row embeds to the same row: embed the real rows and one padding row, repeat that one
        context = F.pad(context, (0, 0, 0, min(1, n - real)))  # (B, real (+ 1), text_dim)
        emb = self.text_embedding(context.to(self.compute_dtype))  # (B, real (+ 1), D)
        if emb.shape[1] == n:
            return emb  # (B, text_len, D)
        return torch.cat([emb, emb[:, -1:].expand(-1, n - emb.shape[1], -1)], dim=1)  # (B, text_len, D)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None = None) -> Tensor:
        """Predict the flow-matching velocity of the video latents.

        Args:
            x: ``(B, 16, F, H, W)`` noisy normalized video latents; H, W need not be multiples of the patch.
            t: ``(B,)`` (or a scalar) float timesteps in [0, 1000] (``1000 * sigma``).
            context: ``(B, L, text_dim)`` umT5 features, ``L <= 512`` real tokens (longer is truncated with a
                warning); zero-padded to 512 here.
            ref_latents: ``(B, 16, N, H, W)`` clean reference latents (one frame each), or None / N = 0.

        Returns:
            ``(B, 16, F, H, W)`` velocity for the video frames only, in ``x.dtype``.

        Raises:
            ValueError: for inputs of the wrong rank, channel count, batch or reference size.
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # one timestep for the whole batch
        if ref_latents is not None and ref_latents.ndim == 5 and ref_latents.shape[2] == 0:
            ref_latents = None  # zero references
        check_velocity_inputs(x, t, context, ref_latents, self.config.in_dim, self.config.text_dim)
        cfg, dt = self.config, self.compute_dtype
        F_, H, W = x.shape[2:]
        pt, ph, pw = cfg.patch_size
        # 1. pad to the patch and append the references after the video on the time axis
        z = pad_to_patch(x, cfg.patch_size)  # (B, C, F', H', W')
        f_video = z.shape[2] // pt
        if ref_latents is not None:
            refs = pad_to_patch(ref_latents.to(x.dtype), cfg.patch_size)  # (B, C, N', H', W')
            z = torch.cat([z, refs], dim=2)  # (B, C, F' + N', H', W')
        # 2. patchify
        z = self.patch_embedding(z.to(dt))  # (B, D, f, h, w)
        grid = tuple(z.shape[2:])
        tokens = z.flatten(2).transpose(1, 2).contiguous()  # (B, L, D), L = f * h * w
        cos, sin = rope_table(grid, cfg.head_dim, cfg.rope_theta, tokens.device)  # (L, 1, d/2) each
        # 3. timestep: sinusoid -> time MLP -> 6-way projection, all in float32 (as upstream's fp32 autocast),
        #    each Linear through its own call (run_fp32), so hooks and adapters on these layers apply
        mlp, proj = self.time_embedding, self.time_projection
        e = run_fp32(mlp[2], F.silu(run_fp32(mlp[0], sinusoidal_embedding(t, cfg.freq_dim))))  # (B, D) fp32
        e0 = run_fp32(proj[1], F.silu(e)).unflatten(1, (6, cfg.dim))  # (B, 6, D) fp32
        # 4. text context, zero-padded to text_len
        ctx = self._embed_text(context)  # (B, text_len, D)
        # 5. transformer blocks over video + reference tokens (the seam a step cache wraps)
        tokens = self.run_blocks(tokens, e0, cos, sin, ctx)  # (B, L, D)
        # 6. head on the video tokens only (reference tokens are cut off)
        n_video = f_video * grid[1] * grid[2]
        out = self.head(tokens[:, :n_video], e)  # (B, f_video * h * w, pt * ph * pw * C)
        # 7. unpatchify and crop the patch padding
        out = rearrange(
            out, "b (f h w) (pf ph pw c) -> b c (f pf) (h ph) (w pw)",
            f=f_video, h=grid[1], w=grid[2], pf=pt, ph=ph, pw=pw,
        )  # (B, C, F', H', W')
        return out[:, :, :F_, :H, :W].to(x.dtype)  # (B, C, F, H, W)
