"""Whole Phantom sampling loop, ours against ComfyUI's native pipeline, measured side by side in one run.

ComfyUI side as a user runs Phantom-Wan with stock nodes: the DiT built like ``UNETLoader``, references as the
conditioning's ``time_dim_concat`` (what ``WanPhantomSubjectToVideo`` produces), ``DualCFGGuider`` (three passes:
text + refs, negative text + refs, negative text + zero refs) and ``SamplerCustomAdvanced`` with Euler. Ours:
``sample_phantom`` loaded by ``load_dit`` from the same weights, same noise, sigmas and passes (batched into one
call per step), then with a ``StepCache`` (its evaluations saved are printed; its quality is measured on the trained
default, not here). Both sides run on the same device, dtype and thread count; each is warmed up (``--warmup``
one-step runs), then timed ``--repeat`` times (medians compared); on CUDA each side's peak
``torch.cuda.max_memory_allocated`` over its timed runs is printed (its weights included), and ComfyUI's model is
unloaded before ours is loaded.

    PYTHONPATH=.comfyui .venv/bin/python -m benchmarks.bench_sampling            # the issue's setting (CPU)
    PYTHONPATH=.comfyui .venv/bin/python -m benchmarks.bench_sampling --quick    # a smaller smoke run
    python3 -m benchmarks.bench_sampling --preset phantom-wan-1.3b --size 832x480x81 --refs 4 --device cuda \\
        --dtype bf16 --steps 4 --warmup 1 --repeat 1 --cache-steps 12                 # benchmarks/gpu_check.sh
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.import_standins import install_standins
from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.loop import sample_phantom
from phantom_core.sampling.schedule import flow_sigmas
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT, WanDiTConfig
from phantom_core.wan.latents import denormalize_latents, latent_shape, normalize_latents
from phantom_core.wan.load import load_dit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMFY_OPTIONAL = ("av", "torchsde")  # imported by ComfyUI's modules, unused by Euler sampling (import_standins)


def comfy_sampler(sd: dict, cfg: WanDiTConfig, case: dict, shift: float, w_img: float, w_text: float,
                  device: torch.device, dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    """``run(steps)`` running ComfyUI's native Phantom loop on ``case`` -> normalized latents (CPU, fp32)."""
    for name in install_standins(COMFY_OPTIONAL):
        print(f"note: {name} is not installed; ComfyUI imports it but Euler sampling never calls it (stand-in)")
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    from comfy_extras import nodes_custom_sampler as custom

    unet_config = comfy.model_detection.detect_unet_config(sd, "") | {"text_dim": cfg.text_dim}
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(dict(sd), "", device=torch.device("cpu"))
    model.load_model_weights(dict(sd), "")
    load_device = comfy.model_management.get_torch_device() if device.type != "cpu" else device
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=torch.device("cpu"))
    raw_refs = denormalize_latents(case["refs"])
    zero_refs = comfy.latent_formats.Wan21().process_out(torch.zeros_like(raw_refs))
    cond1 = [[case["context"], {"time_dim_concat": raw_refs}]]
    cond2 = [[case["context_neg"], {"time_dim_concat": raw_refs}]]
    negative = [[case["context_neg"], {"time_dim_concat": zero_refs}]]
    guider = custom.DualCFGGuider.execute(patcher, cond1, cond2, negative, w_text, w_img, "regular")[0]
    sampler = custom.KSamplerSelect.execute("euler")[0]

    def run(steps: int) -> torch.Tensor:
        sigmas = flow_sigmas(steps, shift)

        class GivenNoise:
            seed = 0

            def generate_noise(self, latent: dict) -> torch.Tensor:
                return case["noise"] / sigmas[0]  # ComfyUI multiplies by sigma_0 again

        latent = {"samples": torch.zeros(case["noise"].shape)}
        out = custom.SamplerCustomAdvanced.execute(GivenNoise(), guider, sampler, sigmas, latent)[0]["samples"]
        return normalize_latents(out.float().cpu())

    return run


