"""Does a trained world DiT read the motion word of its prompt? A probe that needs no sampling.

    python -m tools.motion_probe --work build/default [--dit build/default/dit.safetensors] [--samples 24]
    python -m tools.motion_probe --binding --work TWO_SUBJECT_CACHE --dit FILE [--samples 24]
    python -m tools.motion_probe --encodings --work CACHE --dit MMDIT_WITH_CLIP [--samples 24]

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

The estimate is the mean of ``--draws`` one-step estimates on independent noise (the noise a velocity model fails to
remove is spread evenly over the frame and pulls every centroid towards the middle; the mean keeps what the model
means). Two more columns say how much a word changes the estimate at all, ``||x0(prompt) - x0(edited)|| /
||x0(prompt) - truth||`` in %: the motion reversed, and, as the positive control, the background word changed
(``red`` -> ``green`` -> ``blue`` -> ...). A model that hears the motion word but does not turn it into a direction
shows a motion change well above 0 with an effect near 0.
The MMDiT is probed as it was trained (its cached CLIP features with its VAE reference latents).

``--binding`` probes whether two subjects each follow their own clause instead (``tools.binding_probe``);
``--encodings`` which of an MMDiT's two reference encodings (VAE latents, CLIP features) it reads
(``encoding_probe``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up"}
AXIS_SIGN = {"left": (0, -1.0), "right": (0, 1.0), "up": (1, -1.0), "down": (1, 1.0)}  # (x=0 / y=1, sign)


def latent_path(x0: Tensor, region: Tensor | None = None) -> Tensor:
    """``[F, 2]`` (x, y) centroid per latent frame, in latent px, of ``|x0 - median|`` (``x0`` ``[C, F, h, w]``; the
    median per frame and channel over space: the flat background), counting only ``region`` (bool ``[h, w]``) when
    given."""
    median = x0.flatten(2).median(dim=2).values[..., None, None]  # (C, F, 1, 1)
    weight = (x0 - median).abs().sum(0)  # (F, h, w)
    if region is not None:
        weight = weight * region
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


def change_background(caption: str) -> str:
    """``caption`` (in the world's grammar) with the next background colour of ``grammar.BACKGROUND_COLOURS``."""
    from dataclasses import replace

    from phantom_core.world.grammar import BACKGROUND_COLOURS, format_prompt, parse_prompt

    scene = parse_prompt(caption)
    names = list(BACKGROUND_COLOURS)
    return format_prompt(replace(scene, background=names[(names.index(scene.background) + 1) % len(names)]))


def mean_estimates(dit, sample, contexts: dict, sigma: float, draws: int, gen: torch.Generator) -> dict:
    """Per tag of ``contexts`` (``{tag: context [L, D]}``), the mean over ``draws`` of the one-step clean estimate
    ``x0 = x_t - sigma v`` (rectified flow, Phantom Eq. 3) of ``sample`` (a ``LatentSample``; its CLIP features when
    it has them) at ``sigma``: ``[C, F, h, w]``. Every tag sees the same noise draws (from ``gen``)."""
    extra = {} if sample.ref_clip is None else {"ref_clip": sample.ref_clip[None]}
    x0, t = sample.latents[None], torch.tensor([sigma * 1000.0])
    mean = dict.fromkeys(contexts, 0.0)
    for _ in range(draws):
        x_t = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen)
        for tag, context in contexts.items():
            v = dit(x_t, t, context[None], sample.ref_latents[None], **extra)
            mean[tag] = mean[tag] + (x_t - sigma * v)[0] / draws
    return mean


