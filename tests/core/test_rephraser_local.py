"""The local back-end end to end with a tiny random-weight Qwen2-VL that transformers builds at test time.

The folder is written with `save_pretrained` (config, weights, byte-level tokenizer, image processor, chat
template) and loaded back through `AutoModelForImageTextToText` / `AutoProcessor`, exactly as a user's
`models/LLM/<name>` folder. Its text is nonsense, so strict mode must surface the documented "unusable answer
after 2 attempts" error with the raw text, and lenient mode must return that text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phantom_core.__main__ import main as cli_main
from phantom_core.rephrase import local as rephrase_local
from phantom_core.rephrase.backends import make_backend
from phantom_core.rephrase.cache import RephraseCache
from phantom_core.rephrase.local import LocalConfig, LocalVLMBackend
from phantom_core.rephrase.rephraser import Rephraser
from phantom_core.rephrase.types import RephraseError
from tests.support.tiny_vlm import build_text_only_model, build_tiny_vlm

STRICT_ERRORS: list[str] = []  # the strict test's error, compared with the lenient test's text (same inputs)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("llm") / "tiny-qwen2-vl")


@pytest.fixture
def generate_calls(monkeypatch):
    """Records the kwargs of every `model.generate` call made by the local back-end."""
    calls: list[dict] = []
    original = rephrase_local.LocalVLMBackend._generate

    def spy(self, model, processor, inputs, deadline):
        calls.append({k: v for k, v in inputs.items()})
        return original(self, model, processor, inputs, deadline)

    monkeypatch.setattr(rephrase_local.LocalVLMBackend, "_generate", spy)
    return calls


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (70 + 10 * k, 60, 3), dtype=np.uint8)) for k in range(n)]


def test_local_strict_reports_the_nonsense_answer_after_one_retry(tiny_vlm, generate_calls):
    backend = make_backend("local", local_path=str(tiny_vlm), max_new_tokens=16)
    with pytest.raises(RephraseError, match=r"local model 'tiny-qwen2-vl': unusable answer after 2 attempts "
                                            r"\(.*\); raw answer: '.+'") as info:
        Rephraser(backend, cache=RephraseCache()).rephrase("a man walks a dog", images(2), hints=["", "red"])
    assert len(generate_calls) == 2  # one retry, with the corrective turn appended
    first, second = generate_calls
    assert first["image_grid_thw"].shape == (2, 3)  # both references reached the vision tower
    assert first["pixel_values"].shape[0] == int(first["image_grid_thw"].prod(-1).sum())
    assert second["input_ids"].shape[1] > first["input_ids"].shape[1] + 16
    STRICT_ERRORS.append(str(info.value))


def test_local_lenient_path_text_cache_and_single_load(tiny_vlm, generate_calls):
    backend = LocalVLMBackend(LocalConfig(str(tiny_vlm), max_new_tokens=16))
    cache = RephraseCache()
    refs = images(2)
    first = Rephraser(backend, cache=cache, strict=False).rephrase("a man walks a dog", refs, hints=["", "red"])
    assert not first.validated and first.prompt.strip() and first.prompt == first.raw.strip()
    assert first.descriptions == ("", "") and first.language == "en"
    assert len(generate_calls) == 2 and len(rephrase_local._LOADED) == 1
    # greedy decoding is deterministic: the same nonsense as the strict test's error (another backend object)
    assert all(f"raw answer: {first.raw!r}" in err for err in STRICT_ERRORS)
    model = next(iter(rephrase_local._LOADED.values())).model

    again = Rephraser(LocalVLMBackend(LocalConfig(str(tiny_vlm), max_new_tokens=16)), cache=cache,
                      strict=False).rephrase("a man walks a dog", refs, hints=["", "red"])
    assert again.cached and again.prompt == first.prompt and len(generate_calls) == 2  # no model call
    assert next(iter(rephrase_local._LOADED.values())).model is model  # loaded once

    sampled = LocalVLMBackend(LocalConfig(str(tiny_vlm), max_new_tokens=8, temperature=1.0, seed=3))
    messages = [{"role": "user", "content": [{"type": "image", "image": refs[0]}, {"type": "text", "text": "hi"}]}]
    state = torch.random.get_rng_state()
    assert sampled.chat(messages) == sampled.chat(messages)  # the seed fixes sampling ...
    assert torch.equal(torch.random.get_rng_state(), state)  # ... without touching the caller's RNG


def test_local_model_leaves_the_device_after_each_rephrase(tiny_vlm, generate_calls):
    """after_use: offload (default) asks the host to free memory before every placement and hands the memory
    back after every rephrase (both attempts share one placement); keep stays; unload drops the model."""
    events: list = []

    def backend(after_use: str, tokens: int) -> LocalVLMBackend:
        return LocalVLMBackend(LocalConfig(str(tiny_vlm), max_new_tokens=tokens, after_use=after_use),
                               free_memory=lambda n, device: events.append(("free", n, device)),
                               after_offload=lambda: events.append(("offloaded",)))

    rephrase_local.unload_local_models()
    refs, shared = images(1), RephraseCache()
    Rephraser(backend("offload", 16), cache=shared, strict=False).rephrase("a dog", refs)
    weights = sum(p.numel() * p.element_size() for p in next(iter(rephrase_local._LOADED.values())).model
                  .parameters())
    assert [e[0] for e in events] == ["free", "offloaded"] and len(generate_calls) == 2
    assert events[0][1] >= weights and events[0][2] == "cpu"  # bytes asked for cover the weights
    assert not next(iter(rephrase_local._LOADED.values())).placed
    events.clear()
    Rephraser(backend("keep", 17), cache=RephraseCache(), strict=False).rephrase("a dog", refs)
    Rephraser(backend("keep", 18), cache=RephraseCache(), strict=False).rephrase("a dog", refs)
    assert [e[0] for e in events] == ["free"]  # placed again once, then kept there
    events.clear()
    Rephraser(backend("unload", 19), cache=RephraseCache(), strict=False).rephrase("a dog", refs)
    assert [e[0] for e in events] == ["offloaded"] and not rephrase_local._LOADED
    assert Rephraser(backend("keep", 16), cache=shared, strict=False).rephrase("a dog", refs).cached
    assert len(generate_calls) == 8 and not rephrase_local._LOADED  # after_use is not part of the cache key


def test_local_library_failures_name_the_backend(tiny_vlm, monkeypatch):
    backend = LocalVLMBackend(LocalConfig(str(tiny_vlm), max_new_tokens=16))
    messages = [{"role": "user", "content": [{"type": "image", "image": images(1)[0]}, {"type": "text", "text": "x"}]}]
    processor = backend._load()[1]

    def boom(*args, **kwargs):
        raise KeyError("template variable missing")

    monkeypatch.setattr(type(processor), "apply_chat_template", boom)
    with pytest.raises(RephraseError, match=r"local model 'tiny-qwen2-vl': failed while applying the chat template: "
                                            r"KeyError"):
        backend.chat(messages)
    monkeypatch.undo()
    model = backend._load()[0]
    monkeypatch.setattr(type(model), "generate", boom)
    with pytest.raises(RephraseError, match="local model 'tiny-qwen2-vl': failed while generating: KeyError"):
        backend.chat(messages)
    monkeypatch.undo()
    rephrase_local.unload_local_models()

    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(type(model), "to", oom)
    with pytest.raises(RephraseError, match=r"local model 'tiny-qwen2-vl': cannot move the model \(.* GiB\) to cpu: "
                                            r"OutOfMemoryError: CUDA out of memory"):
        backend.chat(messages)


def test_local_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        make_backend("local", local_path=str(tmp_path))
    backend = make_backend("local", local_path=str(build_text_only_model(tmp_path / "text-only")))
    with pytest.raises(RephraseError, match=r"local model 'text-only': .* holds a 'qwen2' model, which is not a "
                                            r"vision-language"):
        Rephraser(backend, cache=RephraseCache()).rephrase("a dog", images(1))


def test_cli_local(tiny_vlm, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    images(1)[0].save(ref)
    args = ["rephrase", "--ref", str(ref), "--prompt", "a dog runs", "--local", str(tiny_vlm), "--max-new-tokens",
            "16", "--cache-dir", str(tmp_path / "cache"), "--lenient", "--json"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] and out["validated"] is False and out["descriptions"] == [""] and not out["cached"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert not rephrase_local._LOADED  # the CLI unloads the model after use (generate needs the GPU next)
    assert cli_main(args[:-1]) == 0  # plain output: just the prompt, from the disk cache
    assert capsys.readouterr().out.strip() == out["prompt"].strip()
