"""Forward time of our PhantomWanDiT against ComfyUI's WanModel on the same random weights (not a test).

Run: ``.venv/bin/python benchmarks/bench_dit.py [--repeats 5] [--blocks 2] [--device cpu]``.
Both models run in one process with the same threads, fp32, 1536-wide blocks (the 1.3B geometry), 5 video
latent frames plus 2 reference frames at 30x52 latents, a 512-token context. Prints each side's median time,
the ratio ours / ComfyUI, and each side's share of this machine's fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from phantom_core.wan.dit import PhantomWanDiT, WanDiTConfig  # noqa: E402


def import_comfy_wan(device: torch.device):
    """ComfyUI's Wan model module, forced onto the CPU for a CPU run (must precede any other comfy import)."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy.ldm.wan.model, comfy.ops


def dit_flops(cfg: WanDiTConfig, n_tokens: int, n_video: int, ctx_len: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward, batch 1: linear layers and attention matmuls."""
    D, Ff, L, Lc = cfg.dim, cfg.ffn_dim, n_tokens, ctx_len
    per_block = (
        2 * L * D * D * 4  # self-attention q, k, v, o
        + 2 * 2 * L * L * D  # self-attention QK^T and AV
        + 2 * L * D * D * 2 + 2 * Lc * D * D * 2  # cross-attention q, o (video) and k, v (text)
        + 2 * 2 * L * Lc * D  # cross-attention QK^T and AV
        + 2 * L * D * Ff * 2  # FFN
    )
    patch = 2 * L * D * cfg.in_dim * 4
    text = 2 * Lc * (cfg.text_dim * D + D * D)
    head = 2 * n_video * D * cfg.out_dim * 4
    return cfg.num_layers * per_block + patch + text + head


def matmul_peak(device: torch.device, n: int = 4096, reps: int = 5) -> float:
    """Best measured fp32 FLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call; CPU time is less disturbed by other load."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    wan, ops = import_comfy_wan(device)
    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=args.blocks)
    ours = PhantomWanDiT(cfg, device="meta")
    sd = {k: 0.05 * torch.randn(v.shape, device=device) for k, v in ours.state_dict().items()}
    ours.load_state_dict(sd, assign=True)
    theirs = wan.WanModel(model_type="t2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                          num_layers=cfg.num_layers, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, device="meta",
                          operations=ops.disable_weight_init)
    theirs.load_state_dict(sd, assign=True)
    ours.eval(), theirs.eval()

    frames, refs, h, w = 5, 2, 30, 52
    x = torch.randn(1, 16, frames, h, w, device=device)
    r = torch.randn(1, 16, refs, h, w, device=device)
    t = torch.tensor([750.0], device=device)
    ctx = torch.randn(1, 512, cfg.text_dim, device=device)
    runs = {
        "ours": lambda: ours(x, t, ctx, r),
        "ComfyUI": lambda: theirs(x, t, F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1])), time_dim_concat=r,
                                  transformer_options={}),
    }
    with torch.no_grad():
        diff = (runs["ours"]() - runs["ComfyUI"]()).abs().max().item()  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # alternate, so slow phases of a shared machine hit both sides alike
        for name, fn in runs.items():
            wall, cpu_s = timed(fn, device)
            times[name].append(wall)
            cpu[name].append(cpu_s)

    peak = matmul_peak(device)
    n_tokens = (frames + refs) * (h // 2) * (w // 2)
    flops = dit_flops(cfg, n_tokens, frames * (h // 2) * (w // 2), 512)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, fp32")
    print(f"DiT: dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads, {cfg.num_layers} blocks, "
          f"{frames} frames + {refs} refs at {h}x{w} latents = {n_tokens} tokens, 512 text tokens")
    print(f"forward FLOPs {flops / 1e9:.1f} G; matmul peak {peak / 1e9:.1f} GFLOP/s; max |ours - ComfyUI| {diff:.2e}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, m in med.items():
        print(f"{name:>8}: median {m:.3f} s over {args.repeats} ({', '.join(f'{v:.3f}' for v in times[name])}), "
              f"{flops / m / 1e9:.1f} GFLOP/s = {100 * flops / m / peak:.0f}% of peak; "
              f"min {min(times[name]):.3f} s; median CPU time {statistics.median(cpu[name]):.3f} s")
    print(f"ratio ours / ComfyUI = {med['ours'] / med['ComfyUI']:.3f} (median wall), "
          f"{min(times['ours']) / min(times['ComfyUI']):.3f} (min wall), "
          f"{statistics.median(cpu['ours']) / statistics.median(cpu['ComfyUI']):.3f} (median CPU time)")


if __name__ == "__main__":
    main()
