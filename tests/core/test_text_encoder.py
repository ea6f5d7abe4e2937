"""umT5 text encoder: tokenization as upstream Wan, output layout, checkpoint round trip, parity with ComfyUI."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
from phantom_core.tiny.text import random_text_encoder_state_dict, train_tiny_tokenizer
from phantom_core.wan.dit import TEXT_LEN
from phantom_core.wan.umt5 import (
    EOS_ID,
    PAD_ID,
    SPIECE_KEY,
    TEXT_ENCODER_PRESETS,
    UNK_ID,
    clean_prompt,
    infer_text_encoder_spec,
    load_text_encoder,
    load_tokenizer,
    write_text_encoder_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = TEXT_ENCODER_PRESETS["tiny"]
PROMPTS = [
    "A ginger cat sleeps on a sunny windowsill.",
    "Two children fly a dragon kite on a windy hill, the camera slowly pans.",
    "一只小狗在草地上追逐红色的皮球",
]


@pytest.fixture(scope="module")
def spiece() -> bytes:
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return random_text_encoder_state_dict(TINY, seed=1)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, weights, spiece):
    path = write_text_encoder_checkpoint(tmp_path_factory.mktemp("te") / "umt5_tiny.safetensors", weights, spiece)
    return load_text_encoder(path)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_has_umt5_special_ids_and_covers_the_negative_prompt(spiece):
    sp = load_tokenizer(spiece)
    assert sp.get_piece_size() == TINY.vocab_size
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD_ID, EOS_ID, UNK_ID, -1)
    assert sp.id_to_piece(EOS_ID) == "</s>"
    ids = sp.encode(WAN_NEGATIVE_PROMPT)
    assert UNK_ID not in ids and len(ids) > 20
    assert train_tiny_tokenizer() == spiece  # deterministic


def test_tokenizer_sources(tmp_path, spiece):
    (tmp_path / "spiece.model").write_bytes(spiece)
    from_dir, from_file = load_tokenizer(tmp_path), load_tokenizer(tmp_path / "spiece.model")
    from_tensor = load_tokenizer(torch.frombuffer(bytearray(spiece), dtype=torch.uint8))
    text = "A horse gallops through snow."
    assert from_dir.encode(text) == from_file.encode(text) == from_tensor.encode(text)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_tokenizer(tmp_path / "nowhere")


def test_tokenize_appends_eos_and_cleans_whitespace(encoder):
    [ids] = encoder.tokenize(["A cat sits on a mat."])
    assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
    assert encoder.tokenizer.encode("A cat sits on a mat.") == ids[:-1]
    messy = encoder.tokenize(["  A cat \n\t sits   on a mat.  "])
    assert messy == [ids]
    assert clean_prompt("a &amp;amp; b\n\n c ") == "a & b c"  # HTML unescaped twice, whitespace collapsed


def test_tokenize_truncates_to_512_keeping_eos(encoder, caplog):
    long_prompt = " ".join(["A brown horse gallops through a snowy field."] * 200)
    with caplog.at_level(logging.WARNING, logger="phantom"):
        [ids] = encoder.tokenize([long_prompt])
    assert len(ids) == TEXT_LEN and ids[-1] == EOS_ID
    assert ids[:-1] == encoder.tokenizer.encode(long_prompt)[: TEXT_LEN - 1]
    assert any("truncated" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------- model


def test_spec_inference_and_presets(weights):
    assert infer_text_encoder_spec(weights) == TINY
    cfg = json.loads((ROOT / ".comfyui/comfy/text_encoders/umt5_config_xxl.json").read_text())
    xxl = TEXT_ENCODER_PRESETS["umt5-xxl"]
    for field in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size"):
        assert getattr(xxl, field) == cfg[field], field
    assert xxl.relative_attention_num_buckets == cfg["relative_attention_num_buckets"]
    assert xxl.to_hf_config().is_gated_act and cfg["is_gated_act"] and not cfg["tie_word_embeddings"]
    bigger = random_text_encoder_state_dict(dataclasses.replace(TINY, num_layers=3))
    assert infer_text_encoder_spec(bigger).num_layers == 3


def test_encode_shapes_trimming_and_padding(encoder):
    ids = encoder.tokenize(PROMPTS)
    out = encoder.encode(PROMPTS)
    assert [tuple(o.shape) for o in out] == [(len(x), TINY.d_model) for x in ids]
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)
    padded = encoder.encode_padded(PROMPTS)
    assert padded.shape == (len(PROMPTS), TEXT_LEN, TINY.d_model)
    for i, o in enumerate(out):
        torch.testing.assert_close(padded[i, : len(ids[i])], o)
        assert padded[i, len(ids[i]):].abs().max() == 0
        assert padded[i, len(ids[i]) - 1].abs().max() > 0  # </s> is a real, non-zero token


def test_encode_is_deterministic_and_batch_independent(encoder):
    a, b = encoder.encode(PROMPTS), encoder.encode(PROMPTS)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    singles = [encoder.encode([p])[0] for p in PROMPTS]
    for x, y in zip(a, singles):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0][:3], a[1][:3])  # different prompts, different context


def test_checkpoint_round_trip_dtype_and_errors(tmp_path, weights, spiece):
    half = {k: v.half() for k, v in weights.items()}
    path = write_text_encoder_checkpoint(tmp_path / "te.safetensors", half, spiece)
    assert not list(tmp_path.glob("*.tmp"))
    kept = load_text_encoder(path, dtype=None)
    assert kept.dtype == torch.float16 and kept.model.encoder.embed_tokens.weight is kept.model.shared.weight
    assert load_text_encoder(path).dtype == torch.float32
    from_dict = load_text_encoder(dict(weights), tokenizer=spiece)
    torch.testing.assert_close(from_dict.encode(PROMPTS[:1])[0], kept.encode(PROMPTS[:1])[0], rtol=1e-2, atol=1e-2)
    no_tok = write_text_encoder_checkpoint(tmp_path / "no_tok.safetensors", weights)
    with pytest.raises(ValueError, match="spiece_model"):
        load_text_encoder(no_tok)
    (tmp_path / "spiece.model").write_bytes(spiece)
    assert load_text_encoder(no_tok, tokenizer=tmp_path).tokenize(["a"]) == kept.tokenize(["a"])
    broken = {k: v for k, v in weights.items() if "final_layer_norm" not in k}
    with pytest.raises(ValueError, match="missing.*final_layer_norm"):
        load_text_encoder(broken, tokenizer=spiece)
    with pytest.raises(ValueError, match="shared.weight"):
        load_text_encoder({"foo": torch.zeros(2)}, tokenizer=spiece)


def wan_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under upstream Wan's T5Encoder names (written out by hand from wan/modules/t5.py)."""
    out = {"token_embedding.weight": weights["shared.weight"], "norm.weight": weights["encoder.final_layer_norm.weight"]}
    for i in range(TINY.num_layers):
        hf, wan = f"encoder.block.{i}.layer", f"blocks.{i}"
        for name in "qkvo":
            out[f"{wan}.attn.{name}.weight"] = weights[f"{hf}.0.SelfAttention.{name}.weight"]
        out[f"{wan}.pos_embedding.embedding.weight"] = weights[f"{hf}.0.SelfAttention.relative_attention_bias.weight"]
        out[f"{wan}.norm1.weight"] = weights[f"{hf}.0.layer_norm.weight"]
        out[f"{wan}.norm2.weight"] = weights[f"{hf}.1.layer_norm.weight"]
        out[f"{wan}.ffn.gate.0.weight"] = weights[f"{hf}.1.DenseReluDense.wi_0.weight"]
        out[f"{wan}.ffn.fc1.weight"] = weights[f"{hf}.1.DenseReluDense.wi_1.weight"]
        out[f"{wan}.ffn.fc2.weight"] = weights[f"{hf}.1.DenseReluDense.wo.weight"]
    assert len(out) == len(weights)
    return out