@torch.no_grad()
def probe(dit, encode, samples, sigmas=(0.95, 0.85, 0.7), seed: int = 0, draws: int = 1,
          controls: bool = False) -> dict[float, dict[str, float]]:
    """Per sigma: mean displacements (``truth``, ``own``, ``reversed``), ``effect`` and ``share``, and with
    ``controls`` the relative changes ``motion_change`` / ``background_change`` in % (see the module).

    Args:
        dit: ``dit(x, t, context, ref_latents[, ref_clip=])`` -> velocity ``[1, 16, F, h, w]`` (either network).
        encode: ``caption -> context [L, D]`` (the text encoder the cache was made with).
        samples: ``(caption, motion, LatentSample)`` triplets.
        draws: one-step estimates averaged per sample and sigma (independent noise, the same for every prompt).
        controls: also run the prompt with its background word changed (one more DiT call per draw).
    """
    if draws < 1:
        raise ValueError(f"draws is {draws}; it must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    keys = ("truth", "own", "reversed", "motion_change", "background_change")
    rows = {s: {k: [] for k in keys} for s in sigmas}
    for caption, motion, sample in samples:
        contexts = {"own": sample.context, "reversed": encode(reverse_motion(caption, motion))}
        if controls:
            contexts["background"] = encode(change_background(caption))
        for sigma in sigmas:
            mean = mean_estimates(dit, sample, contexts, sigma, draws, gen)
            r = rows[sigma]
            r["truth"].append(displacement(sample.latents, motion))
            r["own"].append(displacement(mean["own"], motion))
            r["reversed"].append(displacement(mean["reversed"], motion))
            error = float((mean["own"] - sample.latents).norm().clamp_min(1e-8))
            r["motion_change"].append(float((mean["own"] - mean["reversed"]).norm()) / error * 100)
            if controls:
                r["background_change"].append(float((mean["own"] - mean["background"]).norm()) / error * 100)
    out = {}
    for sigma, r in rows.items():
        own, rev = torch.tensor(r["own"]), torch.tensor(r["reversed"])
        out[sigma] = {"truth": float(torch.tensor(r["truth"]).mean()), "own": float(own.mean()),
                      "reversed": float(rev.mean()), "effect": float((own - rev).mean() / 2),
                      "share": float((own > rev).float().mean() * 100),
                      "motion_change": float(torch.tensor(r["motion_change"]).mean())}
        if controls:
            out[sigma]["background_change"] = float(torch.tensor(r["background_change"]).mean())
    return out


@torch.no_grad()
def encoding_probe(dit, samples, sigmas=(0.95, 0.6, 0.3), seed: int = 0) -> dict[float, dict[str, float]]:
    """Which encoding of the references does an MMDiT read (Phantom Eq. 1-2: CLIP features in the text stream, VAE
    latents in the video stream)? Per sigma over ``samples`` (``(caption, motion, LatentSample)`` with CLIP
    features, at least two), the one-step estimate with the sample's own references and with those of the next
    sample (cyclically) in their place: its VAE latents alone (``vae``), its CLIP features alone (``clip``), both
    (``both``); each change ``||x0(own) - x0(swapped)|| / ||x0(own) - truth||`` in %, the mean over the samples, on
    the same noise. A model that reads the look from one encoding only has a change near 0 for the other.

    Raises ``ValueError`` for fewer than two samples or a sample without CLIP features."""
    from dataclasses import replace

    if len(samples) < 2 or any(s.ref_clip is None for _, _, s in samples):
        raise ValueError(f"encoding probe: needs two or more samples with CLIP features, got {len(samples)} "
                         f"({sum(s.ref_clip is None for _, _, s in samples)} without)")
    gen, out = torch.Generator().manual_seed(seed), {}
    for sigma in sigmas:
        rows = {"vae": 0.0, "clip": 0.0, "both": 0.0}
        for k, (_, _, sample) in enumerate(samples):
            other = samples[(k + 1) % len(samples)][2]
            state = gen.get_state()
            own = mean_estimates(dit, sample, {"own": sample.context}, sigma, 1, gen)["own"]
            error = float((own - sample.latents).norm().clamp_min(1e-8))
            for tag, changed in (("vae", replace(sample, ref_latents=other.ref_latents)),
                                 ("clip", replace(sample, ref_clip=other.ref_clip)),
                                 ("both", replace(sample, ref_latents=other.ref_latents, ref_clip=other.ref_clip))):
                x0 = mean_estimates(dit, changed, {"own": sample.context}, sigma, 1,
                                    torch.Generator().set_state(state))["own"]
                rows[tag] += float((own - x0).norm()) / error * 100 / len(samples)
        out[sigma] = rows
    return out


def token_roles(tokenizer, caption: str) -> list[str]:
    """Per umT5 token of ``caption`` (``wan.umt5.tokenize_prompt``'s ids, ``</s>`` last): ``"motion"`` for the
    pieces of the word after ``moves``, ``"background"`` for the word before ``background``, else ``"other"``."""
    from phantom_core.wan.umt5 import clean_prompt

    pieces = tokenizer.encode(clean_prompt(caption), out_type=str)
    owner, words = [], []  # the word each piece belongs to; the words
    for piece in pieces:
        if piece.startswith("\u2581") or not words:  # sentencepiece marks a word's first piece with U+2581
            words.append("")
        words[-1] += piece.lstrip("\u2581")
        owner.append(len(words) - 1)
    roles = []
    for i in owner:
        previous, following = (words[i - 1] if i else ""), (words[i + 1] if i + 1 < len(words) else "")
        roles.append("motion" if previous == "moves" else "background" if following.startswith("background")
                     else "other")
    return roles + ["other"]  # </s>


def token_gradients(dit, tokenizer, samples, sigma: float = 0.9, seed: int = 0) -> dict[str, float]:
    """Mean share (%) of ``|d loss / d context|`` (per-token L2 norms) on the motion word's and the background
    word's tokens, over ``samples`` (``(caption, motion, LatentSample)``), and ``uniform``: the share one token would
    have if every token got the same. The loss is the training loss (``training.objective.flow_matching_loss``) at
    ``sigma``, one noise draw."""
    from phantom_core.training.objective import flow_matching_loss

    gen = torch.Generator().manual_seed(seed)
    shares = {"motion": [], "background": [], "uniform": []}
    for caption, _, sample in samples:
        roles = token_roles(tokenizer, caption)
        context = sample.context[None].clone().requires_grad_(True)
        x0 = sample.latents[None]
        ref_clip = None if sample.ref_clip is None else sample.ref_clip[None]
        with torch.enable_grad():
            flow_matching_loss(dit, x0, sample.ref_latents[None], context, torch.tensor([sigma]),
                               torch.randn(x0.shape, generator=gen), ref_clip).backward()
        norms = context.grad[0].norm(dim=-1)  # (L,)
        if len(roles) != norms.shape[0]:
            raise ValueError(f"{caption!r}: {len(roles)} tokens by the tokenizer, {norms.shape[0]} in the context")
        total = float(norms.sum().clamp_min(1e-20))
        for role in ("motion", "background"):
            shares[role].append(sum(float(n) for n, r in zip(norms, roles) if r == role) / total * 100)
        shares["uniform"].append(100.0 / len(roles))
    return {k: sum(v) / len(v) for k, v in shares.items()}


def cache_samples(work: Path, count: int, clip_features: bool = False):
    """Up to ``count`` single-subject moving triplets of ``work``'s latent cache: ``(caption, motion, sample)``;
    ``clip_features``: with the references' CLIP features of the MMDiT stages (``world.mmdit_default``)."""
    return picked_samples(work, count, clip_features, single_motion)


def picked_samples(work: Path, count: int, clip_features: bool, motion_of):
    """Up to ``count`` ``(caption, motion_of(caption), sample)`` of ``work``'s latent cache, in order, where
    ``motion_of`` is not None."""
    from dataclasses import replace

    from safetensors import safe_open

    from phantom_core.world.default_model import cached_latents
    from phantom_core.world.mmdit_default import clip_feature_table

    data, picked = cached_latents(work), []
    table = clip_feature_table(work) if clip_features else {}
    for index in range(len(data)):
        if len(picked) == count:
            break
        with safe_open(str(data.files[index]), framework="pt") as f:
            caption = f.metadata().get("caption", "")
        motion = motion_of(caption)
        if motion is not None:
            sample = data[index]
            if clip_features:
                sample = replace(sample, ref_clip=table[sample.name])
            picked.append((caption, motion, sample))
    return picked


def main(argv: list[str] | None = None) -> int:
    from phantom_core.mmdit.load import load_any_dit
    from phantom_core.wan.umt5 import load_text_encoder

    p = argparse.ArgumentParser(prog="python -m tools.motion_probe", description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="a tools.train_default folder (latents/, umt5.safetensors)")
    p.add_argument("--dit", default=None, help="the DiT or MMDiT to probe (default: <work>/dit.safetensors)")
    p.add_argument("--samples", type=int, default=24, help="single-subject moving triplets (default 24)")
    p.add_argument("--draws", type=int, default=4, help="one-step estimates averaged per sample and sigma (default 4)")
    p.add_argument("--binding", action="store_true",
                   help="probe binding instead, on --work's two-subject triplets (binding_probe: the clauses' motions "
                        "swapped)")
    p.add_argument("--encodings", action="store_true",
                   help="which reference encoding an MMDiT with a CLIP branch reads (encoding_probe), instead")
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
    clip = getattr(dit.config, "clip_dim", 0) > 0
    if args.encodings:
        if not clip:
            p.error(f"--encodings: {dit_path} has no CLIP branch; it reads its VAE reference latents alone")
        results = encoding_probe(dit, cache_samples(work, args.samples, clip_features=True))
        print(f"{dit_path}: change of the one-step estimate, in % of its error, when another triplet's reference "
              "encoding replaces the own")
        print(f"{'sigma':>6} {'VAE':>7} {'CLIP':>7} {'both':>7}")
        for sigma, r in results.items():
            print(f"{sigma:>6.2f} {r['vae']:>7.1f} {r['clip']:>7.1f} {r['both']:>7.1f}")
        return 0
    if args.binding:
        from tools.binding_probe import binding_probe, cache_pair_samples

        pairs = cache_pair_samples(work, args.samples, clip_features=clip)
        if not pairs:
            p.error(f"{work}/latents has no two-subject triplet the binding probe can read (pair_motions)")
        results = binding_probe(dit, lambda caption: text_encoder.encode([caption])[0], pairs, draws=args.draws)
        print(f"{dit_path}: {len(pairs)} two-subject triplets, the clauses' motions swapped; each subject's "
              f"displacement score in latent px (truth: the moving subjects'), {args.draws} draws")
        print(f"{'sigma':>6} {'truth':>7} {'heard':>7} {'first':>7} {'second':>7} {'effect':>7} {'both %':>7} "
              f"{'pairs':>6}")
        for sigma, r in results.items():
            print(f"{sigma:>6.2f} {r['truth']:>7.2f} {r['heard']:>7.2f} {r['first']:>7.2f} {r['second']:>7.2f} "
                  f"{r['effect']:>7.2f} {r['share']:>7.1f} {r['pairs']:>6}")
        return 0
    samples = cache_samples(work, args.samples, clip_features=clip)
    if not samples:
        p.error(f"{work}/latents has no single-subject moving triplet")
    if args.draws < 1:
        p.error(f"--draws is {args.draws}; it must be >= 1")
    results = probe(dit, lambda caption: text_encoder.encode([caption])[0], samples, draws=args.draws, controls=True)
    grads = token_gradients(dit, text_encoder.tokenizer, samples)
    print(f"{dit_path}: {len(samples)} single-subject moving triplets; displacement along the prompted direction, "
          f"latent px (first -> last latent frame), estimates averaged over {args.draws} draws; word changes in % of "
          "the estimate's error")
    print(f"{'sigma':>6} {'truth':>7} {'prompt':>7} {'reversed':>9} {'effect':>7} {'share %':>8} {'motion chg':>11} "
          f"{'bg chg':>7}")
    for sigma, r in results.items():
        print(f"{sigma:>6.2f} {r['truth']:>7.2f} {r['own']:>7.2f} {r['reversed']:>9.2f} {r['effect']:>7.2f} "
              f"{r['share']:>8.1f} {r['motion_change']:>11.1f} {r['background_change']:>7.1f}")
    print(f"loss gradient on the prompt's tokens (sigma 0.9): motion word {grads['motion']:.1f}%, background word "
          f"{grads['background']:.1f}% (one token's share if all were equal: {grads['uniform']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
