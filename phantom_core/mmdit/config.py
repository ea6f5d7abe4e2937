"""The architecture of the paper's MMDiT (``PhantomMMDiT``): one frozen dataclass and its named presets.

Everything a checkpoint's tensor shapes determine is a field here, plus three fields no weight shape holds
(``window``, ``text_len``: stored in the checkpoint as two small integer buffers, ``window_size`` and ``text_len``;
``rope_theta``, ``eps``: fixed). ``num_heads`` is read back from the per-head qk-norm weights (``head_dim`` long).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from phantom_core.wan.rope import rope_axis_pairs

# rows of clip_index_embed / ref_index_embed (MMDiTConfig.text_positions / reference_index): Phantom's 1-4 references
MAX_CLIP_REFERENCES = 4
TEXT_POSITION_SCALE = 0.3  # the sin-cos start of the text positions (RMS 0.21), against ~0.8 for the world
# MMDiT's text tokens: there from the first step, not drowning the words


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of a Phantom MMDiT (SD3-style dual-stream DiT over video latents, arXiv 2403.03206).

    Attributes:
        dim: token width of both streams. num_heads: attention heads (``dim // num_heads`` channels each).
        num_layers: joint blocks. ffn_dim: hidden width of each stream's MLP.
        in_dim / out_dim: latent channels in / out (16 for the Wan2.1 VAE).
        patch_size: ``(t, h, w)`` latent patch of one token.
        text_dim: width of the text features (umT5-XXL: 4096). text_len: the text context is zero-padded (or
            truncated, with a warning) to exactly this many tokens, as the Phantom-Wan DiT does.
        clip_dim: width of the CLIP reference features (ViT-H-14 penultimate tokens: 1280, its pooled embedding:
            1024); 0 builds no CLIP branch (the paper's "VAE only" variant).
        window: video window size in tokens ``(t, h, w)`` (``windows.py``); alternate blocks are shifted by half.
        freq_dim: width of the sinusoidal timestep embedding.
        pos_embed_max: side, in tokens, of SD3's fixed 2-D sin-cos absolute position table (``pos_embed``, SD3's
            ``pos_embed_max_size``; stored in the checkpoint, centre-cropped to the token grid and added to every
            video frame's and every reference's tokens), with a 1-D sin-cos of the frame index on the video's tokens
            (``mmdit.positions``); 0: none, the tokens know only relative positions (RoPE).
        pooled_text: add SD3's global text vector to the timestep conditioning (``y_embedder``: Linear, SiLU,
            Linear of the mean of the prompt's real umT5 tokens), so every adaLN modulation hears the prompt as a
            whole (SD3 pools CLIP-L/G; Phantom's umT5 has no pooled output, so its token mean stands in); False:
            the prompt reaches the video stream through joint attention only. Stored as the ``y_embedder`` keys.
        pooled_reference: add a global vector of the references to the timestep conditioning too
            (``r_embedder``: Linear, SiLU, Linear of the mean of all reference VAE tokens), so every adaLN
            modulation knows the subjects' overall appearance (colour) before attention has learnt to fetch it;
            False: the references reach the video tokens through attention only. Stored as the ``r_embedder`` keys.
        text_positions: learned absolute positions in the text stream, whose tokens are otherwise not rotated (as
            SD3 and Flux leave their text): ``text_pos_embed`` ``(text_len, dim)`` added to the text tokens and
            ``clip_index_embed`` ``(MAX_CLIP_REFERENCES, dim)`` added to every CLIP token of reference k, so the
            blocks can tell which clause a word is in and which reference a CLIP token is from. umT5-XXL writes its
            context into every token; the 0.1 M-parameter world umT5 gives a motion word the same features in
            either clause (cosine 0.999, docs/WORLD.md), so without them the world MMDiT cannot bind a motion to its
            subject. ``init_weights`` starts them as the Transformer's 1-D sin-cos table of positions ``0 ..
            text_len - 1`` (the CLIP indices: the positions after the text, where the stream appends them) times
            ``TEXT_POSITION_SCALE``, so that nearby words can find each other from the first step; False: none (the
            stored keys say which).
        reference_index: a learned index added to every VAE token of reference k (``ref_index_embed``
            ``(MAX_CLIP_REFERENCES, dim)``), so a video token that copies a reference's appearance also carries
            which reference it is (RoPE's time index ``f + k`` tells references apart in the attention scores
            only, not in what attention returns); with ``text_positions`` it starts as the same rows as
            ``clip_index_embed``, so reference k carries one index vector in both streams. False: none.
        reference_key_mask: keep each reference's background out of the attention's keys
            (``windows.reference_key_keep``): a reference VAE token whose latent patch lies within
            ``reference_key_mask`` times the largest such distance of its reference's median patch (the dominant
            background: the white letterbox Phantom's pipeline puts every reference on) is a key for no query, in
            every block; the other tokens, the video's and the text stream's stay keys. A reference of all zeros
            (dropped in training, or the ``v_neg`` pass) is masked whole. 0 (the default): off. In the world
            MMDiT 93% of the attention to the reference VAE tokens landed on the letterbox, a content-free sink, and
            another subject's latents moved the estimate by 4% of its error (docs/WORLD.md); with the keys masked,
            19-27%. Stored as the float buffer ``reference_key_mask`` (absent when 0).
    """

    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    clip_dim: int = 1280
    window: tuple[int, int, int] = (9, 9, 9)
    freq_dim: int = 256
    pos_embed_max: int = 0
    pooled_text: bool = False
    pooled_reference: bool = False
    text_positions: bool = False
    reference_index: bool = False
    reference_key_mask: float = 0.0
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads", "num_layers", "ffn_dim", "in_dim", "out_dim", "text_dim", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"MMDiTConfig.{name} is {getattr(self, name)}; it must be a positive integer")
        if self.pos_embed_max < 0:
            raise ValueError(f"MMDiTConfig.pos_embed_max is {self.pos_embed_max}; it must be >= 0 (0: no absolute "
                             "position table)")
        if self.pos_embed_max and self.dim % 4:
            raise ValueError(f"MMDiTConfig.dim {self.dim} is not divisible by 4, which the 2-D sin-cos position "
                             "table (pos_embed_max > 0) needs")
        if not 0.0 <= self.reference_key_mask < 1.0:
            raise ValueError(f"MMDiTConfig.reference_key_mask is {self.reference_key_mask}; it must be in [0, 1) (a "
                             "fraction of each reference's largest patch distance from its median patch; 0: off)")
        if self.clip_dim < 0:
            raise ValueError(f"MMDiTConfig.clip_dim is {self.clip_dim}; it must be >= 0 (0: no CLIP branch)")
        if self.dim % self.num_heads:
            raise ValueError(f"MMDiTConfig.dim {self.dim} is not divisible by num_heads {self.num_heads}")
        rope_axis_pairs(self.dim // self.num_heads)  # raises for a head_dim 3-D RoPE cannot split
        if self.freq_dim % 2:
            raise ValueError(f"MMDiTConfig.freq_dim is {self.freq_dim}; it must be even")
        for name in ("patch_size", "window"):
            value = getattr(self, name)
            if len(value) != 3 or min(value) < 1:
                raise ValueError(f"MMDiTConfig.{name} is {value}; expected 3 positive ints (t, h, w)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


_WORLD_MMDIT = MMDiTConfig(dim=192, num_heads=2, num_layers=4, ffn_dim=672, text_dim=64, text_len=144, clip_dim=128,
                           window=(5, 4, 4))
MMDIT_PRESETS: dict[str, MMDiTConfig] = {
    # ~1.0 B parameters (1,007,388,224 with the CLIP branch): SD3-medium's width (1536), 12 joint blocks, head_dim
    # 128 (Wan's 3-D RoPE split 22/21/21), umT5-XXL text and ViT-H-14 penultimate tokens (as Wan2.1 I2V)
    "phantom-mmdit-1b": MMDiTConfig(dim=1536, num_heads=12, num_layers=12, ffn_dim=6144),
    # tests and the miniature world: the tiny umT5's width (64), the tiny CLIP tower's width (128), windows of
    # (2, 4, 4) tokens so a 16x16 latent (8x8 tokens) has several windows
    "tiny": MMDiTConfig(dim=64, num_heads=2, num_layers=2, ffn_dim=128, text_dim=64, clip_dim=128,
                        window=(2, 4, 4)),
    # the miniature world's MMDiT (phantom_core.world.mmdit_default): 4,853,024 parameters with the CLIP branch
    # (4,790,944 without), against 4,862,272 of the Phantom-Wan DiT's "world" preset; the tiny umT5's width (64),
    # the world CLIP's tokens (128 wide, CLIP_VISION_PRESETS["world"]); text_len 144 holds the longest world
    # context (the dropped negative prompt: 139 tokens); windows of (5, 4, 4) tokens cut the 5 x 8 x 8 token video
    # (17 frames of 128 x 128 px) into 4 windows, shifted by (2, 2, 2) in odd blocks
    "world": _WORLD_MMDIT,
    # the paper's "VAE only" ablation of it: no CLIP branch
    "world-vae": replace(_WORLD_MMDIT, clip_dim=0),
}
