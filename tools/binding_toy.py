"""Can a network learn whose motion is whose when that is all there is to learn? A binding check in latent space.

    python -m tools.binding_toy [--layout random|anchored] [--text-positions] [--reference-index] [--umt5 FILE]
        [--clause-marks SCALE] [--names] [--speed 1.5] [--late STEPS] [--temporal-weight W] [--pooled]
        [--steps 1000] [--every 100] [--threads 2]

The world MMDiT hears a motion word but cannot tell which subject it belongs to (``tools.binding_probe``,
docs/WORLD.md). This check asks whether a network *can* learn that, apart from the world's data, as
``tools.motion_toy`` asks it of the word. Every video latent ``[16, 5, 16, 16]`` is zero except two
``BLOB`` x ``BLOB`` latent-px squares, each of its own random 16-channel colour, one in the top half of the frame
and one in the bottom half (jittered by up to ``JITTER`` latent px), each moving ``STEP`` latent px per latent frame
left or right as its clause says: ``a thing moves <m1> and a thing moves <m2> on a blue background`` (the world
umT5, or ``--umt5``'s). The references are the two squares alone, centred, in clause order. Subjects are called
``thing``, so only the clauses' order binds a motion to a reference (the world grammar's rule when words do not).
``--layout anchored`` puts the first clause's square on top, as the world's anchored layout mostly does (then the
half alone can bind); ``random`` (default) puts it on top or bottom at random, so a network must find each
reference's square to bind.

The network is the world MMDiT without CLIP (``world-vae``: RoPE, window attention) from scratch, optionally with
learned text positions (``MMDiTConfig.text_positions``) and a learned index on each reference's VAE tokens
(``reference_index``), trained by the project's trainer with ``motion_toy``'s recipe (``--plain``: constant learning
rate, no warm-up, no dropout; the default here, since the question is what can be learnt, not how fast the recipe
learns it) on ``SAMPLES`` pre-drawn samples. Every ``--every`` steps it prints, on ``HELD_OUT`` fixed held-out
samples whose two motions differ and the same noise, at sigma 0.95 and 0.8: the velocity loss with the prompt and
with the two clauses' motions swapped, the ``binding`` effect (``binding_probe.binding_score`` per square in its half:
the truth's displacement for a network that binds, 0 for one that cannot tell the clauses apart, negative when it
swaps them) and ``heard`` (both clauses told one motion against its reverse: what the words move without binding).

Variants: ``--names`` calls each subject by a random training subject's name of the world instead of ``thing`` (the
clauses' words then sit at other positions in every prompt, as in the world); ``--speed`` sets how far the squares
move (latent px per latent frame; 1.5 by default, about 1.0 in the travel-0.5 world); ``--clause-marks S`` adds a
fixed vector per clause to its tokens' features (``clause_marks``: an ideal clause-aware text encoder); ``--late N``
trains N steps without the positions and the index first (a bag-of-words network, as the world's runs start from),
then adds them; ``--temporal-weight W`` adds W times ``training.objective.temporal_mse`` to the loss (the error of the
clean estimate's change between frames: where the squares move); ``--recipe`` uses the world recipe's warm-up,
cosine schedule and dropouts instead of the plain loop; ``--pooled`` adds the world default's pooled prompt and
reference vectors to the timestep conditioning. Every measure also prints ``placed`` (``placement_score``): with the
``anchored`` layout the references' order alone says which colour belongs on top, so it asks whether a network
places two references' looks by order (``random``: nothing to learn, about 0).
docs/WORLD.md (eleventh and fifteenth sessions) has what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NamedTuple

import torch
from torch import Tensor

from phantom_core.world.grammar import article_for
from tools.binding_probe import binding_score, region_displacement
from tools.motion_toy import (
    BLOB,
    FRAMES,
    JITTER,
    MAX_SPEED,
    PLAIN,
    SIZE,
    STEP,
    TOY_TRAIN,
    VECTORS,
    build_network,
    train_toy,
)

SAMPLES, HELD_OUT = 512, 16
LAYOUTS = ("random", "anchored")
MOTIONS = ("left", "right")


class Case(NamedTuple):
    """One toy sample: each clause's motion, the latents ``[16, FRAMES, SIZE, SIZE]``, the references ``[16, 2,
    SIZE, SIZE]``, the squares' halves (``[SIZE, SIZE]`` boolean, clause order) and each clause's subject words."""

    motions: tuple[str, str]
    latents: Tensor
    refs: Tensor
    halves: list[Tensor]
    words: tuple[str, str] = ("thing", "thing")


def prompt(motions: tuple[str, ...], words: tuple[str, ...] | None = None) -> str:
    """``a <words> moves <m1> and a <words> moves <m2> on a blue background`` (words: ``thing`` by default)."""
    words = words or ("thing",) * len(motions)
    return " and ".join(f"{article_for(w)} {w} moves {m}" for w, m in zip(words, motions)) + " on a blue background"


def toy_pair(motions: tuple[str, str], top: int, colours: Tensor, jitter: tuple[int, int, int, int],
             speed: float = STEP):
    """``(latents [16, FRAMES, SIZE, SIZE], ref_latents [16, 2, SIZE, SIZE], halves)``, float32: square ``k``
    (``colours[k]``, ``[16]``) moving ``motions[k]`` in the top half when ``k == top``, else the bottom half; the
    references are the squares alone, centred, in clause order; ``halves`` are the ``[SIZE, SIZE]`` boolean masks
    of square 0's and square 1's halves. ``speed``: latent px per latent frame."""
    x0, refs, half = torch.zeros(16, FRAMES, SIZE, SIZE), torch.zeros(16, 2, SIZE, SIZE), BLOB // 2
    rows = torch.arange(SIZE)[:, None].expand(SIZE, SIZE)
    halves = []
    for k, motion in enumerate(motions):
        cy = (SIZE // 4 if k == top else 3 * SIZE // 4) + jitter[2 * k + 1]
        cx = SIZE // 2 + jitter[2 * k]
        for f in range(FRAMES):
            x = round(cx + VECTORS[motion][0] * (f - FRAMES // 2) * speed) - half
            x0[:, f, cy - half:cy + half, x:x + BLOB] = colours[k][:, None, None]
        refs[:, k, SIZE // 2 - half:SIZE // 2 + half, SIZE // 2 - half:SIZE // 2 + half] = colours[k][:, None, None]
        halves.append(rows < SIZE // 2 if k == top else rows >= SIZE // 2)
    return x0, refs, halves


def draw(count: int, seed: int, layout: str = "random", differ: bool = False, names: bool = False,
         speed: float = STEP) -> list[Case]:
    """``count`` ``Case``s from ``seed``: motions, colours, jitters and (``random`` layout) which square is on top;
    ``differ``: only pairs whose two motions differ; ``names``: each clause's subject words are a random training
    subject's name of the world (``world.subjects``; 1 to 9 umT5 pieces, unrelated to the square's colour), so the
    clauses' words sit at other positions in every prompt, as in the world, instead of ``thing``; ``speed``:
    ``toy_pair``'s. ``ValueError``
    for a ``layout`` not in ``LAYOUTS``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; valid: {', '.join(LAYOUTS)}")
    pool = _names() if names else ("thing",)
    gen, out = torch.Generator().manual_seed(seed), []
    while len(out) < count:
        motions = tuple(MOTIONS[int(i)] for i in torch.randint(2, (2,), generator=gen))
        jitter = tuple(int(v) for v in torch.randint(-JITTER, JITTER + 1, (4,), generator=gen))
        top = int(torch.randint(2, (1,), generator=gen)) if layout == "random" else 0
        colours = torch.randn(2, 16, generator=gen) * 1.5
        words = tuple(pool[int(i)] for i in torch.randint(len(pool), (2,), generator=gen))
        if not differ or motions[0] != motions[1]:
            out.append(Case(motions, *toy_pair(motions, top, colours, jitter, speed), words))
    return out


