"""umT5 text encoder (Wan2.1's prompt encoder): transformers ``UMT5EncoderModel`` + a sentencepiece tokenizer.

Produces the text context exactly as upstream Wan's ``T5EncoderModel.__call__`` does: the prompt is cleaned
(``clean='whitespace'``), tokenized, ``</s>`` (id 1) appended, truncated to 512 tokens, encoded with an attention
mask, and each output cut back to its real tokens ``[L_i, d_model]``. ``encode_padded`` zero-pads to 512, the layout
of ComfyUI's own Wan CONDITIONING (pad id 0, masked positions zeroed).

Checkpoints use the transformers / ComfyUI key names (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight``, ..., ``encoder.final_layer_norm.weight``) in a ``.safetensors``
file, optionally with the sentencepiece model embedded as a uint8 tensor under ``spiece_model`` (ComfyUI's
convention). The network comes from transformers, which takes no ``ops`` namespace: for fp8 / scaled-fp8 weights
(ComfyUI's ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``) ``umt5_fp8.use_cast_layers`` swaps its layers for those of
``fp8.fp8_ops`` before the weights are assigned, so they stay 8-bit in memory.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from phantom_core.loading.disk import atomic_write
from phantom_core.loading.files import read_state_dict
from phantom_core.loading.fp8 import (
    attach_scales,
    cast_layer_weights,
    convert_state_dict,
    detect_fp8_format,
    fp8_ops,
    plan_load,
)
from phantom_core.loading.keys import errors_name_file
from phantom_core.log import logger
from phantom_core.wan.dit import TEXT_LEN

if TYPE_CHECKING:  # imported where used: importing this module must not load transformers or sentencepiece
    import sentencepiece
    from transformers import UMT5Config, UMT5EncoderModel

try:  # upstream's basic_clean runs ftfy.fix_text (fullwidth punctuation -> ASCII, curly quotes -> straight, ...)
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # umT5's special ids (no <s>)
SPIECE_KEY = "spiece_model"  # ComfyUI's key for an embedded sentencepiece model (uint8 tensor)
EMBED_TOKENS_KEY = "encoder.embed_tokens.weight"  # tied to shared.weight; dropped when present


@dataclass(frozen=True)
class UMT5EncoderSpec:
    """Architecture of a umT5 encoder stack (every block has its own relative-attention bias, unlike T5)."""

    vocab_size: int
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"  # gated GELU (tanh approximation), wi_0 / wi_1 / wo
    layer_norm_epsilon: float = 1e-6

    def to_hf_config(self) -> UMT5Config:
        """The equivalent transformers ``UMT5Config`` (encoder only; embeddings never tied to an LM head)."""
        from transformers import UMT5Config

        return UMT5Config(**dataclasses.asdict(self), tie_word_embeddings=False, dropout_rate=0.0,
                          pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID)


TEXT_ENCODER_PRESETS: dict[str, UMT5EncoderSpec] = {
    # google/umt5-xxl as used by Wan2.1 (matches ComfyUI's umt5_config_xxl.json)
    "umt5-xxl": UMT5EncoderSpec(vocab_size=256384, d_model=4096, d_ff=10240, num_heads=64, d_kv=64, num_layers=24),
    # random-weight test / demo size, vocabulary of train_tiny_tokenizer()
    "tiny": UMT5EncoderSpec(vocab_size=512, d_model=64, d_ff=128, num_heads=2, d_kv=32, num_layers=2),
}


# ---------------------------------------------------------------------------------------------- tokenizer


def clean_prompt(text: str) -> str:
    """Upstream Wan's ``clean='whitespace'``: ftfy.fix_text, HTML unescape twice, collapse whitespace, strip.

    Without the optional ``ftfy`` package the ftfy step is skipped (only differs for fullwidth punctuation,
    curly quotes, mojibake and similar), with a one-time warning.
    """
    if ftfy is not None:
        text = ftfy.fix_text(text)
    else:
        _warn_no_ftfy()
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


_ftfy_warned = False


def _warn_no_ftfy() -> None:
    global _ftfy_warned
    if not _ftfy_warned:
        logger.warning("ftfy is not installed: prompts are cleaned without ftfy.fix_text (upstream Wan uses it)")
        _ftfy_warned = True


def load_tokenizer(source: str | os.PathLike | bytes | Tensor) -> sentencepiece.SentencePieceProcessor:
    """A sentencepiece processor from serialized bytes, a uint8 tensor, a ``.model`` file or a folder.

    A folder must contain ``spiece.model`` (the file name of google/umt5-xxl). Raises ``FileNotFoundError``
    naming the path when nothing is found there.
    """
    import sentencepiece

    if isinstance(source, Tensor):
        source = source.cpu().numpy().tobytes()
    if isinstance(source, (bytes, bytearray)):
        return sentencepiece.SentencePieceProcessor(model_proto=bytes(source))
    path = Path(source)
    if path.is_dir():
        path = path / "spiece.model"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no sentencepiece model at {path} (give a .model file, a folder "
                                "holding spiece.model, or a checkpoint with an embedded 'spiece_model')")
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def tokenize_prompt(sp: sentencepiece.SentencePieceProcessor, prompt: str, max_len: int = TEXT_LEN) -> list[int]:
    """Token ids of one prompt as upstream: cleaned, ``</s>`` appended, at most ``max_len`` ids (``</s>`` kept)."""
    ids = sp.encode(clean_prompt(prompt), out_type=int)
    if len(ids) + 1 > max_len:
        logger.warning("prompt of %d tokens truncated to %d (umT5 context is %d tokens): %.60r...",
                       len(ids) + 1, max_len, max_len, prompt)
        ids = ids[: max_len - 1]  # like HF truncation with add_special_tokens: </s> survives
    return ids + [EOS_ID]


# ---------------------------------------------------------------------------------------------- model


class UMT5TextEncoder(nn.Module):
    """umT5 encoder + tokenizer. ``encode`` returns upstream Wan's per-prompt context ``[L_i, d_model]``."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: sentencepiece.SentencePieceProcessor,
                 spec: UMT5EncoderSpec):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        if tokenizer.get_piece_size() > spec.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_piece_size()} pieces but the text encoder's vocabulary "
                             f"is {spec.vocab_size}; they must belong together")

    @property
    def dtype(self) -> torch.dtype:
        """Stored dtype of the token embedding (e.g. ``float8_e4m3fn`` for an fp8 encoder)."""
        return self.model.shared.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype (differs from ``dtype`` when the layers cast fp8 weights per forward)."""
        return getattr(self.model.shared, "compute_dtype", self.dtype)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt (cleaned, ``</s>`` appended, <= 512 ids)."""
        return [tokenize_prompt(self.tokenizer, p) for p in _as_prompt_list(prompts)]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[Tensor]:
        """Encode prompts -> list of float32 ``[L_i, d_model]`` (real tokens incl. ``</s>``, on the model device).

        The batch is padded to its longest prompt with id 0 and masked, so each output is independent of the
        others (umT5's relative position bias does not see the padding). Runs in the model's dtype.
        """
        ids = self.tokenize(prompts)
        lengths = [len(x) for x in ids]
        # 1. pad to the batch maximum, mask the padding
        tokens = torch.full((len(ids), max(lengths)), PAD_ID, dtype=torch.long, device=self.device)  # (B, L)
        mask = torch.zeros_like(tokens)  # (B, L)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        # 2. encoder stack
        hidden = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state  # (B, L, d_model)
        # 3. keep the real tokens only
        return [hidden[i, :n].float() for i, n in enumerate(lengths)]  # B x (L_i, d_model)

    def encode_padded(self, prompts: Sequence[str], length: int = TEXT_LEN) -> Tensor:
        """Encode and zero-pad to ``length`` -> float32 ``[B, length, d_model]`` (zeros after each prompt's L_i)."""
        out = torch.zeros(len(_as_prompt_list(prompts)), length, self.spec.d_model, device=self.device)
        for i, ctx in enumerate(self.encode(prompts)):
            out[i, : ctx.shape[0]] = ctx  # (L_i, d_model)
        return out


