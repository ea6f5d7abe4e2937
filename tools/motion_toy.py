"""Can a network learn the motion word when it is all there is to learn? A learnability check in latent space.

    python -m tools.motion_toy --network mmdit-pos [--steps 600] [--every 100] [--threads 2]

The world's default DiTs do not read ``moves <direction>`` (``tools.motion_probe``, docs/WORLD.md). This check asks
whether a network *can*, apart from the world's data: a toy latent world with nothing to learn but the word. Every
video latent ``[16, 5, 16, 16]`` is zero (the background) except one ``BLOB`` x ``BLOB`` latent-px square of one fixed
16-channel colour, whose path is centred on the frame's middle (jittered by up to ``JITTER`` latent px per axis) and
which moves ``STEP`` latent px per latent frame in the prompted direction (6 px, 0.375 of the frame, over the clip;
``--speed`` sets it: the subjects of the travel-0.3 world move about 0.5, 2 latent px over the clip, those of the
travel-0.5 world, where the shipped MMDiT trained last, about 1.0, 4 latent px);
the reference is the same square, centred, on zero. The prompt, ``a thing moves <direction> on a blue background``,
goes through the shipped world umT5. So the reference and the prompt's other words are the same for every sample,
and only the motion word tells where the square is in each frame. With ``--variety`` the world is less bare: each
sample draws its background (one of ``BACKGROUNDS``, a fixed 16-channel latent per colour word, named in the prompt)
and its square's colour (a random 16-channel vector, shown by the reference), so the word must be found among
other things to learn, as in the world, where the background colour is 92% of a clean latent's variance and the
direction 0.7% (docs/WORLD.md).

The network is trained by the project's trainer (``training.loop.train``, full fine-tune from scratch: the world
recipe's batch 8, learning rate, warm-up, cosine schedule, shifted timesteps at shift 5, text dropout 0.2 and
reference dropout 0.1; ``--plain``: a constant learning rate, no warm-up and no dropout, which learns the word sooner)
on ``SAMPLES`` pre-drawn samples. Every ``--every`` steps it prints, on 16 fixed held-out
samples and the same noise: the velocity loss with the prompt and with the motion reversed, and the **text effect**
(``tools.motion_probe``'s measure: half the difference of the one-step estimates' displacements along the prompted
direction, in latent px; a network that reads the word approaches the truth's displacement, one that does not stays
at 0). ``--network``:

- ``phantom-wan``: the Phantom-Wan DiT's ``world`` preset (3-D RoPE only: no token knows its place in the frame);
- ``mmdit``: the world MMDiT without CLIP (``world-vae``: RoPE and window attention, no absolute position);
- ``mmdit-pos``: the same with SD3's sin-cos position table and the frame-index table (``pos_embed_max`` 16);
- ``mmdit-pooled``: ``mmdit`` with the global conditioning vectors (``MMDiTConfig.pooled_text`` and
  ``pooled_reference``: the mean prompt token and the mean reference token, each through an MLP, added to the
  timestep's adaLN vector);
- ``mmdit-clip-pooled``: ``mmdit-pooled`` with the CLIP branch (the ``world`` preset: the paper's *both* network, the
  shipped ``default-mmdit``'s layout; ``tools.motion_run train --clip`` trains it from scratch on CLIP features).

``--variety colour`` or ``background`` varies one of the two only. Each measure also prints the **floors** of the
loss: the Bayes-optimal predictor's (``posterior_x0``), with the word and without it. A network far above the
word-blind floor has not learnt the rest of the toy yet, and the word comes after it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace

import torch
from torch import Tensor

from phantom_core.world.grammar import BACKGROUND_COLOURS
from tools.motion_probe import displacement, reverse_motion

NETWORKS = ("phantom-wan", "mmdit", "mmdit-pos", "mmdit-pooled", "mmdit-clip-pooled")
DIRECTIONS = ("left", "right", "up", "down")
VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZE, FRAMES, BLOB, STEP, JITTER = 16, 5, 4, 1.5, 1  # latent px; STEP per latent frame
MAX_SPEED = (SIZE // 2 - JITTER - BLOB // 2) / (FRAMES // 2)  # the fastest path that stays whole in the frame: 2.5
SAMPLES, HELD_OUT = 512, 16
BACKGROUNDS = tuple(BACKGROUND_COLOURS)  # the world's colour words
TOY_TRAIN = dict(mode="full", batch_size=8, learning_rate=4e-4, warmup_steps=100, lr_schedule="cosine",
                 weight_decay=0.01, gradient_checkpointing=False, timesteps="shifted", shift=5.0, text_dropout=0.2,
                 reference_dropout=0.1, checkpoint_every=10**6, keep_checkpoints=1, device="cpu", precision="fp32")


def prompt(direction: str, background: str = "blue") -> str:
    return f"a thing moves {direction} on a {background} background"


def toy_sample(direction: str, centre: tuple[int, int], colour: Tensor, background: Tensor | None = None,
               speed: float = STEP) -> tuple[Tensor, Tensor]:
    """``(latents [16, FRAMES, SIZE, SIZE], ref_latents [16, 1, SIZE, SIZE])``, float32: the square's path through
    ``centre`` (latent px, its middle frame) moving ``direction`` over ``background`` (``[16]``; None: zero), and the
    centred square alone on zero."""
    x0 = torch.zeros(16, FRAMES, SIZE, SIZE)
    if background is not None:
        x0 += background[:, None, None, None]
    (ux, uy), half = VECTORS[direction], BLOB // 2
    for f in range(FRAMES):
        x = round(centre[0] + ux * (f - FRAMES // 2) * speed) - half
        y = round(centre[1] + uy * (f - FRAMES // 2) * speed) - half
        x0[:, f, y:y + BLOB, x:x + BLOB] = colour[:, None, None]
    ref = torch.zeros(16, 1, SIZE, SIZE)
    ref[:, 0, SIZE // 2 - half:SIZE // 2 + half, SIZE // 2 - half:SIZE // 2 + half] = colour[:, None, None]
    return x0, ref


VARIETIES = ("none", "colour", "background", "both")


def variety_kind(variety: bool | str) -> str:
    """``variety`` as one of ``VARIETIES`` (True is ``both``, False ``none``). Raises ``ValueError`` otherwise."""
    kind = {True: "both", False: "none"}.get(variety, variety)
    if kind not in VARIETIES:
        raise ValueError(f"variety is {variety!r}; valid: {', '.join(VARIETIES)}")
    return kind


def draw(count: int, seed: int, variety: bool | str = False, speed: float = STEP) -> list[tuple[str, Tensor, Tensor]]:
    """``count`` ``(prompt, latents, ref_latents)`` drawn from ``seed`` (directions and jitters). ``variety``
    (``VARIETIES``; True is ``both``, False ``none``): ``none``, one colour on zero; ``colour``, a random colour on
    the ``blue`` background's latent; ``background``, the one colour on a random one of ``BACKGROUNDS``; ``both``, a
    random colour on a random background.

    Raises:
        ValueError: ``variety`` not in ``VARIETIES``.
    """
    variety = variety_kind(variety)
    gen = torch.Generator().manual_seed(seed)
    colour = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 1.5
    backgrounds = torch.randn(len(BACKGROUNDS), 16, generator=torch.Generator().manual_seed(2))
    out = []
    for _ in range(count):
        direction = DIRECTIONS[int(torch.randint(len(DIRECTIONS), (1,), generator=gen))]
        jx, jy = (int(v) for v in torch.randint(-JITTER, JITTER + 1, (2,), generator=gen))
        background, text = None, prompt(direction)
        if variety != "none":
            k = BACKGROUNDS.index("blue")
            if variety != "colour":
                k = int(torch.randint(len(BACKGROUNDS), (1,), generator=gen))
            background, text = backgrounds[k], prompt(direction, BACKGROUNDS[k])
            if variety != "background":
                colour = torch.randn(16, generator=gen) * 1.5
        out.append((text, *toy_sample(direction, (SIZE // 2 + jx, SIZE // 2 + jy), colour, background, speed)))
    return out


def direction_of(text: str) -> str:
    """The direction word of a toy ``prompt``."""
    return text.split(" moves ")[1].split(" ")[0]


def build_network(name: str, seed: int = 0, **changes) -> torch.nn.Module:
    """A from-scratch network (upstream Wan / SD3 init from ``seed``), float32, on the CPU; ``changes``: fields of an
    MMDiT network's ``MMDiTConfig`` to set (say ``text_positions=True``).

    Raises:
        ValueError: ``name`` not in ``NETWORKS``, or ``changes`` for the Phantom-Wan network.
    """
    from phantom_core.mmdit.config import MMDIT_PRESETS
    from phantom_core.mmdit.model import PhantomMMDiT
    from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT

    if name not in NETWORKS:
        raise ValueError(f"network is {name!r}; valid: {', '.join(NETWORKS)}")
    if name == "phantom-wan":
        if changes:
            raise ValueError(f"config changes {sorted(changes)} are for an MMDiT network, not {name!r}")
        model = PhantomWanDiT(DIT_PRESETS["world"], device="meta")
    else:
        config = MMDIT_PRESETS["world" if name == "mmdit-clip-pooled" else "world-vae"]
        if name == "mmdit-pos":
            config = replace(config, pos_embed_max=SIZE)
        elif name in ("mmdit-pooled", "mmdit-clip-pooled"):
            config = replace(config, pooled_text=True, pooled_reference=True)
        model = PhantomMMDiT(replace(config, **changes), device="meta")
    model = model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def reverse(text: str) -> str:
    """A toy ``prompt`` with its direction reversed."""
    return reverse_motion(text, direction_of(text))


def posterior_x0(x_t: Tensor, sigma: float, text: str, ref: Tensor, background: Tensor, aware: bool,
                 speed: float = STEP) -> Tensor:
    """The Bayes-optimal clean estimate ``E[x0 | x_t, prompt, reference]`` of the toy world, ``[16, FRAMES, SIZE,
    SIZE]`` float32: the posterior mean over every path the world can draw (the jitters, and the four directions
    unless ``aware``: then the prompt's direction only), each path weighted by the Gaussian likelihood of ``x_t =
    (1 - sigma) x0 + sigma eps`` (Phantom Eq. 3). The square's colour is the reference's centre pixel, the
    ``background`` ``[16]`` the sample's (the prompt names it). A model can do no better than this with the prompt
    (``aware``), nor without reading the motion word (not ``aware``): their losses bound any network's."""
    colour = ref[:, 0, SIZE // 2, SIZE // 2]
    offsets = range(-JITTER, JITTER + 1)
    paths = torch.stack([toy_sample(d, (SIZE // 2 + jx, SIZE // 2 + jy), colour, background, speed)[0]
                         for d in ((direction_of(text),) if aware else DIRECTIONS) for jx in offsets for jy in offsets])
    log_likelihood = -((x_t[None] - (1 - sigma) * paths) ** 2).flatten(1).sum(1) / (2 * sigma**2)  # (P,)
    weights = torch.softmax(log_likelihood.double(), 0).float()
    return torch.einsum("p,p...->...", weights, paths)


def floor_loss(x_t: Tensor, noise: Tensor, x0: Tensor, sigma: float, text: str, ref: Tensor, aware: bool,
               speed: float = STEP) -> float:
    """The velocity loss of the Bayes-optimal predictor (``posterior_x0``; its velocity ``(x_t - x0_hat) / sigma
    - x0_hat``) against the target ``noise - x0``, all ``[16, FRAMES, SIZE, SIZE]``. The background is read from
    ``x0``'s corner, which no path reaches."""
    from phantom_core.training.objective import velocity_target

    estimate = posterior_x0(x_t, sigma, text, ref, x0[:, 0, 0, 0], aware, speed)
    velocity = velocity_target(estimate, (x_t - (1 - sigma) * estimate) / sigma)  # the noise x_t implies
    return float(((velocity - velocity_target(x0, noise)) ** 2).mean())


@torch.no_grad()
def measure(model, encode, cases, sigmas=(0.95, 0.8), seed: int = 9, speed: float = STEP) -> dict[float, dict]:
    """Per sigma: mean velocity loss with the prompt (``own``) and the reversed prompt (``reversed``) on the same
    noise, the text ``effect`` and the ``truth`` displacement (latent px; ``tools.motion_probe.displacement``), and
    the floors of that loss (``floor_loss``): ``floor_aware`` for a perfect model, ``floor_blind`` for a perfect
    model that ignores the motion word. The noisy input, the velocity target and the loss are the trainer's
    (``training.objective``).

    Args:
        model: ``model(x, t, context, ref_latents)`` -> velocity ``[1, 16, F, h, w]``.
        encode: ``prompt -> context [L, D]``.
        cases: ``(prompt, latents, ref_latents)`` as ``draw`` gives them.
    """
    from phantom_core.training.objective import noisy_latents, velocity_target, video_mse

    was_training, gen = model.training, torch.Generator().manual_seed(seed)
    device = next(model.parameters(), torch.empty(0)).device  # a parameter-free model (a test oracle): the CPU
    model.eval()
    out = {}
    for sigma in sigmas:
        rows = {"own": 0.0, "reversed": 0.0, "effect": 0.0, "truth": 0.0, "floor_aware": 0.0, "floor_blind": 0.0}
        for text, x0, ref in cases:
            direction = direction_of(text)
            noise = torch.randn((1, *x0.shape), generator=gen)
            x_t = noisy_latents(x0[None], noise, torch.tensor([sigma]))
            moved = {}
            for tag, words in (("own", text), ("reversed", reverse(text))):
                v = model(x_t.to(device), torch.tensor([sigma * 1000.0], device=device), encode(words)[None].to(device),
                          ref[None].to(device)).cpu()
                rows[tag] += float(video_mse(v, velocity_target(x0[None], noise))) / len(cases)
                moved[tag] = displacement((x_t - sigma * v)[0], direction)
            rows["effect"] += (moved["own"] - moved["reversed"]) / 2 / len(cases)
            rows["truth"] += displacement(x0, direction) / len(cases)
            for aware in (True, False):
                floor = floor_loss(x_t[0], noise[0], x0, sigma, text, ref, aware, speed)
                rows["floor_aware" if aware else "floor_blind"] += floor / len(cases)
        out[sigma] = rows
    model.train(was_training)
    return out


PLAIN = dict(warmup_steps=0, lr_schedule="constant", text_dropout=0.0, reference_dropout=0.0)


class DropoutOption(argparse.Action):
    """``--dropout TEXT REFERENCE`` (``nargs=2``, ``type=float``): stored as a tuple; a probability outside [0, 1) is
    refused with an error naming the option (shared by this tool and ``tools.motion_run``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not all(0 <= d < 1 for d in values):
            parser.error(f"{option_string} is {values}; each must be >= 0 and < 1")
        setattr(namespace, self.dest, tuple(values))


def dropout_settings(dropout: tuple[float, float] | None) -> dict:
    """The trainer settings of ``(text, reference)`` dropout probabilities; ``{}`` for None (keep the recipe's)."""
    return {} if dropout is None else dict(text_dropout=dropout[0], reference_dropout=dropout[1])


def run(network: str, steps: int, every: int, seed: int = 0, threads: int = 2, report=print,
        variety: bool | str = False, plain: bool = False, device: str = "cpu", speed: float = STEP,
        dropout: tuple[float, float] | None = None) -> dict[float, dict]:
    """Train ``network`` for ``steps`` on the toy world (``variety``, ``plain``: see the module) on ``device`` (the
    trainer's: cpu, cuda, ...; fp32 either way) and return the final ``measure``; ``report`` gets a line every
    ``every`` steps. ``dropout``: ``(text, reference)`` dropout probabilities instead of the recipe's (or
    ``plain``'s zeros)."""
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.tiny.default import TRAINED_DIR
    from phantom_core.training.cache import InMemoryLatents, LatentSample
    from phantom_core.wan.umt5 import load_text_encoder

    torch.set_num_threads(threads)
    text_encoder = load_text_encoder(TRAINED_DIR / "phantom_world_umt5.safetensors")
    contexts: dict[str, Tensor] = {}

    def encode(text: str) -> Tensor:
        if text not in contexts:
            contexts[text] = text_encoder.encode([text])[0]
        return contexts[text]

    dataset = InMemoryLatents([LatentSample(f"toy_{k}", x0, ref, encode(text))
                               for k, (text, x0, ref) in enumerate(draw(SAMPLES, seed, variety, speed))],
                              encode(WAN_NEGATIVE_PROMPT))
    held_out = draw(HELD_OUT, seed + 1000, variety, speed)
    model = build_network(network, seed)
    start, final = time.time(), {}

    def line(step: int, total: int, loss: float) -> None:
        nonlocal final
        if step % every == 0 or step == total:
            final = measure(model, encode, held_out, speed=speed)
            cells = " | ".join(f"sigma {s}: loss {r['own']:.4f} / reversed {r['reversed']:.4f} (floor "
                               f"{r['floor_aware']:.4f} / blind {r['floor_blind']:.4f}), effect {r['effect']:.2f} "
                               f"of {r['truth']:.2f}" for s, r in final.items())
            kind = variety_kind(variety)
            name = network + {"none": "", "both": " (variety)"}.get(kind, f" (variety: {kind})") + " (plain)" * plain
            name += f" (dropout {dropout[0]} / {dropout[1]})" if dropout is not None else ""
            report(f"{name} step {step}/{total} ({time.time() - start:.0f} s, train loss {loss:.4f}): {cells}")

    settings = {**TOY_TRAIN, **(PLAIN if plain else {}), **dropout_settings(dropout), "device": device}
    train_toy(model, dataset, settings, steps, seed, f"toy:{network}", line)
    return final


def train_toy(model, dataset, settings: dict, steps: int, seed: int, name: str, callback) -> None:
    """``steps`` of the project's trainer (``training.loop.train``) on ``model`` in place, with the trainer
    ``settings`` (``TOY_TRAIN`` and the like), its files in a temporary folder that is removed after; ``callback(step,
    total, loss)`` after every step; ``name`` is the config's ``dit`` label."""
    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.training.config import TrainConfig
    from phantom_core.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(**settings, steps=steps, seed=seed, dit=name, out=f"{tmp}/toy.safetensors",
                             run_dir=f"{tmp}/run", dropped_prompt=WAN_NEGATIVE_PROMPT)
        train(config, dataset=dataset, model=model, callback=callback)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.motion_toy", description=__doc__.split("\n")[0])
    p.add_argument("--network", choices=NETWORKS, default="mmdit-pos")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--every", type=int, default=100, help="measure every N steps (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variety", nargs="?", const="both", default="none", choices=VARIETIES,
                   help="random square colours and/or backgrounds (see above); alone: both")
    p.add_argument("--plain", action="store_true", help="constant learning rate, no warm-up, no dropout")
    p.add_argument("--device", default="cpu", help="the trainer's device: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--speed", type=float, default=STEP,
                   help=f"latent px the square moves per latent frame (default {STEP}; the travel-0.5 world's "
                        "subjects ~1.0, the travel-0.3 world's ~0.5)")
    p.add_argument("--dropout", type=float, nargs=2, metavar=("TEXT", "REFERENCE"), action=DropoutOption,
                   help="text and reference dropout probabilities instead of the recipe's (or --plain's zeros)")
    args = p.parse_args(argv)
    for flag in ("steps", "every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} is {getattr(args, flag)}; it must be >= 1")
    if not 0 < args.speed <= MAX_SPEED:
        p.error(f"--speed is {args.speed}; it must be > 0 and <= {MAX_SPEED} (faster carries the square out of the "
                f"{SIZE} x {SIZE} latent frame)")
    run(args.network, args.steps, args.every, args.seed, args.threads, report=lambda s: print(s, flush=True),
        variety=args.variety, plain=args.plain, device=args.device, speed=args.speed,
        dropout=args.dropout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
