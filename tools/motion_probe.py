"""Does a trained world DiT read the motion word of its prompt? A probe that needs no sampling.

    python -m tools.motion_probe --work build/default [--dit build/default/dit.safetensors] [--samples 24]

For single-subject training triplets of a latent cache (``tools.train_default``'s ``latents`` stage, its captions in
the files' metadata), the DiT's one-step clean estimate ``x0 = x_t - sigma v`` (rectified flow, Phantom Eq. 3) is
computed at a few noise levels twice: with the cached prompt, and with the same prompt whose motion is reversed
(``left`` <-> ``right``, ``up`` <-> ``down``), on the same noise. The subject's path in each latent frame is the
centroid of ``|x0 - per-frame spatial median|`` summed over channels (the background is one flat colour), and its
displacement from the first to the last latent frame, along the prompted axis and signed towards the prompted
direction, is measured in latent pixels (8 video px each).

Printed per sigma: the truth's displacement, the estimate's with the prompt and with the reversed prompt, the **text
effect** (half their difference: what reversing the word moves, in latent px) and the share of samples where the
prompt's estimate moves further in the prompted direction than the reversed one's. A DiT that reads the motion word
has a text effect near the truth's displacement at high sigma (where the noisy input cannot show the motion) and a
share near 100%; one that ignores it has an effect near 0 and a share near 50%, whatever its videos look like.
The MMDiT is probed as it was trained (its cached CLIP features with its VAE reference latents).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up"}
AXIS_SIGN = {"left": (0, -1.0), "right": (0, 1.0), "up": (1, -1.0), "down": (1, 1.0)}  # (x=0 / y=1, sign)


def latent_path(x0: Tensor) -> Tensor:
    """``[F, 2]`` (x, y) centroid per latent frame, in latent px, of ``|x0 - median|`` (``x0`` ``[C, F, h, w]``; the
    median per frame and channel over space: the flat background)."""
    median = x0.flatten(2).median(dim=2).values[..., None, None]  # (C, F, 1, 1)
    weight = (x0 - median).abs().sum(0)  # (F, h, w)
    _, h, w = weight.shape
    ys = torch.arange(h, dtype=weight.dtype)[:, None]
    xs = torch.arange(w, dtype=weight.dtype)[None]
    mass = weight.sum((1, 2)).clamp_min(1e-8)
    return torch.stack([(weight * xs).sum((1, 2)) / mass, (weight * ys).sum((1, 2)) / mass], -1)


def displacement(x0: Tensor, motion: str) -> float:
    """First-to-last latent frame displacement of ``latent_path(x0)`` along ``motion``'s axis, positive towards it."""
    axis, sign = AXIS_SIGN[motion]
    path = latent_path(x0)
    return float(sign * (path[-1, axis] - path[0, axis]))


def single_motion(caption: str) -> str | None:
    """The motion of a one-subject moving caption (``... moves left on a ...``; ``world.grammar``), else None (also
    for a caption outside the grammar)."""
    from phantom_core.world.grammar import parse_prompt

    try:
        subjects = parse_prompt(caption).subjects
    except ValueError:
        return None
    return subjects[0].motion if len(subjects) == 1 and subjects[0].motion in REVERSED else None


def reverse_motion(caption: str, motion: str) -> str:
    """``caption`` with its ``moves <motion>`` reversed."""
    return caption.replace(f"moves {motion}", f"moves {REVERSED[motion]}", 1)


