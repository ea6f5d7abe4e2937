"""The Phantom paper's own network: an MMDiT with window attention, dynamic reference injection and CLIP features.

Phantom (arXiv 2502.11079) encodes each reference image twice: by the VAE into the video branch (Eq. 2,
``F_ref,v``) and by CLIP into the text branch (Eq. 1, ``F_T = F_text (+) F_ref,c``), in an MMDiT (SD3, arXiv
2403.03206) whose video tokens attend in 3-D windows with the references injected into every window (Sec. 3.2,
Fig. 5). No weights were released; this module is that network in the house style, with the velocity contract of
the Phantom-Wan DiT, so the sampler, the three-pass guidance, LoRA adapters and step caches drive either.

Token streams and their positions (3-D RoPE, Wan convention, ``phantom_core.wan.rope``):

- video tokens: patchified latents (Conv3d, patch ``(1, 2, 2)``), positions ``(t, y, x)`` on the video token grid
  ``(f, h, w)``, counted from 0; they never depend on the references;
- reference VAE tokens ``F_ref,v``: each reference latent patchified alone by the same Conv3d, reference ``k``
  (0-based) at positions ``(f + k, y, x)``, i.e. the time indices right after the video, as Phantom-Wan appends
  its references on the time axis; they share the video stream's weights; with ``config.reference_index`` a
  learned index vector of reference ``k`` is added to its tokens (RoPE alone tells references apart in the
  attention scores, not in what attention returns);
- text tokens (umT5 features zero-padded to ``text_len``, then a Linear) and CLIP reference tokens (each
  reference's CLIP features through an MLP to the model width): the text stream, no rotation (position 0 on
  every axis, as Flux's ``txt_ids``).

Every block runs :func:`phantom_core.mmdit.windows.window_joint_attention`: the video tokens in windows of
``config.window`` tokens (shifted by half a window in odd blocks), ``[F_ref,v, F_T]`` appended to every window,
their outputs averaged over the windows; with ``config.reference_key_mask`` each reference's background tokens (its
white letterbox) are left out of the keys. The output head reads the video tokens only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from phantom_core.log import logger
from phantom_core.mmdit.blocks import FinalLayer, JointBlock
from phantom_core.mmdit.config import MAX_CLIP_REFERENCES, TEXT_POSITION_SCALE, MMDiTConfig
from phantom_core.mmdit.inputs import check_mmdit_inputs
from phantom_core.mmdit.positions import cropped_table, frame_table, sincos_table
from phantom_core.mmdit.windows import WindowPlan, reference_key_keep, window_plan
from phantom_core.wan.dit import pad_to_patch, run_fp32, sinusoidal_embedding, xavier_init_
from phantom_core.wan.rope import rope_table

MMDIT_LORA_TARGETS: tuple[str, ...] = (
    r"joint_blocks\.\d+\.(x_block|context_block)\.attn\.(qkv|proj)",  # both streams' attention projections
    r"joint_blocks\.\d+\.(x_block|context_block)\.mlp\.fc[12]",  # both streams' MLPs
)
"""Module-name patterns (regular expressions matched against whole ``named_modules()`` names) of the Linears a LoRA
adapts by default, the counterpart of the Phantom-Wan DiT's attention and FFN Linears."""