def _names() -> tuple[str, ...]:
    from phantom_core.world.default_model import RECIPE_SOURCES
    from phantom_core.world.subjects import split_subjects

    return tuple(sorted({s.name for s in split_subjects("train", RECIPE_SOURCES)}))


@torch.no_grad()
def measure(model, encode, cases, sigmas=(0.95, 0.8), seed: int = 9) -> dict[float, dict]:
    """Per sigma over ``cases`` (``draw(..., differ=True)``): the mean velocity loss with the prompt (``own``) and
    with the clauses' motions swapped (``swapped``), the ``binding`` effect and ``heard`` control (latent px, see
    the module), the ``truth`` displacement, and ``placed`` (``placement_score``: whether each square's place takes
    its own reference's colour; meaningful for the ``anchored`` layout, where the order alone says which reference
    is on top). The noisy input and loss are the trainer's (``training.objective``)."""
    from phantom_core.training.objective import noisy_latents, velocity_target, video_mse

    was_training, gen = model.training, torch.Generator().manual_seed(seed)
    model.eval()
    out = {}
    for sigma in sigmas:
        rows = dict.fromkeys(("own", "swapped", "binding", "heard", "truth", "placed"), 0.0)
        for motions, x0, refs, halves, words in cases:
            noise = torch.randn((1, *x0.shape), generator=gen)
            x_t = noisy_latents(x0[None], noise, torch.tensor([sigma]))
            texts = {"own": prompt(motions, words), "swapped": prompt(motions[::-1], words),
                     "same": prompt((motions[0],) * 2, words), "reversed": prompt((motions[1],) * 2, words)}
            est = {}
            for tag, text in texts.items():
                v = model(x_t, torch.tensor([sigma * 1000.0]), encode(text)[None], refs[None])
                if tag in ("own", "swapped"):
                    rows[tag] += float(video_mse(v, velocity_target(x0[None], noise))) / len(cases)
                est[tag] = (x_t - sigma * v)[0]
            unit = torch.tensor([float(VECTORS[motions[0]][0]), 0.0])
            for k, half in enumerate(halves):
                shift = {tag: region_displacement(e, half) for tag, e in est.items()}
                score = binding_score(shift["own"], shift["swapped"], motions[k], motions[1 - k])
                rows["binding"] += score / (2 * len(cases))
                rows["heard"] += float((shift["same"] - shift["reversed"]) @ unit) / (4 * len(cases))
                rows["truth"] += float(region_displacement(x0, half)[0] * VECTORS[motions[k]][0]) / (2 * len(cases))
            rows["placed"] += placement_score(est["own"], refs, halves) / len(cases)
        out[sigma] = rows
    model.train(was_training)
    return out


