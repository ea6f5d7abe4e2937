"""Whole Phantom sampling loop, ours against ComfyUI's native pipeline, measured side by side in one run.

ComfyUI side as a user runs Phantom-Wan with stock nodes: the DiT built like ``UNETLoader``, references as the
conditioning's ``time_dim_concat`` (what ``WanPhantomSubjectToVideo`` produces), ``DualCFGGuider`` (three passes:
text + refs, negative text + refs, negative text + zero refs) and ``SamplerCustomAdvanced`` with Euler. Ours:
``sample_phantom`` with the same weights, noise, sigmas and passes (batched into one call per step), then the same
with a ``StepCache`` (its evaluations saved are printed; its quality is measured on the trained default, not here).
Both sides run with the same thread count; each is timed ``--repeat`` times and the medians are compared.

    PYTHONPATH=.comfyui .venv/bin/python -m benchmarks.bench_sampling            # the issue's setting (CPU)
    PYTHONPATH=.comfyui .venv/bin/python -m benchmarks.bench_sampling --quick    # a smaller smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from phantom_core.sampling.cache import StepCache
from phantom_core.sampling.loop import sample_phantom
from phantom_core.sampling.schedule import flow_sigmas
from phantom_core.wan.dit import PhantomWanDiT, WanDiTConfig
from phantom_core.wan.latents import denormalize_latents, latent_shape, normalize_latents


def comfy_sampler(sd: dict, cfg: WanDiTConfig, case: dict, steps: int, shift: float, w_img: float, w_text: float):
    """A function running ComfyUI's native Phantom loop on ``case`` -> normalized latents."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.model_patcher
    from comfy_extras import nodes_custom_sampler as custom

    unet_config = comfy.model_detection.detect_unet_config(sd, "") | {"text_dim": cfg.text_dim}
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(dict(sd), "", device=torch.device("cpu"))
    model.load_model_weights(dict(sd), "")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    raw_refs = denormalize_latents(case["refs"])
    zero_refs = comfy.latent_formats.Wan21().process_out(torch.zeros_like(raw_refs))
    cond1 = [[case["context"], {"time_dim_concat": raw_refs}]]
    cond2 = [[case["context_neg"], {"time_dim_concat": raw_refs}]]
    negative = [[case["context_neg"], {"time_dim_concat": zero_refs}]]
    guider = custom.DualCFGGuider.execute(patcher, cond1, cond2, negative, w_text, w_img, "regular")[0]
    sampler = custom.KSamplerSelect.execute("euler")[0]
    sigmas = flow_sigmas(steps, shift)

    class GivenNoise:
        seed = 0

        def generate_noise(self, latent: dict) -> torch.Tensor:
            return case["noise"] / sigmas[0]  # ComfyUI multiplies by sigma_0 again

    def run() -> torch.Tensor:
        latent = {"samples": torch.zeros(case["noise"].shape)}
        out = custom.SamplerCustomAdvanced.execute(GivenNoise(), guider, sampler, sigmas, latent)[0]["samples"]
        return normalize_latents(out.float())

    return run


def median_time(fn, repeat: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="dim 256, 2 blocks, 128x96x9, 4 steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache-threshold", type=float, default=0.1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dim, layers, (w, h, frames), steps = (256, 2, (128, 96, 9), 4) if args.quick else (512, 4, (256, 160, 17), 8)
    cfg = WanDiTConfig(dim=dim, ffn_dim=4 * dim, num_heads=dim // 128, num_layers=layers, text_dim=4096)
    torch.manual_seed(0)
    model = PhantomWanDiT(cfg).eval().requires_grad_(False)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    shape = latent_shape(frames, h, w)
    case = {"noise": torch.randn(shape, generator=g), "refs": torch.randn(1, 16, 2, *shape[-2:], generator=g)}
    ctx = torch.zeros(2, 512, cfg.text_dim)
    ctx[0, :20], ctx[1, :30] = torch.randn(20, cfg.text_dim, generator=g), torch.randn(30, cfg.text_dim, generator=g)
    case["context"], case["context_neg"] = ctx[:1], ctx[1:]
    settings = dict(steps=steps, shift=5.0, w_img=5.0, w_text=7.5)
    theirs_fn = comfy_sampler(sd, cfg, case, **settings)

    def ours_fn(cache: StepCache | None = None) -> torch.Tensor:
        with torch.no_grad():
            return sample_phantom(model, case["noise"], case["refs"], case["context"][:, :20],
                                  case["context_neg"][:, :30], solver="euler", integer_timesteps=False,
                                  cache=cache, **settings)

    t_theirs, out_theirs = median_time(theirs_fn, args.repeat)
    t_ours, out_ours = median_time(ours_fn, args.repeat)
    caches: list[StepCache] = []
    t_cached, out_cached = median_time(lambda: ours_fn(caches.append(StepCache(args.cache_threshold)) or caches[-1]),
                                       args.repeat)
    rel = ((out_ours - out_theirs).norm() / out_theirs.norm()).item()
    print(f"setting: dim {dim}, {layers} blocks, {w}x{h}x{frames}, 2 references, {steps} Euler steps, 3 passes, "
          f"fp32, {args.threads} threads, median of {args.repeat}")
    print(f"ComfyUI native (DualCFGGuider + SamplerCustomAdvanced): {t_theirs:.2f} s")
    print(f"ours (sample_phantom, passes batched):                  {t_ours:.2f} s   ratio {t_ours / t_theirs:.2f}"
          f"   final latents differ by {rel:.1e} (relative)")
    c = caches[-1]
    print(f"ours + StepCache(threshold {args.cache_threshold}):             {t_cached:.2f} s   ratio "
          f"{t_cached / t_theirs:.2f}   evaluations {c.computed} of {c.computed + c.reused} "
          f"({c.saved_fraction:.0%} saved; quality: see the world's evaluate, random weights cannot judge it)")


if __name__ == "__main__":
    main()