def mlp_fp32(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """A ``Linear, SiLU, Linear`` embedding MLP (the time MLP, the pooled-vector MLPs) on ``x`` ``(..., in)``, each
    Linear through ``run_fp32`` -> ``(..., out)`` float32."""
    return run_fp32(mlp[2], F.silu(run_fp32(mlp[0], x)))


class PhantomMMDiT(nn.Module):
    """Phantom MMDiT (dual-stream joint blocks, window attention, dynamic injection of VAE and CLIP references).

    Args:
        config: architecture (see ``MMDIT_PRESETS``).
        ops: namespace providing ``Linear``, ``Conv3d``, ``LayerNorm``, ``RMSNorm`` (default ``torch.nn``;
            ComfyUI's ``comfy.ops`` namespaces and ``fp8.fp8_ops(compute_dtype)`` fit, as for ``PhantomWanDiT``).
        dtype, device: passed to every layer; build on ``torch.device("meta")`` and load with
            ``load_state_dict(sd, assign=True)`` (``mmdit.load.load_mmdit``), or ``to_empty`` then
            ``init_weights()`` to train from scratch.

    Seams (as ``PhantomWanDiT``, docs/DESIGN.md): ``enable_gradient_checkpointing``, ``run_blocks`` (the block
    loop a step cache wraps), ``init_weights``; the time path runs each layer's own call (``run_fp32``).
    """

    def __init__(self, config: MMDiTConfig, ops: Any = nn, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.config = cfg = config
        self._ops_compute_dtype: torch.dtype | None = getattr(ops, "compute_dtype", None)
        kw = {"dtype": dtype, "device": device}
        D = cfg.dim
        self.x_embedder = nn.Module()
        self.x_embedder.proj = ops.Conv3d(cfg.in_dim, D, cfg.patch_size, stride=cfg.patch_size, **kw)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(ops.Linear(cfg.freq_dim, D, **kw), nn.SiLU(), ops.Linear(D, D, **kw))
        self.context_embedder = ops.Linear(cfg.text_dim, D, **kw)
        if cfg.pooled_text:  # SD3's VectorEmbedder of the pooled text
            self.y_embedder = nn.Module()
            self.y_embedder.mlp = nn.Sequential(ops.Linear(cfg.text_dim, D, **kw), nn.SiLU(), ops.Linear(D, D, **kw))
        if cfg.pooled_reference:  # the same MLP over the mean reference token
            self.r_embedder = nn.Module()
            self.r_embedder.mlp = nn.Sequential(ops.Linear(D, D, **kw), nn.SiLU(), ops.Linear(D, D, **kw))
        if cfg.text_positions:  # learned absolute positions of the text stream (init_weights: sin-cos start)
            self.text_pos_embed = nn.Parameter(torch.zeros(cfg.text_len, D, **kw))
            if cfg.clip_dim:
                self.clip_index_embed = nn.Parameter(torch.zeros(MAX_CLIP_REFERENCES, D, **kw))
        if cfg.reference_index:  # learned index of each reference's VAE tokens (init_weights: sin-cos start)
            self.ref_index_embed = nn.Parameter(torch.zeros(MAX_CLIP_REFERENCES, D, **kw))
        if cfg.clip_dim:  # Wan2.1 I2V's image projection: LayerNorm, Linear, GELU, Linear
            self.clip_embedder = nn.Sequential(
                ops.LayerNorm(cfg.clip_dim, eps=1e-5, **kw), ops.Linear(cfg.clip_dim, D, **kw),
                nn.GELU(approximate="tanh"), ops.Linear(D, D, **kw))
        self.joint_blocks = nn.ModuleList(
            JointBlock(cfg, i == cfg.num_layers - 1, ops, dtype, device) for i in range(cfg.num_layers))
        self.final_layer = FinalLayer(cfg, ops, dtype, device)
        # the two architecture values no weight shape holds, saved with the weights (mmdit.load.infer_mmdit_config);
        # real values even in a meta build, so that a shapes-only state dict still says them
        where = "cpu" if device is None or torch.device(device).type == "meta" else device
        self.register_buffer("window_size", torch.tensor(cfg.window, dtype=torch.int64, device=where))
        self.register_buffer("text_len", torch.tensor(cfg.text_len, dtype=torch.int64, device=where))
        if cfg.pos_embed_max:  # SD3's fixed absolute table, saved with the weights (its size tells pos_embed_max)
            self.register_buffer("pos_embed", sincos_table(cfg.pos_embed_max, D)[None].to(where))
        if cfg.reference_key_mask:  # the letterbox key mask's threshold (mmdit.load.infer_mmdit_config reads it)
            self.register_buffer("reference_key_mask", torch.tensor(cfg.reference_key_mask, device=where))
        self.gradient_checkpointing = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: ``ops.compute_dtype`` for cast-on-forward layers, else the weights' float dtype
        (bfloat16 for 8-bit weights cast by ``ops``)."""
        if self._ops_compute_dtype is not None:
            return self._ops_compute_dtype
        dt = self.x_embedder.proj.weight.dtype
        return dt if dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.bfloat16

    def enable_gradient_checkpointing(self, on: bool = True) -> PhantomMMDiT:
        """While autograd records, recompute each joint block in the backward pass (``torch.utils.checkpoint``,
        non-reentrant) instead of keeping its activations. Sets ``self.gradient_checkpointing``; returns ``self``."""
        self.gradient_checkpointing = on
        return self

    def run_blocks(self, tokens: Tensor, ctx: Tensor, c: Tensor, cos: Tensor, sin: Tensor,
                   plans: tuple[WindowPlan, WindowPlan]) -> Tensor:
        """Stage 6 of ``forward``: every joint block in order; the seam a step cache wraps or replaces.

        Override it in a subclass or assign a function with this signature to the instance (as
        ``PhantomWanDiT.run_blocks``). A cache keys on ``c`` (the step's timestep conditioning, from which every
        adaLN modulation is computed) and ``tokens`` (block 0's video-stream input); returning
        ``tokens + cached_residual`` skips the blocks. Honours ``gradient_checkpointing``.

        Args:
            tokens: ``(B, Lv + Lr, D)`` video tokens then reference VAE tokens, in ``compute_dtype``.
            ctx: ``(B, text_len + Lc, D)`` text tokens then CLIP reference tokens.
            c: ``(B, D)`` float32 timestep conditioning.
            cos, sin: ``(Lv + Lr, 1, head_dim / 2)`` float32 RoPE tables.
            plans: the unshifted and the shifted windows (even blocks use ``plans[0]``, odd ``plans[1]``).

        Returns:
            ``(B, Lv + Lr, D)``: the video-stream tokens after the last block.
        """
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.joint_blocks):
            args = (tokens, ctx, c, cos, sin, plans[i % 2])
            tokens, ctx = checkpoint(block, *args, use_reentrant=False) if ckpt else block(*args)
        return tokens

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise for training from scratch, as SD3 / DiT (``mmditx.py`` ``initialize_weights``).

        Linear weights Xavier-uniform, biases zero; ``x_embedder.proj`` Xavier-uniform on its ``(D, C * pt * ph *
        pw)`` view; timestep MLP N(0, 0.02^2); the pooled-text and pooled-reference MLPs Xavier as every Linear;
        adaLN-Zero: every ``adaLN_modulation`` Linear and the final ``linear`` zero, so each block starts as the
        identity and the first velocity is 0; norm weights one, biases zero.
        Refills ``window_size`` / ``text_len`` (and ``pos_embed``, ``reference_key_mask``) from the config
        (``to_empty`` leaves buffers undefined).
        For a model built with ``device="meta"`` and allocated with ``to_empty(device=...)``.

        Raises:
            ValueError: a parameter is still on the meta device or is stored in fp8.
        """
        for name, p in self.named_parameters():
            if p.device.type == "meta" or p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"parameter {name} is {p.dtype} on {p.device}; init_weights needs float weights "
                                 "allocated on a real device (model.to_empty(device=...) after a meta build)")
        xavier_init_(self, self.x_embedder.proj, generator)
        nn.init.zeros_(self.x_embedder.proj.bias)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02, generator=generator)
        zero = [b.adaLN_modulation[1] for jb in self.joint_blocks for b in (jb.x_block, jb.context_block)]
        for m in (*zero, self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        for norm in self._norms():
            nn.init.ones_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                nn.init.zeros_(norm.bias)
        if self.config.text_positions or self.config.reference_index:
            self.set_text_positions(TEXT_POSITION_SCALE)
        self.window_size.copy_(torch.tensor(self.config.window))
        self.text_len.fill_(self.config.text_len)
        if self.config.pos_embed_max:
            self.pos_embed.copy_(sincos_table(self.config.pos_embed_max, self.config.dim)[None])
        if self.config.reference_key_mask:
            self.reference_key_mask.fill_(self.config.reference_key_mask)

    @torch.no_grad()
    def set_text_positions(self, scale: float) -> None:
        """Set the learned text positions (``config.text_positions``) to ``scale`` times the 1-D sin-cos table
        (``positions.frame_table``): rows ``0 .. text_len - 1`` for the text tokens, the next rows for the CLIP
        references' indices (they follow the text in the stream), and those same rows for the VAE references' indices
        (``config.reference_index``). ``scale`` 0 makes the model compute what it computes without them. Raises
        ``ValueError`` for a model with neither."""
        if not (self.config.text_positions or self.config.reference_index):
            raise ValueError("this MMDiT has no text positions or reference index (MMDiTConfig.text_positions and "
                             "reference_index are False)")
        table = frame_table(self.config.text_len + MAX_CLIP_REFERENCES, self.config.dim) * scale
        if self.config.text_positions:
            self.text_pos_embed.copy_(table[: self.config.text_len])
        if hasattr(self, "clip_index_embed"):
            self.clip_index_embed.copy_(table[self.config.text_len:])
        if self.config.reference_index:
            self.ref_index_embed.copy_(table[self.config.text_len:])

    def _norms(self) -> list[nn.Module]:
        """The affine norms: the q / k RMSNorms of every stream and the CLIP projection's LayerNorm."""
        streams = [b for jb in self.joint_blocks for b in (jb.x_block, jb.context_block)]
        norms = [n for b in streams for n in (b.attn.ln_q, b.attn.ln_k)]
        return norms + ([self.clip_embedder[0]] if self.config.clip_dim else [])

    def _patchify(self, z: Tensor, frames: bool = True) -> tuple[Tensor, tuple[int, int, int]]:
        """``(B, C, T, H, W)`` latents -> tokens ``(B, f * h * w, D)`` and the token grid ``(f, h, w)``; with a
        ``pos_embed`` table its centre crop is added to every frame's tokens, and (``frames``: the video, not a
        reference) each token's frame index embedding (``positions.frame_table``)."""
        z = self.x_embedder.proj(pad_to_patch(z, self.config.patch_size).to(self.compute_dtype))  # (B, D, f, h, w)
        f, h, w = z.shape[2:]
        tokens = z.flatten(2).transpose(1, 2)  # (B, f * h * w, D)
        if self.config.pos_embed_max:
            pos = cropped_table(self.pos_embed[0], self.config.pos_embed_max, h, w).to(tokens.dtype)  # (h * w, D)
            if frames:
                pos = pos + frame_table(f, self.config.dim).to(tokens)[:, None]  # (f, h * w, D)
            tokens = (tokens.unflatten(1, (f, h * w)) + pos).flatten(1, 2)
        return tokens, (f, h, w)

    def _pooled_text(self, context: Tensor) -> Tensor:
        """SD3's ``y`` conditioning from ``(B, L, text_dim)`` text: the mean of the real tokens (rows not all zero:
        the zero padding of a batch or of ``text_len`` does not count; an all-zero context gives zero) through
        ``y_embedder``, in float32 -> ``(B, D)``."""
        context = context[:, : self.config.text_len].float()  # as _embed_context truncates
        real = (context.abs().amax(-1, keepdim=True) > 0).float()  # (B, L, 1)
        pooled = (context * real).sum(1) / real.sum(1).clamp_min(1.0)  # (B, text_dim)
        return mlp_fp32(self.y_embedder.mlp, pooled)  # (B, D)

    def _embed_context(self, context: Tensor, ref_clip: Tensor | None) -> Tensor:
        """Text ``(B, L, text_dim)`` zero-padded / truncated to ``text_len`` -> ``(B, text_len, D)``, then the CLIP
        reference tokens ``(B, N, T, clip_dim)`` -> ``(B, N * T, D)`` appended: ``F_T = F_text (+) F_ref,c``; with
        ``config.text_positions`` the text's position and each reference's index embeddings are added."""
        n = self.config.text_len
        if context.shape[1] > n:
            logger.warning("text context has %d tokens; truncating to %d", context.shape[1], n)
            context = context[:, :n]
        context = F.pad(context, (0, 0, 0, n - context.shape[1]))  # (B, text_len, text_dim)
        ctx = self.context_embedder(context.to(self.compute_dtype))  # (B, text_len, D)
        if self.config.text_positions:
            ctx = ctx + self.text_pos_embed.to(ctx.dtype)
        if ref_clip is None:
            return ctx
        clip = self.clip_embedder(ref_clip.to(self.compute_dtype).flatten(1, 2))  # (B, N * T, D)
        if self.config.text_positions:  # reference k's index on each of its T tokens
            n, t = ref_clip.shape[1:3]
            clip = (clip.unflatten(1, (n, t)) + self.clip_index_embed[:n, None].to(clip.dtype)).flatten(1, 2)
        return torch.cat([ctx, clip], dim=1)  # (B, text_len + N * T, D)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None = None,
                ref_clip: Tensor | None = None) -> Tensor:
        """Predict the flow-matching velocity of the video latents.

        Args:
            x: ``(B, 16, F, H, W)`` noisy normalized video latents; H, W need not be multiples of the patch.
            t: ``(B,)`` (or a scalar) float timesteps in [0, 1000] (``1000 * sigma``).
            context: ``(B, L, text_dim)`` text features (umT5), ``L <= text_len`` (longer is truncated with a
                warning); zero-padded to ``text_len`` here, so the output does not depend on zero padding.
            ref_latents: ``(B, 16, N, H, W)`` clean normalized reference latents (one frame each), or None / N = 0.
            ref_clip: ``(B, N, T, clip_dim)`` CLIP features of the references (T tokens each, or T = 1 pooled;
                ``mmdit.clip.encode_clip_references``), or None / N = 0; needs ``config.clip_dim > 0``.

        Returns:
            ``(B, 16, F, H, W)`` velocity of the video frames, in ``x.dtype``.

        Raises:
            ValueError: inputs of the wrong rank, channel count, batch, size, width, or reference counts that
                differ between ``ref_latents`` and ``ref_clip``.
        """
        # 1. validate; zero references are None
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        ref_latents, ref_clip = check_mmdit_inputs(self.config, x, t, context, ref_latents, ref_clip)
        cfg, F_, H, W = self.config, *x.shape[2:]
        # 2. patchify the video, then each reference alone (1-frame latents), with the same embedder
        tokens, grid = self._patchify(x)  # (B, Lv, D), grid (f, h, w)
        n_refs = 0 if ref_latents is None else ref_latents.shape[2]
        if n_refs:
            refs = rearrange(ref_latents.to(x.dtype), "b c n h w -> (b n) c 1 h w")
            ref_tokens, _ = self._patchify(refs, frames=False)  # (B * N, h * w, D)
            if cfg.reference_index:  # reference k's index on each of its tokens; rows in (b n) order
                index = self.ref_index_embed[:n_refs].to(ref_tokens.dtype).repeat(x.shape[0], 1)  # (B * N, D)
                ref_tokens = ref_tokens + index[:, None]
            tokens = torch.cat([tokens, ref_tokens.unflatten(0, (x.shape[0], n_refs)).flatten(1, 2)], dim=1)
        # 3. RoPE of the video stream: video grid (f, h, w), reference k at time index f + k
        f, h, w = grid
        cos, sin = rope_table((f + n_refs, h, w), cfg.head_dim, cfg.rope_theta, tokens.device)  # (Lv + Lr, 1, d/2)
        # 4. timestep conditioning in float32, each Linear through its own call
        c = mlp_fp32(self.t_embedder.mlp, sinusoidal_embedding(t, cfg.freq_dim))  # (B, D) fp32
        if cfg.pooled_text:
            c = c + self._pooled_text(context)  # (B, D) fp32
        if cfg.pooled_reference and n_refs:  # the mean of every reference token (zero references: nothing added)
            c = c + mlp_fp32(self.r_embedder.mlp, tokens[:, f * h * w:].float().mean(1))  # (B, D)
        # 5. text stream: F_T = F_text (+) F_ref,c
        ctx = self._embed_context(context, ref_clip)  # (B, text_len + N * T, D)
        # 6. joint blocks over the windows of the video grid alone (the seam a step cache wraps)
        plans = tuple(window_plan(grid, cfg.window, shifted, tokens.device) for shifted in (False, True))
        if cfg.reference_key_mask and n_refs:  # each reference's background tokens are no key (config docstring)
            keep = reference_key_keep(ref_latents, cfg.patch_size, cfg.reference_key_mask)  # (B, Lr)
            keep = torch.cat([keep, keep.new_ones(keep.shape[0], ctx.shape[1])], dim=1)  # (B, Lr + Lt + Lc)
            plans = tuple(replace(plan, key_keep=keep) for plan in plans)
        tokens = self.run_blocks(tokens, ctx, c, cos, sin, plans)  # (B, Lv + Lr, D)
        # 7. output layer on the video tokens only, unpatchify, crop the patch padding
        out = self.final_layer(tokens[:, : f * h * w], c)  # (B, Lv, pt * ph * pw * C)
        pt, ph, pw = cfg.patch_size
        out = rearrange(out, "b (f h w) (pf ph pw c) -> b c (f pf) (h ph) (w pw)", f=f, h=h, w=w, pf=pt, ph=ph, pw=pw)
        return out[:, :, :F_, :H, :W].to(x.dtype)  # (B, C, F, H, W)
