"""Fixtures of the embedded tiny umT5: its sentencepiece tokenizer (trained on our own corpus) and random weights.

The tokenizer covers the corpus below, Wan's default negative prompt and, through byte fallback, any other text;
the weights use transformers' T5 init from a seed. ``phantom_core.tiny.default`` writes them as the demo's text
encoder; the tests build their tiny checkpoints from them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
from phantom_core.wan.umt5 import EMBED_TOKENS_KEY, EOS_ID, PAD_ID, UNK_ID, UMT5EncoderSpec

TINY_CORPUS: tuple[str, ...] = (  # our own sentences: people, animals, objects, scenes (+ Chinese)
    "A young woman in a red raincoat walks her dog along a wet city street at night.",
    "An old fisherman repairs a torn net on a wooden pier while seagulls circle overhead.",
    "Two children build a sandcastle on a sunny beach, laughing as the waves roll in.",
    "A ginger cat naps on a windowsill next to a pot of basil, its tail twitching slowly.",
    "The camera slowly pans across a misty pine forest at dawn, sunlight breaking through.",
    "A man in a grey suit checks his watch and hurries across a crowded train platform.",
    "A golden retriever catches a frisbee in mid air above a green park lawn.",
    "A chef tosses vegetables in a flaming wok in a busy restaurant kitchen.",
    "A ceramic teapot pours steaming green tea into a small white cup on a bamboo tray.",
    "A girl with curly hair plays the violin on a balcony overlooking the harbour.",
    "A brown horse gallops through a snowy field, breath steaming in the cold air.",
    "A vintage blue bicycle leans against a brick wall covered in ivy.",
    "An astronaut floats inside a space station, turning a bright orange pen in her fingers.",
    "A toddler stacks wooden blocks into a tall tower and claps when it falls down.",
    "Rain drips from the leaves of a tropical plant in a glass greenhouse.",
    "A skateboarder performs a kickflip in an empty concrete skate park at sunset.",
    "An elderly couple dances slowly in their kitchen to music from an old radio.",
    "A parrot with bright green and yellow feathers cracks a seed on a wooden perch.",
    "A red sports car drives along a winding coastal road beside tall cliffs.",
    "A barista draws a leaf pattern in the milk foam of a latte, close-up shot.",
    "A small robot toy with round eyes rolls across a desk covered in papers.",
    "Snow falls quietly on a mountain village as lights glow in the cabin windows.",
    "A woman wearing sunglasses and a straw hat reads a book in a hammock.",
    "A panda chews bamboo shoots while sitting in a shady grove, looking at the camera.",
    "A boy in a yellow jacket flies a kite shaped like a dragon on a windy hill.",
    "Close-up of a leather handbag with brass buckles resting on a marble table.",
    "A soldier in uniform salutes as the flag is raised over the old fortress.",
    "Fireworks burst over a river while a crowd cheers from the bridge.",
    "A doctor in a white coat smiles and hands a teddy bear to a little patient.",
    "A rabbit hops through tall grass and stops to sniff a wild strawberry.",
    "A dancer in a flowing blue dress spins on a stage under a single spotlight.",
    "Sharp focus, high quality, natural lighting, smooth camera motion, 4K, realistic details.",
    "Vivid colors, overexposed, static, blurry details, subtitles, worst quality, low quality, JPEG artifacts.",
    "ugly, deformed, extra fingers, poorly drawn hands, poorly drawn face, fused fingers, three legs.",
    "The 3 friends met at 10:45 on Monday; it cost $12.50 (plus tax) & took 20% longer!",
    "一位穿着白色连衣裙的女孩在花园里微笑着跳舞，阳光洒在她的头发上。",
    "一只小狗在草地上追逐红色的皮球，背景是蓝天和白云。",
    "一个男人坐在咖啡馆里看书，窗外下着小雨，镜头缓慢推进。",
    "两只猫咪穿着拳击装备在舞台上打斗，灯光明亮，画面清晰。",
    WAN_NEGATIVE_PROMPT,
    WAN_NEGATIVE_PROMPT.replace("，", ","),  # the same after ftfy's fullwidth -> ASCII punctuation
)


def train_tiny_tokenizer(corpus_lines: Sequence[str] = TINY_CORPUS, vocab_size: int = 512,
                         model_prefix: str | os.PathLike | None = None) -> bytes:
    """Train a small sentencepiece unigram model with umT5's special ids -> serialized model bytes.

    pad 0, eos 1, unk 2, no bos (as google/umt5-xxl); byte fallback so no prompt ever maps to ``<unk>``;
    every corpus character covered. Single-threaded, hence deterministic. With ``model_prefix`` the model is
    also written to ``<model_prefix>.model``.
    """
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus_lines)), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, byte_fallback=True, hard_vocab_limit=True,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, num_threads=1, minloglevel=2)
    data = buffer.getvalue()
    if model_prefix is not None:
        Path(f"{model_prefix}.model").write_bytes(data)
    return data


def random_text_encoder_state_dict(spec: UMT5EncoderSpec, seed: int = 0) -> dict[str, Tensor]:
    """Random (transformers' T5 init) float32 weights for ``spec``, deterministic in ``seed``; for tests/demos."""
    from transformers import UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(spec.to_hf_config())
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != EMBED_TOKENS_KEY}
