"""Does a trained world DiT bind each clause's motion to its own subject? The two-subject probe of
``tools.motion_probe`` (``python -m tools.motion_probe --binding --work TWO_SUBJECT_CACHE --dit FILE``).

For two-subject triplets whose moving subjects share an axis, the one-step clean estimate (``motion_probe.
mean_estimates``) with the prompt, with the two clauses' motions swapped, and with both clauses told one motion and
then its reverse; each subject's displacement is measured in its half of the frame. ``heard`` (what the words move
when both subjects are told the same: no binding needed) and the binding ``effect`` (does swapping the clauses swap
the subjects' motions: the truth's displacement when each subject follows its own clause, 0 when the model cannot
tell which clause is whose, negative when it swaps them) are in latent px, beside the truth. docs/WORLD.md (tenth
session) has what it measured.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tools.motion_probe import AXIS_SIGN, REVERSED, latent_path, mean_estimates, picked_samples

# motion -> its unit direction (x, y) in latent px, from motion_probe's (axis, sign); still: none
UNIT = {"still": (0.0, 0.0)} | {m: (sign, 0.0) if axis == 0 else (0.0, sign) for m, (axis, sign) in AXIS_SIGN.items()}


def pair_motions(caption: str) -> tuple[str, str] | None:
    """The two motions of a two-subject caption the binding probe can read, else None: at least one subject moves
    and every moving one is on the same axis (``left`` / ``right`` with each other or ``still``; ``up`` / ``down``
    likewise), so that the two subjects' paths stay apart across that axis (the anchored layout puts the first
    subject named above the second, on a diagonal: ``world.render``)."""
    from phantom_core.world.grammar import parse_prompt

    try:
        subjects = parse_prompt(caption).subjects
    except ValueError:
        return None
    if len(subjects) != 2:
        return None
    motions = (subjects[0].motion, subjects[1].motion)
    axes = {AXIS_SIGN[m][0] for m in motions if m != "still"}
    return motions if len(axes) == 1 else None


def swap_motions(caption: str) -> str:
    """A two-subject caption (``world.grammar``) with its two clauses' motions exchanged (subjects, sizes and the
    background kept)."""
    return _with_motions(caption, lambda motions: motions[::-1])


def same_motions(caption: str, motion: str) -> str:
    """A caption (``world.grammar``) with every clause's motion set to ``motion``."""
    return _with_motions(caption, lambda motions: [motion] * len(motions))


def _with_motions(caption: str, change) -> str:
    from dataclasses import replace

    from phantom_core.world.grammar import format_prompt, parse_prompt

    scene = parse_prompt(caption)
    motions = change([s.motion for s in scene.subjects])
    return format_prompt(replace(scene, subjects=tuple(replace(s, motion=m) for s, m in zip(scene.subjects, motions))))


def subject_regions(truth: Tensor, motions: tuple[str, str]) -> list[Tensor]:
    """Boolean ``[h, w]`` masks of the two subjects' halves of the latent frame, first subject first: the frame is
    split across the moving axis (top / bottom for left-right motions, left / right for up-down ones; the world's
    layouts keep two subjects apart across it) and the halves are assigned so that ``truth``'s (``[C, F, h, w]``)
    displacement in them follows ``motions`` best (the data's own video says where each subject is: the anchored
    layout puts the first subject higher, but a path is centred on its anchor and a crowded scene falls back to a
    free layout, so no fixed rule holds)."""
    _, _, h, w = truth.shape
    ys, xs = torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None].expand(h, w)
    axis = next(AXIS_SIGN[m][0] for m in motions if m != "still")
    half = ys < h / 2 if axis == 0 else xs < w / 2
    units = [torch.tensor(UNIT[m]) for m in motions]
    a, b = region_displacement(truth, half), region_displacement(truth, ~half)
    return [half, ~half] if a @ units[0] + b @ units[1] >= b @ units[0] + a @ units[1] else [~half, half]


def region_displacement(x0: Tensor, region: Tensor) -> Tensor:
    """First-to-last latent frame displacement ``(dx, dy)`` in latent px of the centroid of ``|x0 - median|``
    (``x0`` ``[C, F, h, w]``, median per frame and channel over the whole frame) inside ``region`` ``[h, w]``."""
    path = latent_path(x0, region)
    return path[-1] - path[0]


def binding_score(own: Tensor, swapped: Tensor, motion: str, other: str) -> float:
    """How far a subject's estimated displacement follows its own clause when the clauses' motions are swapped:
    ``(d_own - d_swapped) . (u - u') / |u - u'|^2`` with ``u`` / ``u'`` the unit directions of its own and the
    other clause's motion (``still``: 0). A subject whose estimate moves as its clause says scores the displacement
    itself (the truth's, for a perfect model); one that does not hear which clause is its own scores 0, and one
    whose motion is swapped with the other subject's scores minus the displacement."""
    direction = torch.tensor(UNIT[motion]) - torch.tensor(UNIT[other])
    return float((own - swapped) @ direction / direction.square().sum())