def test_upstream_wan_pth_layout_loads_to_the_same_encoder(tmp_path, encoder, weights, spiece):
    torch.save(wan_layout(weights), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece)
    wan = load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tokenizer=tmp_path / "google" / "umt5-xxl")
    for x, y in zip(wan.encode(PROMPTS), encoder.encode(PROMPTS)):
        # same maths, other memory layout: CPU kernels promise no bitwise equality there
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ComfyUI parity


def test_token_ids_match_comfyui_spiece_tokenizer(comfy_import, encoder, spiece):
    spt = comfy_import("comfy.text_encoders.spiece_tokenizer")
    wan = comfy_import("comfy.text_encoders.wan")
    theirs = spt.SPieceTokenizer(spiece)  # adds </s> itself (add_eos=True)
    ours = encoder.tokenize(PROMPTS + [WAN_NEGATIVE_PROMPT])
    for prompt, ids in zip(PROMPTS + [WAN_NEGATIVE_PROMPT], ours):
        assert theirs(clean_prompt(prompt))["input_ids"] == ids
    # the full ComfyUI Wan tokenizer (embedded spiece_model, padded to 512 with id 0)
    tok = wan.UMT5XXlTokenizer(tokenizer_data={SPIECE_KEY: torch.frombuffer(bytearray(spiece), dtype=torch.uint8)})
    [batch] = tok.tokenize_with_weights(PROMPTS[1])
    comfy_ids = [t[0] for t in batch]
    assert len(comfy_ids) == TEXT_LEN
    assert comfy_ids[: len(ours[1])] == ours[1] and set(comfy_ids[len(ours[1]):]) == {PAD_ID}


def test_embeddings_match_comfyui_umt5(comfy_import, encoder, weights):
    sd1_clip = comfy_import("comfy.sd1_clip")
    t5 = comfy_import("comfy.text_encoders.t5")
    config = json.loads((ROOT / ".comfyui/comfy/text_encoders/umt5_config_xxl.json").read_text())
    config.update({k: getattr(TINY, k) for k in ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers")})
    # as comfy.text_encoders.wan.UMT5XXlModel builds it, with a tiny config dict
    theirs = sd1_clip.SDClipModel(device="cpu", textmodel_json_config=config, dtype=torch.float32,
                                  special_tokens={"end": 1, "pad": 0}, model_class=t5.T5,
                                  enable_attention_masks=True, zero_out_masked=True)
    missing, unexpected = theirs.load_sd(weights)
    assert not missing and not unexpected
    ids = encoder.tokenize(PROMPTS)
    tokens = [x + [PAD_ID] * (TEXT_LEN - len(x)) for x in ids]
    with torch.no_grad():
        ref = theirs(tokens)[0]  # (B, 512, d_model), masked positions zeroed
    ours = encoder.encode_padded(PROMPTS)
    assert ref.shape == ours.shape
    rel = (ours - ref).norm() / ref.norm()
    print(f"umT5 parity vs ComfyUI: relative difference {rel:.2e}")
    assert rel < 1e-4, f"relative difference {rel:.2e}"