def release_comfy() -> None:
    """Unload every model ComfyUI holds on the device (its DiT after the native runs)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def measure(fn: Callable[[], torch.Tensor], warmup: Callable[[], object], repeat: int,
            device: torch.device) -> tuple[float, torch.Tensor, int | None]:
    """(median seconds, last output, peak device bytes over the timed runs or None on the CPU)."""
    warmup()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out, (torch.cuda.max_memory_allocated(device) if cuda else None)


def parse_size(text: str) -> tuple[int, int, int]:
    """``"832x480x81"`` -> (width, height, frames); argparse error naming --size otherwise."""
    try:
        w, h, f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size is {text!r}; expected WIDTHxHEIGHTxFRAMES, e.g. 832x480x81") from None
    if w % 16 or h % 16 or (f - 1) % 4:
        raise argparse.ArgumentTypeError(f"--size is {text!r}; width and height must be multiples of 16, frames 4k+1")
    return w, h, f


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="dim 256, 2 blocks, 128x96x9, 4 steps")
    p.add_argument("--preset", choices=sorted(DIT_PRESETS), help="a DiT preset's shapes (random weights)")
    p.add_argument("--size", type=parse_size, help="WIDTHxHEIGHTxFRAMES (default 256x160x17, --quick 128x96x9)")
    p.add_argument("--refs", type=int, default=2, help="reference images (1 to 4)")
    p.add_argument("--steps", type=int, help="Euler steps of the timed runs (default 8, --quick 4)")
    p.add_argument("--cache-steps", type=int, help="steps of the StepCache run (default --steps; the cache always "
                                                   "computes its 3 warm-up steps and the last)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0, help="untimed one-step runs per side before timing")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache-threshold", type=float, default=0.1)
    p.add_argument("--trained-default", action="store_true",
                   help="the trained world default on a held-out world case (128x128x17, 50 steps) instead of "
                        "random weights: the cache's saving on a real trajectory")
    return p


def random_case(args: argparse.Namespace) -> tuple[dict, WanDiTConfig, dict, tuple[int, int, int], int, str]:
    """Random weights of the chosen shapes and a random case: ``(sd, cfg, case, (w, h, frames), steps, label)``;
    ``case``: noise, refs, context / context_neg zero-padded to 512 tokens (20 and 30 real ones)."""
    dim, layers, size, steps = (256, 2, (128, 96, 9), 4) if args.quick else (512, 4, (256, 160, 17), 8)
    w, h, frames = args.size or size
    cfg = DIT_PRESETS[args.preset] if args.preset else WanDiTConfig(dim=dim, ffn_dim=4 * dim, num_heads=dim // 128,
                                                                    num_layers=layers, text_dim=4096)
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in PhantomWanDiT(cfg).state_dict().items()}  # random init, fp32, CPU
    g = torch.Generator().manual_seed(1)
    shape = latent_shape(frames, h, w)
    case = {"noise": torch.randn(shape, generator=g), "refs": torch.randn(1, 16, args.refs, *shape[-2:], generator=g)}
    ctx = torch.zeros(2, 512, cfg.text_dim)
    ctx[0, :20], ctx[1, :30] = torch.randn(20, cfg.text_dim, generator=g), torch.randn(30, cfg.text_dim, generator=g)
    case["context"], case["context_neg"], case["lengths"] = ctx[:1], ctx[1:], (20, 30)
    label = f"{args.preset or f'dim {cfg.dim}, {cfg.num_layers} blocks'} (random weights)"
    return sd, cfg, case, (w, h, frames), args.steps or steps, label


def trained_case(args: argparse.Namespace) -> tuple[dict, WanDiTConfig, dict, tuple[int, int, int], int, str]:
    """The trained world default and the first held-out world case (its references through the default's VAE, its
    prompt and Wan's negative prompt through its umT5, zero-padded to 512 tokens), 128x128x17, 50 steps."""
    import tempfile

    from phantom_core.inference.pipeline import load_models
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.loading.files import read_state_dict
    from phantom_core.references import encode_references
    from phantom_core.tiny.default import install_trained_default
    from phantom_core.wan.load import infer_dit_config
    from phantom_core.world.cases import CaseSet

    with tempfile.TemporaryDirectory(prefix="phantom-bench-") as folder:
        files = install_trained_default(folder)
        sd = {k: v.float() for k, v in read_state_dict(files["dit"]).items()}
        _, vae, text_encoder = load_models(files["dit"], files["vae"], files["text_encoder"])
    sample = next(iter(CaseSet().quick(1)))
    fmt = sample.config.video
    with torch.no_grad():
        context, context_neg = text_encoder.encode([sample.prompt, WAN_NEGATIVE_PROMPT])
        refs = encode_references(vae, list(sample.references), fmt.width, fmt.height, "letterbox")
    ctx = torch.zeros(2, 512, context.shape[-1])
    ctx[0, : len(context)], ctx[1, : len(context_neg)] = context, context_neg
    shape = latent_shape(fmt.frames, fmt.height, fmt.width)
    case = {"noise": torch.randn(shape, generator=torch.Generator().manual_seed(1)), "refs": refs.float(),
            "context": ctx[:1], "context_neg": ctx[1:], "lengths": (len(context), len(context_neg))}
    return (sd, infer_dit_config(sd), case, (fmt.width, fmt.height, fmt.frames), args.steps or 50,
            f"the trained world default, held-out case {sample.prompt!r}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sd, cfg, case, (w, h, frames), steps, label = trained_case(args) if args.trained_default else random_case(args)
    args.refs = case["refs"].shape[2]
    if args.trained_default:
        from phantom_core.tiny.default import TRAINED_SAMPLING

        settings = dict(shift=5.0, **TRAINED_SAMPLING)  # the default's own guidance, as measured for quality
    else:
        settings = dict(shift=5.0, w_img=5.0, w_text=7.5)
    print(f"setting: {label}, {w}x{h}x{frames}, {args.refs} references, {steps} Euler steps, 3 passes, {args.dtype} "
          f"on {device}, {args.threads} threads, {args.warmup} warm-up run(s), median of {args.repeat}", flush=True)

    theirs = comfy_sampler(sd, cfg, case, **settings, device=device, dtype=dtype)
    t_theirs, out_theirs, peak_theirs = measure(lambda: theirs(steps), lambda: [theirs(1) for _ in range(args.warmup)],
                                                args.repeat, device)
    report("ComfyUI native (DualCFGGuider + SamplerCustomAdvanced)", t_theirs, steps, peak_theirs)
    release_comfy()

    model = load_dit(sd, dtype=dtype, device=device)
    on_device = {k: v.to(device) for k, v in case.items() if k != "lengths"}
    n_text, n_neg = case["lengths"]  # real tokens: our DiT zero-pads to 512 itself

    def ours(n: int, cache: StepCache | None = None) -> torch.Tensor:
        return sample_phantom(model, on_device["noise"], on_device["refs"], on_device["context"][:, :n_text],
                              on_device["context_neg"][:, :n_neg], steps=n, solver="euler", integer_timesteps=False,
                              cache=cache, model_dtype=dtype, **settings).cpu()

    t_ours, out_ours, peak_ours = measure(lambda: ours(steps), lambda: [ours(1) for _ in range(args.warmup)],
                                          args.repeat, device)
    rel = ((out_ours - out_theirs).norm() / out_theirs.norm()).item()
    report("ours (sample_phantom, passes batched)", t_ours, steps, peak_ours,
           f"   ratio {t_ours / t_theirs:.2f}   final latents differ by {rel:.1e} (relative)")
    cache_steps = args.cache_steps or steps
    caches: list[StepCache] = []
    t_cached, _, peak_cached = measure(lambda: ours(cache_steps, caches.append(StepCache(args.cache_threshold))
                                                    or caches[-1]), lambda: None, args.repeat, device)
    c = caches[-1]
    print(f"ratio with the cache: {t_cached / (t_theirs / steps * cache_steps):.2f} of ComfyUI native's time for "
          f"{cache_steps} steps", flush=True)
    report(f"ours + StepCache(threshold {args.cache_threshold}), {cache_steps} steps", t_cached, cache_steps,
           peak_cached, f"   evaluations {c.computed} of {c.computed + c.reused} ({c.saved_fraction:.0%} saved; "
           f"{t_cached / (t_ours / steps * cache_steps):.2f} x the uncached time; quality: docs/speed_quality.md, "
           "measured on the trained default)")


def report(name: str, seconds: float, steps: int, peak: int | None, extra: str = "") -> None:
    memory = f"peak {peak / 2**30:.2f} GiB" if peak is not None else "peak n/a (CPU)"
    print(f"{name:<58} {seconds:7.2f} s   {seconds / steps:6.3f} s/step   {memory}{extra}", flush=True)


if __name__ == "__main__":
    main()