@torch.no_grad()
def binding_probe(dit, encode, samples, sigmas=(0.95, 0.85), seed: int = 0, draws: int = 1) -> dict[float, dict]:
    """Does the DiT bind each clause's motion to its own subject? Per sigma over two-subject ``samples``
    (``(caption, (motion 1, motion 2), LatentSample)``, see :func:`pair_motions`), the one-step estimate ``x0 = x_t -
    sigma v`` (mean of ``draws``, the same noise for every prompt) with the prompt and, where the two motions differ,
    with them swapped between the clauses (:func:`swap_motions`); as the control that needs no binding, with both
    clauses given the first moving subject's motion ``m`` and both given its reverse (:func:`same_motions`). Each
    subject's displacement is measured in its half (:func:`subject_regions`).

    Returns per sigma: ``truth`` (the truth's mean displacement of the moving subjects along their motion, latent
    px); ``heard`` (the control: both subjects' mean ``(d_all m - d_all reversed) . u(m) / 2``, what the words move
    when every subject is told the same); over the samples whose motions differ, ``first`` / ``second`` (the mean
    :func:`binding_score` of the first / second subject), ``effect`` (their mean), ``share`` (% of them where both
    subjects score above 0) and ``pairs`` (how many). A model that hears the words but cannot tell which clause is
    whose has ``heard`` well above 0 and ``effect`` near 0. Raises ``ValueError`` for ``draws < 1`` or no samples."""
    if draws < 1:
        raise ValueError(f"draws is {draws}; it must be >= 1")
    if not samples:
        raise ValueError("binding probe: no two-subject samples it can read (pair_motions)")
    gen = torch.Generator().manual_seed(seed)
    rows = {s: {"truth": [], "heard": [], "first": [], "second": [], "both": []} for s in sigmas}
    for caption, motions, sample in samples:
        moving = next(m for m in motions if m != "still")
        contexts = {"own": encode(caption), "same": encode(same_motions(caption, moving)),
                    "reversed": encode(same_motions(caption, REVERSED[moving]))}
        if motions[0] != motions[1]:
            contexts["swapped"] = encode(swap_motions(caption))
        regions = subject_regions(sample.latents, motions)
        for sigma in sigmas:
            mean = mean_estimates(dit, sample, contexts, sigma, draws, gen)
            r, scores = rows[sigma], []
            for k, region in enumerate(regions):
                motion, other = motions[k], motions[1 - k]
                own = region_displacement(mean["own"], region)
                if motion != "still":
                    r["truth"].append(float(region_displacement(sample.latents, region) @ torch.tensor(UNIT[motion])))
                told = region_displacement(mean["same"], region) - region_displacement(mean["reversed"], region)
                r["heard"].append(float(told @ torch.tensor(UNIT[moving]) / 2))
                if "swapped" in mean:
                    scores.append(binding_score(own, region_displacement(mean["swapped"], region), motion, other))
            if scores:
                r["first"].append(scores[0])
                r["second"].append(scores[1])
                r["both"].append(float(min(scores) > 0))
    out = {}
    for sigma, r in rows.items():
        first, second = torch.tensor(r["first"]), torch.tensor(r["second"])
        mean = {k: float(torch.tensor(r[k]).mean()) for k in ("truth", "heard", "both")}
        out[sigma] = {"truth": mean["truth"], "heard": mean["heard"], "first": float(first.mean()),
                      "second": float(second.mean()), "effect": float((first + second).mean() / 2),
                      "share": mean["both"] * 100, "pairs": len(r["first"])}
    return out


def cache_pair_samples(work: Path, count: int, clip_features: bool = False):
    """Up to ``count`` two-subject triplets of ``work``'s latent cache that the binding probe can read:
    ``(caption, (motion 1, motion 2), sample)`` (:func:`pair_motions`); ``clip_features`` as in
    :func:`cache_samples`."""
    return picked_samples(work, count, clip_features, pair_motions)


@torch.no_grad()
def placement_probe(dit, samples, sigmas=(0.95, 0.85), seed: int = 0, draws: int = 1) -> dict[float, dict]:
    """Does the DiT put each reference's look where its own subject is (the world's anchored layout: the first
    subject named, reference 1, the highest)? Per sigma over two-subject ``samples`` (``(caption, motions,
    LatentSample)``, as :func:`binding_probe`'s), the one-step estimate ``a`` with the references in their order and
    ``b`` with the two references (VAE latents and CLIP features) in the reverse order, the prompt and the noise the
    same; ``x`` the truth.

    Returns per sigma: ``placed`` = ``sum((a - b) . (x - (a + b) / 2)) / sum(|a - b|^2 / 2)`` over the samples (1
    when reversing the references draws the truth with the two looks exchanged, -1 when the references' own order
    draws it so, near 0 when the order changes the estimate in no direction of the truth; the ratio of two small
    numbers, so read it beside ``order``), ``order`` (``100 sum |a - b|^2 / sum |a - x|^2``: how much the order
    changes the estimate at all, in % of its error; 0 for a model that reads its references as a bag) and
    ``closer`` (% of samples whose estimate is nearer the truth with the references' own order). The world metric
    it stands in for is ``world.metrics.placement_kept`` on sampled videos. Raises ``ValueError`` for ``draws < 1``
    or no samples."""
    from dataclasses import replace

    if draws < 1:
        raise ValueError(f"draws is {draws}; it must be >= 1")
    if not samples:
        raise ValueError("placement probe: no two-subject samples")
    gen, out = torch.Generator().manual_seed(seed), {}
    for sigma in sigmas:
        num = den = error = closer = 0.0
        for _, _, sample in samples:
            flipped = replace(sample, ref_latents=sample.ref_latents.flip(1),
                              ref_clip=None if sample.ref_clip is None else sample.ref_clip.flip(0))
            state = gen.get_state()
            a = mean_estimates(dit, sample, {"own": sample.context}, sigma, draws, gen)["own"]
            b = mean_estimates(dit, flipped, {"own": sample.context}, sigma, draws,
                               torch.Generator().set_state(state))["own"]
            x = sample.latents
            num += float(((a - b) * (x - (a + b) / 2)).sum())
            den += float((a - b).square().sum()) / 2
            error += float((a - x).square().sum())
            closer += float((a - x).square().sum() < (b - x).square().sum()) / len(samples)
        order = 100 * 2 * den / error if error else (float("inf") if den else 0.0)
        out[sigma] = {"placed": num / den if den else 0.0, "order": order, "closer": 100 * closer}
    return out