@torch.no_grad()
def probe(dit, encode, samples, sigmas=(0.95, 0.85, 0.7), seed: int = 0) -> dict[float, dict[str, float]]:
    """Per sigma: mean displacements (``truth``, ``own``, ``reversed``), ``effect`` and ``share`` (see the module).

    Args:
        dit: ``dit(x, t, context, ref_latents[, ref_clip=])`` -> velocity ``[1, 16, F, h, w]`` (either network).
        encode: ``caption -> context [L, D]`` (the text encoder the cache was made with).
        samples: ``(caption, motion, LatentSample)`` triplets.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = {s: {"truth": [], "own": [], "reversed": []} for s in sigmas}
    for caption, motion, sample in samples:
        contexts = {"own": sample.context, "reversed": encode(reverse_motion(caption, motion))}
        extra = {} if sample.ref_clip is None else {"ref_clip": sample.ref_clip[None]}
        x0 = sample.latents[None]
        for sigma in sigmas:
            noise = torch.randn(x0.shape, generator=gen)
            x_t = (1 - sigma) * x0 + sigma * noise
            t = torch.tensor([sigma * 1000.0])
            rows[sigma]["truth"].append(displacement(sample.latents, motion))
            for tag, context in contexts.items():
                v = dit(x_t, t, context[None], sample.ref_latents[None], **extra)
                rows[sigma][tag].append(displacement((x_t - sigma * v)[0], motion))
    out = {}
    for sigma, r in rows.items():
        own, rev = torch.tensor(r["own"]), torch.tensor(r["reversed"])
        out[sigma] = {"truth": float(torch.tensor(r["truth"]).mean()), "own": float(own.mean()),
                      "reversed": float(rev.mean()), "effect": float((own - rev).mean() / 2),
                      "share": float((own > rev).float().mean() * 100)}
    return out


def cache_samples(work: Path, count: int, clip_features: bool = False):
    """Up to ``count`` single-subject moving triplets of ``work``'s latent cache: ``(caption, motion, sample)``;
    ``clip_features``: with the references' CLIP features of the MMDiT stages (``world.mmdit_default``)."""
    from dataclasses import replace

    from safetensors import safe_open

    from phantom_core.world.default_model import cached_latents
    from phantom_core.world.mmdit_default import clip_feature_table

    data, picked = cached_latents(work), []
    table = clip_feature_table(work) if clip_features else {}
    for index in range(len(data)):
        with safe_open(str(data.files[index]), framework="pt") as f:
            caption = f.metadata().get("caption", "")
        motion = single_motion(caption)
        if motion is not None:
            sample = data[index]
            if clip_features:
                sample = replace(sample, ref_clip=table[sample.name])
            picked.append((caption, motion, sample))
        if len(picked) == count:
            break
    return picked


def main(argv: list[str] | None = None) -> int:
    from phantom_core.mmdit.load import load_any_dit
    from phantom_core.wan.umt5 import load_text_encoder

    p = argparse.ArgumentParser(prog="python -m tools.motion_probe", description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="a tools.train_default folder (latents/, umt5.safetensors)")
    p.add_argument("--dit", default=None, help="the DiT or MMDiT to probe (default: <work>/dit.safetensors)")
    p.add_argument("--samples", type=int, default=24, help="single-subject moving triplets (default 24)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    dit_path = Path(args.dit) if args.dit else work / "dit.safetensors"
    for path in (dit_path, work / "umt5.safetensors", work / "latents"):
        if not path.exists():
            p.error(f"{path} does not exist (--work is a tools.train_default folder with its latents stage)")
    dit = load_any_dit(dit_path).eval()
    text_encoder = load_text_encoder(work / "umt5.safetensors")
    samples = cache_samples(work, args.samples, clip_features=getattr(dit.config, "clip_dim", 0) > 0)
    if not samples:
        p.error(f"{work}/latents has no single-subject moving triplet")
    results = probe(dit, lambda caption: text_encoder.encode([caption])[0], samples)
    print(f"{dit_path}: {len(samples)} single-subject moving triplets; displacement along the prompted direction, "
          "latent px (first -> last latent frame)")
    print(f"{'sigma':>6} {'truth':>7} {'prompt':>7} {'reversed':>9} {'effect':>7} {'share %':>8}")
    for sigma, r in results.items():
        print(f"{sigma:>6.2f} {r['truth']:>7.2f} {r['own']:>7.2f} {r['reversed']:>9.2f} {r['effect']:>7.2f} "
              f"{r['share']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