def placement_score(estimate: Tensor, refs: Tensor, halves: list[Tensor]) -> float:
    """Whether each square's half of the frame in ``estimate`` (``[16, FRAMES, SIZE, SIZE]``, a clean estimate) takes
    its own reference's colour, averaged over the two squares: with ``m`` the estimate's mean over square ``k``'s
    half (every frame; the toy's background is 0, so ``m`` is the square's colour times its share of the half), ``c``
    / ``o`` the colours of reference ``k`` / the other (``refs`` ``[16, 2, SIZE, SIZE]``, centre pixels), the score
    is ``(cos(m, c) - cos(m, o)) / (1 - cos(c, o))``: 1 for the own colour at any strength, -1 for the other's (the
    looks drawn in each other's places), 0 for an even mix of both, about 0 for nothing there. It does not depend on
    where in its half the square is, so not on its motion. The world's ``metrics.placement_kept`` asks the same of
    tracked videos."""
    score = 0.0
    for k, half in enumerate(halves):
        m = estimate[:, :, half].mean((1, 2))
        c, o = refs[:, k, SIZE // 2, SIZE // 2], refs[:, 1 - k, SIZE // 2, SIZE // 2]
        cos = torch.nn.functional.cosine_similarity
        score += float((cos(m, c, dim=0) - cos(m, o, dim=0)) / (1 - cos(c, o, dim=0))) / 2
    return score


def clause_labels(tokenizer, text: str) -> list[int]:
    """Per umT5 token of a world prompt (``wan.umt5.tokenize_prompt``'s ids, ``</s>`` last): ``k`` (1-based) for the
    tokens of the ``k``-th subject clause (``world.grammar``: ``[article] [size] <words> moves <m>``, the joining
    ``and`` not included), 0 for the rest (``and``, the background phrase, ``</s>``, anything outside the grammar).
    A piece's leading space does not count as its text."""
    from phantom_core.wan.umt5 import clean_prompt
    from phantom_core.world.grammar import _CLAUSE, _ENDING

    text = clean_prompt(text)  # as tokenize_prompt does
    pieces = tokenizer.encode(text, return_type="proto").pieces
    labels = [0] * (len(pieces) + 1)
    ending = _ENDING.match(text)
    if ending is None:
        return labels
    for k, clause in enumerate(_CLAUSE.finditer(ending["clauses"]), start=1):
        a = clause.start()
        b = a + len(clause.group(0).removesuffix(" and "))
        for i, piece in enumerate(pieces):
            begin = piece.begin + (text[piece.begin:piece.begin + 1] == " ")
            if begin < b and piece.end > a:
                labels[i] = k
    return labels


def clause_marks(tokenizer, text: str, context: Tensor, scale: float, seed: int = 3) -> Tensor:
    """``context`` ``[L, D]`` with ``scale`` times a fixed random vector of clause ``k`` (norm ``sqrt(D)``, as the
    world umT5's tokens; drawn from ``seed``) added to the tokens of clause ``k`` (``clause_labels``): an ideal text
    encoder whose every token says which clause it is in, to ask whether that is what binding lacks."""
    labels = torch.tensor(clause_labels(tokenizer, text))[: context.shape[0]]
    d = context.shape[1]
    marks = torch.randn(4, d, generator=torch.Generator().manual_seed(seed))
    marks = marks / marks.norm(dim=1, keepdim=True) * d**0.5
    marks[0] = 0
    return context + scale * marks[labels]


def run(steps: int, every: int, layout: str = "random", text_positions: bool = False, reference_index: bool = False,
        umt5: str | None = None, seed: int = 0, threads: int = 2, plain: bool = True, marks: float = 0.0,
        names: bool = False, speed: float = STEP, late: int = 0, temporal: float = 0.0, pooled: bool = False,
        report=print) -> dict:
    """Train the toy's network for ``steps`` and return the final ``measure``; ``report`` gets a line every
    ``every`` steps. ``umt5``: a world umT5 file instead of the shipped one; ``marks``: ``clause_marks``' scale
    (0: none); ``names``, ``speed``: ``draw``'s; ``late``: first train that many steps without the text positions
    and the reference index (a network that has learnt the prompt as a bag of words, as the world's shipped MMDiT),
    then add them (``mmdit_default.with_text_positions`` / ``with_reference_index``) and train ``steps`` more;
    ``temporal``: the trainer's ``temporal_weight`` (0: the plain loss); ``pooled``: the world default's global
    vectors of the prompt and of the references in the timestep conditioning (``MMDiTConfig.pooled_text`` /
    ``pooled_reference``)."""
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.tiny.default import TRAINED_DIR
    from phantom_core.training.cache import InMemoryLatents, LatentSample
    from phantom_core.wan.umt5 import load_text_encoder

    torch.set_num_threads(threads)
    text_encoder = load_text_encoder(umt5 or TRAINED_DIR / "phantom_world_umt5.safetensors")
    contexts: dict[str, Tensor] = {}

    def encode(text: str) -> Tensor:
        if text not in contexts:
            context = text_encoder.encode([text])[0]
            contexts[text] = clause_marks(text_encoder.tokenizer, text, context, marks) if marks else context
        return contexts[text]

    dataset = InMemoryLatents([LatentSample(f"toy_{k}", c.latents, c.refs, encode(prompt(c.motions, c.words)))
                               for k, c in enumerate(draw(SAMPLES, seed, layout, names=names, speed=speed))],
                              encode(WAN_NEGATIVE_PROMPT))
    held_out = draw(HELD_OUT, seed + 1000, layout, differ=True, names=names, speed=speed)
    model = build_network("mmdit", seed, text_positions=text_positions and not late,
                          reference_index=reference_index and not late, pooled_text=pooled,
                          pooled_reference=pooled)
    parts = [layout, "names" * names, "text positions" * text_positions, "reference index" * reference_index,
             "pooled vectors" * pooled,
             f"umT5 {umt5}" * bool(umt5), f"clause marks x {marks}" * bool(marks), f"speed {speed}" * (speed != STEP),
             f"added after {late} steps" * bool(late), f"temporal weight {temporal}" * bool(temporal), "plain" * plain]
    name = f"binding toy ({', '.join(p for p in parts if p)})"
    start, final, phase = time.time(), {}, "bag of words: " * bool(late)

    def line(step: int, total: int, loss: float) -> None:
        nonlocal final
        if step % every == 0 or step == total:
            final = measure(model, encode, held_out)
            cells = " | ".join(f"sigma {s}: loss {r['own']:.4f} / swapped {r['swapped']:.4f}, binding "
                               f"{r['binding']:.2f}, heard {r['heard']:.2f} of {r['truth']:.2f}, "
                               f"placed {r['placed']:.2f}"
                               for s, r in final.items())
            report(f"{name} {phase}step {step}/{total} ({time.time() - start:.0f} s, train loss {loss:.4f}): "
                   f"{cells}")

    settings = {**TOY_TRAIN, **(PLAIN if plain else {}), "temporal_weight": temporal}
    if late:
        from phantom_core.world.mmdit_default import with_reference_index, with_text_positions

        train_toy(model, dataset, settings, late, seed, "toy:binding", line)
        model = with_text_positions(model) if text_positions else model
        model = (with_reference_index(model) if reference_index else model).train()
        phase = "then with them: "
    train_toy(model, dataset, settings, steps, seed, "toy:binding", line)
    return final


def main(argv: list[str] | None = None) -> int:
    from phantom_core.training.config import TRAIN_RANGES

    p = argparse.ArgumentParser(prog="python -m tools.binding_toy", description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=LAYOUTS, default="random")
    p.add_argument("--text-positions", action="store_true", help="learned text positions (MMDiTConfig)")
    p.add_argument("--reference-index", action="store_true", help="a learned index on each reference's VAE tokens")
    p.add_argument("--pooled", action="store_true",
                   help="the world default's pooled prompt and reference vectors in the timestep conditioning")
    p.add_argument("--umt5", default=None, metavar="FILE", help="a world umT5 file (default: the shipped one)")
    p.add_argument("--clause-marks", type=float, default=0.0, metavar="SCALE",
                   help="add SCALE x a fixed vector per clause to its tokens' umT5 features (an ideal clause-aware "
                        "text encoder; default 0: none)")
    p.add_argument("--names", action="store_true",
                   help="world subject names instead of 'thing' (clauses at other positions in every prompt)")
    p.add_argument("--speed", type=float, default=STEP,
                   help=f"latent px each square moves per latent frame (default {STEP}; the travel-0.5 "
                        "world's subjects about 1.0)")
    p.add_argument("--late", type=int, default=0, metavar="STEPS",
                   help="train STEPS steps without the text positions / reference index first, then add them")
    p.add_argument("--temporal-weight", type=float, default=0.0, metavar="W",
                   help="add W x the MSE of the clean estimate's frame-to-frame change "
                        "(training.objective.temporal_mse)")
    p.add_argument("--recipe", action="store_true", help="the world recipe's warm-up, cosine and dropouts")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--every", type=int, default=100, help="measure every N steps (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for flag in ("steps", "every", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} is {getattr(args, flag)}; it must be >= 1")
    if args.late < 0 or (args.late and not (args.text_positions or args.reference_index)):
        p.error(f"--late is {args.late}; it must be >= 0, and a late start needs --text-positions or "
                "--reference-index to add")
    if not 0 < args.speed <= MAX_SPEED:
        p.error(f"--speed is {args.speed}; it must be > 0 and <= {MAX_SPEED} (faster carries a square out of its "
                "half of the frame)")
    if (message := TRAIN_RANGES["temporal_weight"].error("--temporal-weight", args.temporal_weight)) is not None:
        p.error(message)
    run(args.steps, args.every, args.layout, args.text_positions, args.reference_index, args.umt5, args.seed,
        args.threads, plain=not args.recipe, marks=args.clause_marks, names=args.names,
        speed=args.speed, late=args.late, temporal=args.temporal_weight, pooled=args.pooled,
        report=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