def _as_prompt_list(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r:.80}")
    return prompts


# ---------------------------------------------------------------------------------------------- loading


def infer_text_encoder_spec(state_dict: Mapping[str, Tensor]) -> UMT5EncoderSpec:
    """Architecture from checkpoint shapes (heads from relative_attention_bias, d_kv from q.weight / heads).

    Raises ``ValueError`` naming the missing key when the state dict is not a umT5 encoder.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"text encoder checkpoint: key {key!r} missing; expected transformers/ComfyUI umT5 "
                             f"names (shared.weight, encoder.block.N...), got e.g. {list(state_dict)[:4]}")
        return tuple(state_dict[key].shape)

    att, ff = "encoder.block.0.layer.0.SelfAttention", "encoder.block.0.layer.1.DenseReluDense"
    vocab, d_model = shape("shared.weight")
    buckets, heads = shape(f"{att}.relative_attention_bias.weight")
    gated = f"{ff}.wi_0.weight" in state_dict
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return UMT5EncoderSpec(
        vocab_size=vocab, d_model=d_model, d_ff=shape(f"{ff}.wi_0.weight" if gated else f"{ff}.wi.weight")[0],
        num_heads=heads, d_kv=shape(f"{att}.q.weight")[0] // heads, num_layers=max(blocks) + 1,
        relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu")


_WAN_T5_RENAMES = (  # Wan's own umT5 module names -> transformers / ComfyUI names (per block)
    ("attn.q.", "layer.0.SelfAttention.q."), ("attn.k.", "layer.0.SelfAttention.k."),
    ("attn.v.", "layer.0.SelfAttention.v."), ("attn.o.", "layer.0.SelfAttention.o."),
    ("pos_embedding.embedding.", "layer.0.SelfAttention.relative_attention_bias."),
    ("norm1.", "layer.0.layer_norm."), ("norm2.", "layer.1.layer_norm."),
    ("ffn.gate.0.", "layer.1.DenseReluDense.wi_0."),  # gelu(gate(x)) * fc1(x) == gelu(wi_0 x) * wi_1 x
    ("ffn.fc1.", "layer.1.DenseReluDense.wi_1."), ("ffn.fc2.", "layer.1.DenseReluDense.wo."),
)


def convert_wan_t5_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Upstream Wan ``models_t5_umt5-xxl-enc-*.pth`` keys -> transformers/ComfyUI umT5 keys (tensors shared).

    ``token_embedding`` -> ``shared``, ``blocks.N.*`` -> ``encoder.block.N.layer.{0,1}.*``, ``norm`` ->
    ``encoder.final_layer_norm``. Keys already in transformers layout pass through unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            key = "shared.weight"
        elif key == "norm.weight":
            key = "encoder.final_layer_norm.weight"
        elif m := re.match(r"blocks\.(\d+)\.(.+)$", key):
            rest = m.group(2)
            for old, new in _WAN_T5_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            key = f"encoder.block.{m.group(1)}.{rest}"
        out[key] = value
    return out


def _read_checkpoint(source: str | os.PathLike | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """Stored weights (memory-mapped where the format allows: nothing is read yet) and the embedded tokenizer."""
    if isinstance(source, Mapping):
        return {k: v for k, v in source.items() if k != SPIECE_KEY}, source.get(SPIECE_KEY)
    weights = read_state_dict(source)  # .safetensors (mapped) or e.g. Wan's .pth (weights_only, memory-mapped)
    return weights, weights.pop(SPIECE_KEY, None)


def load_text_encoder(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                      tokenizer: str | os.PathLike | bytes | None = None,
                      dtype: torch.dtype | None = torch.float32,
                      device: torch.device | str = "cpu",
                      compute_dtype: torch.dtype | None = None) -> UMT5TextEncoder:
    """Load a umT5 encoder checkpoint (+ tokenizer) -> ``UMT5TextEncoder``.

    Args:
        path_or_state_dict: ``.safetensors`` file or state dict with transformers/ComfyUI umT5 key names (ComfyUI's
            ``umt5_xxl_fp16.safetensors`` / ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``: fp8 weights with per-layer
            ``scale_weight`` and a ``scaled_fp8`` marker), or upstream Wan's ``models_t5_umt5-xxl-enc-bf16.pth``
            (converted by ``convert_wan_t5_state_dict``).
        tokenizer: None -> the checkpoint's embedded ``spiece_model``; else a ``.model`` file, a folder holding
            ``spiece.model``, or serialized sentencepiece bytes.
        dtype: weight dtype; each tensor is converted on its own while loading. None keeps the stored dtype
            (bf16 stays bf16, fp8 stays fp8: a 5.7 B encoder in fp8 holds ~5.7 GB). fp32 / fp16 / bf16
            dequantize fp8 weights; an fp8 dtype quantizes the Linear weights (per-tensor scale).
        device: where the weights go.
        compute_dtype: activation dtype; None: the weight dtype, or for fp8 weights bf16 on CUDA / fp32 elsewhere.
    The network is built on the meta device and the weights assigned, so they are never held twice.
    Raises ``ValueError`` listing missing/unexpected keys, a scaled-fp8 weight without its scale, or when no
    tokenizer is found.
    """
    weights, embedded = _read_checkpoint(path_or_state_dict)
    if "token_embedding.weight" in weights:  # upstream Wan layout
        weights = convert_wan_t5_state_dict(weights)
    weights.pop(EMBED_TOKENS_KEY, None)  # tied to shared.weight in transformers' UMT5
    with errors_name_file(path_or_state_dict):
        spec = infer_text_encoder_spec(weights)
    if tokenizer is None and embedded is None:
        raise ValueError("tokenizer: the text encoder checkpoint has no embedded 'spiece_model'; pass tokenizer= "
                         "a spiece.model file or its folder (e.g. from google/umt5-xxl)")
    sp = load_tokenizer(tokenizer if tokenizer is not None else embedded)
    stored = detect_fp8_format(weights)
    plan = plan_load(stored, dtype, compute_dtype, device)
    from transformers import UMT5EncoderModel

    from phantom_core.wan.umt5_fp8 import use_cast_layers

    with torch.device("meta"):
        model = UMT5EncoderModel(spec.to_hf_config())
    if plan.cast_ops:
        use_cast_layers(model, fp8_ops(plan.compute_dtype))
    scales = convert_state_dict(weights, cast_layer_weights(model), plan, device)  # tensor by tensor
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if k != EMBED_TOKENS_KEY]
    if missing or unexpected:
        raise ValueError(f"text encoder checkpoint does not match umT5 {spec}: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    attach_scales(model, scales)
    model.set_input_embeddings(model.shared)  # re-tie encoder.embed_tokens to the assigned shared.weight
    logger.info("loaded umT5 text encoder: %d layers, d_model %d, stored %s%s, weights %s, compute %s on %s",
                spec.num_layers, spec.d_model, stored.stored_dtype, " (scaled)" if stored.scaled else "",
                plan.weight_dtype, plan.compute_dtype, device)
    return UMT5TextEncoder(model, sp, spec)


def write_text_encoder_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, Tensor],
                                  spiece_bytes: bytes | None = None) -> Path:
    """Write weights (+ the sentencepiece model under ``spiece_model``) to ``path`` atomically (`atomic_write`)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k != EMBED_TOKENS_KEY}
    if spiece_bytes is not None:
        tensors[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return path
