"""The rephraser's local back-end: a transformers vision-language instruct checkpoint in a folder.

`LocalVLMBackend` implements `rephrase_types.ChatBackend` for e.g. Qwen2.5-VL-3B-Instruct under ComfyUI's
`models/LLM`: loaded once through `AutoModelForImageTextToText` / `AutoProcessor` and kept in `_LOADED` (at
most one model resident; `unload_local_models` drops it); on the GPU when there is one; greedy decoding unless
`temperature > 0` (then sampling seeded by `seed`, with the caller's RNG state left alone).

After each rephrase (`release`) the model is moved to the CPU (`after_use="offload"`, the default), dropped
(`"unload"`) or left on its device (`"keep"`). The host may pass `free_memory(bytes_needed, device)` /
`after_offload()` callbacks so that its own memory manager makes room before the model goes to the GPU
(weights * `ACTIVATION_MARGIN` + 512 MiB) and reclaims the memory afterwards. Every library failure (loading,
chat template, processor, generation, out of memory) becomes a `RephraseError` naming the back-end and the stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from phantom_core.log import logger
from phantom_core.rephrase.types import RephraseError, UnusableAnswer

AFTER_USE = ("offload", "unload", "keep")


@dataclass(frozen=True)
class LocalConfig:
    """A local transformers vision-language model folder (config.json, weights, processor files)."""

    path: str
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy decoding
    seed: int = 0  # used only when sampling (temperature > 0)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = bf16 on a GPU that supports it, else fp32; or fp32 | fp16 | bf16
    after_use: str = "offload"  # after each rephrase: "offload" to the CPU | "unload" | "keep" on the device


@dataclass
class _Resident:
    """A cached model: `placed` is True while it sits on its target device (False: offloaded to the CPU)."""

    model: Any
    processor: Any
    placed: bool = False


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LOADED: dict[tuple[str, str, str], _Resident] = {}
ACTIVATION_MARGIN = 1.25  # bytes asked of the host to free = weights * margin + 512 MiB (activations, KV cache)


def unload_local_models() -> None:
    """Drop the cached local model(s) (they are reloaded on the next use)."""
    _LOADED.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LocalVLMBackend:
    """`free_memory(bytes_needed, device)`: called before the model is put on its device (host memory manager);
    `after_offload()`: called after it left the device (default: `torch.cuda.empty_cache()` on a GPU)."""

    def __init__(self, config: LocalConfig, *, free_memory: Callable[[int, str], None] | None = None,
                 after_offload: Callable[[], None] | None = None):
        path = Path(config.path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"local model folder {str(path)!r} has no config.json; give a transformers "
                             "vision-language model folder (e.g. Qwen2.5-VL-3B-Instruct)")
        if config.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"local dtype is {config.dtype!r}; valid: auto, {', '.join(_DTYPES)}")
        if config.after_use not in AFTER_USE:
            raise ValueError(f"local after_use is {config.after_use!r}; valid: {', '.join(AFTER_USE)}")
        self.config, self.path = config, path.resolve()
        self.free_memory, self.after_offload = free_memory, after_offload
        self.label = f"local model {path.name!r}"
        self.device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    def settings(self) -> dict[str, Any]:
        cfg = asdict(self.config) | {"path": str(self.path)}
        cfg.pop("after_use")  # where the model waits between calls does not change the answer
        mtime = (self.path / "config.json").stat().st_mtime  # a replaced model folder invalidates the cache
        return {"backend": "local", **cfg, "config_mtime": mtime}

    def chat(self, messages: list[dict], deadline: float | None = None) -> str:
        model, processor = self._load()
        images = [c["image"] for m in messages if isinstance(m["content"], list)
                  for c in m["content"] if c["type"] == "image"]
        chat = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                if isinstance(m["content"], str)
                else {"role": m["role"], "content": [{"type": c["type"]} if c["type"] == "image" else c
                                                     for c in m["content"]]} for m in messages]
        stage = "applying the chat template"
        try:
            text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            stage = "preparing the inputs with the processor"
            inputs = processor(text=[text], images=images, return_tensors="pt").to(model.device)
            stage = "generating"
            return self._generate(model, processor, inputs, deadline)
        except (RephraseError, UnusableAnswer):
            raise
        except torch.cuda.OutOfMemoryError as err:
            raise RephraseError(f"{self.label}: out of GPU memory while {stage} ({err})") from err
        except Exception as err:  # noqa: BLE001 (any library failure becomes an error naming the back-end)
            raise RephraseError(f"{self.label}: failed while {stage}: {type(err).__name__}: {err}") from err

    def release(self) -> None:
        """After a rephrase: offload the model to the CPU, unload it, or keep it (`LocalConfig.after_use`)."""
        resident = _LOADED.get(self._key())
        if resident is None or self.config.after_use == "keep":
            return
        if self.config.after_use == "unload":
            _LOADED.pop(self._key())
            logger.info("rephraser: unloaded %s", self.label)
        elif resident.placed:
            if self.device != "cpu":
                resident.model.to("cpu")
                logger.info("rephraser: moved %s to the CPU (after_use=offload)", self.label)
            resident.placed = False
        else:
            return
        if self.after_offload is not None:
            self.after_offload()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, model, processor, inputs, deadline: float | None) -> str:
        cfg = self.config
        sample = cfg.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": cfg.max_new_tokens}
        kwargs |= {"temperature": cfg.temperature} if sample else {"temperature": None, "top_p": None, "top_k": None}
        if deadline is not None:  # generation stops there; a cut answer is then reported as unusable
            kwargs["max_time"] = deadline - time.monotonic()
            if kwargs["max_time"] <= 0:
                raise RephraseError(f"{self.label}: the overall time limit ran out before generating")
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # leave the caller's RNG alone
            torch.manual_seed(cfg.seed)
            out = model.generate(**inputs, **kwargs)  # (1, L_in + L_new) token ids
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        logger.info("rephraser: %s generated %d tokens", self.label, new_tokens.shape[1])
        return processor.batch_decode(new_tokens, skip_special_tokens=True)[0]

    def _key(self) -> tuple[str, str, str]:
        return str(self.path), self.device, self.config.dtype

    def _load(self) -> tuple[Any, Any]:
        key = self._key()
        if key not in _LOADED:
            unload_local_models()  # keep at most one rephraser model resident
            _LOADED[key] = _Resident(*self._load_uncached())
        resident = _LOADED[key]
        if not resident.placed:
            self._place(resident.model)
            resident.placed = True
        return resident.model, resident.processor

    def _place(self, model) -> None:
        """Move `model` (on the CPU) to `self.device`, asking the host to make room first."""
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        if self.free_memory is not None:
            self.free_memory(int(weights * ACTIVATION_MARGIN) + (512 << 20), self.device)
        try:
            model.to(self.device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            unload_local_models()  # drop it (with whatever part reached the GPU) rather than keep half of it there
            raise RephraseError(f"{self.label}: cannot move the model ({weights / 2**30:.2f} GiB) to {self.device}: "
                                f"{type(err).__name__}: {err}; free GPU memory or use a smaller model") from err

    def _load_uncached(self) -> tuple[Any, Any]:
        """(model on the CPU in eval mode, processor). Raises RephraseError naming the back-end and the fault."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        dtype = _DTYPES.get(self.config.dtype)
        if dtype is None:
            cuda = self.device.startswith("cuda")
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        logger.info("rephraser: loading %s from %s for %s (%s)", self.label, self.path, self.device, dtype)
        try:
            kind = AutoConfig.from_pretrained(self.path).model_type
        except (OSError, ValueError) as err:
            raise RephraseError(f"{self.label}: cannot read {self.path}/config.json ({err})") from err
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype)
        except ValueError as err:
            raise RephraseError(f"{self.label}: {self.path} holds a {kind!r} model, which is not a vision-language "
                                "(image-text-to-text) model; use e.g. Qwen2.5-VL-3B-Instruct") from err
        except Exception as err:  # noqa: BLE001 (missing / corrupt weights, missing packages, ...)
            raise RephraseError(f"{self.label}: cannot load the weights in {self.path} "
                                f"({type(err).__name__}: {err})") from err
        try:
            processor = AutoProcessor.from_pretrained(self.path)
        except Exception as err:  # noqa: BLE001
            raise RephraseError(f"{self.label}: cannot load the processor in {self.path} "
                                f"({type(err).__name__}: {err})") from err
        if getattr(processor, "image_processor", None) is None or not getattr(processor, "chat_template", None):
            raise RephraseError(f"{self.label}: the processor in {self.path} has no image processor or no chat "
                                "template; an instruct vision-language checkpoint is needed")
        return model.eval(), processor
