"""Does a world DiT learn the motion word? Train one on a world cache and probe it as it learns (GPU or CPU).

    python -m tools.motion_run cache --work W [--travel 0.5] [--samples 1500] [--first 0] [--subjects 1] [--held-out 48]
        [--vae FILE] [--device cuda]
    python -m tools.motion_run train --work W [--mix W2 ...] --network mmdit-pooled [--init FILE] [--batch 32]
        [--seconds 300] [--every 500] [--dropout TEXT REFERENCE] [--schedule cosine] [--ema 0.998] [--clip]
        [--encoding-dropout VAE CLIP] [--pooled] [--text-positions] [--reference-index] [--key-mask T]
        [--temporal-weight W] [--precision bf16] [--resume] [--device cuda] --out RUN

``cache`` (``tools.motion_cache``) renders the world's triplets (``WorldConfig.travel``: how far the subjects move) in
``--workers`` processes and encodes them with the shipped world VAE (or ``--vae``'s, e.g. ``TRAINED_NEXT_VAE``) and
umT5 (``phantom_core/tiny/trained``, copied into ``W``; the VAE on ``--device``, the umT5 in float32 on the CPU, as
sampling runs it): ``W/latents`` (training subjects, the recipe's seed) and ``W/held_out/latents`` (single-subject
scenes of held-out subjects), each with ``index.json`` as ``default_model.stage_latents`` writes it. ``--subjects N``
gives every training scene N subjects instead of the world's mix of one to three (recorded in the index). Training
samples go in chunks of 150, each chunk's index written atomically, and no chunk starts after ``--deadline`` seconds:
a run stopped early keeps a usable cache.

``train`` trains ``--network`` (``tools.motion_toy.build_network``: ``phantom-wan``, ``mmdit``, ``mmdit-pos``,
``mmdit-pooled``, ``mmdit-clip-pooled``) from scratch, or ``--init`` (any DiT or MMDiT file), on ``W``'s training
triplets and those of each ``--mix`` cache (say a two-subject cache beside a one-subject one), with the general trainer
(the world recipe's ``DIT_TRAIN``: shift 5, text / reference dropout 0.2 / 0.1, at a constant learning rate after its
warm-up, so that a run stopped by ``--seconds`` ends where it would have gone on; ``--dropout`` replaces the two
dropouts). A cool-down run instead gives ``--schedule cosine`` (the learning rate falls to 0 at ``--steps``) and ``--ema
DECAY`` (the trainer's average of the weights, ``training.ema``, becomes the final file; the probes read the current
weights, and a run with ``--ema`` refuses ``--seconds``, which would end it without the average). ``--clip`` trains the
paper's *both* network (an ``--init`` MMDiT with a CLIP branch, e.g. the shipped ``default-mmdit``, or from scratch
``--network mmdit-clip-pooled``; Phantom Eq. 1 and 2): each cache's references are rendered again from its index and
encoded by the shipped world CLIP, or ``--clip-vision``'s (``mmdit_default.stage_clip_features``, resumable, cached
beside the latents: one tower per cache), the recipe's VAE-reference dropout 0.7 applies (``--encoding-dropout VAE
CLIP`` sets it and the trainer's ``clip_reference_dropout``), and the probe feeds the features too. ``--pooled`` gives
the ``--init`` MMDiT the pooled text and reference vectors (``mmdit_default.with_pooled_vectors`` from seed 0: zero at
first, so the run starts from the file's own velocity), ``--text-positions`` the learned text positions
(``with_text_positions``: a scaled sin-cos start), ``--reference-index`` a learned index on each reference's VAE tokens
(``with_reference_index``), ``--key-mask T`` keeps each reference's letterbox out of the keys
(``with_reference_key_mask``); from scratch the last three are fields of the fresh MMDiT's config from its first step
(``start_model``; ``--pooled`` is then the network's name). ``--temporal-weight W`` adds W times
``training.objective.temporal_mse`` (the error of the clean estimate's change from frame to frame, where a subject's
motion is) to the plain velocity loss. Every ``--every`` steps and at the end it runs ``tools.motion_probe.probe``
(sigma 0.95 and 0.85, 2 draws) on ``--probe`` moving single-subject triplets of the training cache and of the held-out
cache and prints the text effect (latent px; the truth's displacement beside it), and where ``--work`` or a ``--mix``
cache has two-subject triplets, ``binding_probe``'s ``binding_probe`` and ``placement_probe`` on ``--probe`` of them
(the first such cache's). It writes ``RUN.safetensors`` (the trainer's file), ``RUN_fp16.safetensors`` (a half-size
copy: a device machine returns files up to 16 MiB) and ``RUN_curve.json`` (every probe so far, rewritten atomically
after each). The trainer writes a checkpoint (``RUN_run/checkpoints``, the latest kept) at every probe, so a run stopped
by ``--seconds`` or killed goes on with ``--resume`` (the same command) from its last probe, with the same data order,
noise and optimiser state; the curve keeps the rows up to that step (``seconds`` in a row counts from the start of the
invocation that measured it). ``--precision bf16`` trains under the trainer's bf16 autocast (the weights and files stay
float32; for a GPU: on a 2-core CPU with AVX512-BF16 the world MMDiT at batch 8 ran no faster than in fp32, 0.84 s a
step against 0.83). docs/WORLD.md has what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tools.motion_cache import HELD_OUT_SEED, cache, vae_error

CLIP_FILE = "phantom_world_clip.safetensors"  # the shipped world CLIP (phantom_core/tiny/trained)
PROBE_SIGMAS = (0.95, 0.85)


def training_latents(works: list[Path], clip: bool = False):
    """The training caches of ``works`` (``cache``'s ``W/latents``) as one in-memory dataset; ``clip``: each sample
    with its references' CLIP features from its own cache's table (``clip_features`` must have run on every cache;
    the caches' sample names repeat, so one table for all would hand a sample another cache's references).

    Raises:
        ValueError: a cache whose dropped-prompt context differs from the first's (another text encoder), one
            with no index, or (``clip``) a sample without features.
    """
    from phantom_core.training.cache import CachedLatents, InMemoryLatents
    from phantom_core.world.default_model import LATENT_INDEX, latent_files

    parts, dropped = [], None
    for work in works:
        if not (work / LATENT_INDEX).is_file():
            raise ValueError(f"--work / --mix {work}: no {LATENT_INDEX}; run `motion_run cache --work {work}` first")
        more, context = latent_files(work)
        if dropped is None:
            dropped = context
        elif context.shape != dropped.shape or not torch.allclose(context, dropped, rtol=1e-4, atol=1e-5):
            raise ValueError(f"--mix {work}: its dropped-prompt context differs from {works[0]}'s (another text "
                             "encoder); mix caches made with the same umT5")
        parts.append(more)
    if not clip:
        return CachedLatents([f for more in parts for f in more], dropped, in_memory=True)
    from phantom_core.world.mmdit_default import clip_feature_table, with_clip_features

    samples = []
    for work, more in zip(works, parts):
        data = with_clip_features(CachedLatents(more, dropped, in_memory=True), clip_feature_table(work))
        samples += [data[i] for i in range(len(data))]
    return InMemoryLatents(samples, dropped)


def clip_features(work: Path, mix: list[Path], clip: Path) -> None:
    """The references' CLIP features (the world CLIP tower ``clip``, ``mmdit_default.stage_clip_features``:
    resumable) of ``work``'s and each ``mix`` cache's training triplets and of ``work``'s held-out ones."""
    from phantom_core.world.mmdit_default import stage_clip_features

    for folder in (work, *mix):
        stage_clip_features(folder, clip)
    stage_clip_features(work / "held_out", clip, split="test", seed=HELD_OUT_SEED)


class _Stop(Exception):  # raised by the training callback when --seconds have passed; carries the step reached
    pass


def start_model(args: argparse.Namespace) -> torch.nn.Module:
    """The network a run starts from (float32, CPU, in train mode), before the trainer restores a ``--resume``
    checkpoint into it: ``--init``'s file with ``--pooled`` / ``--text-positions`` / ``--reference-index`` /
    ``--key-mask`` added (``mmdit_default.with_*``: the file's velocity kept where they start at zero), or a fresh
    ``--network`` from ``--seed`` with those fields in its config from the first step (``init_weights``' sin-cos
    start for the positions and the index). Raises ``ValueError`` for the Phantom-Wan network with MMDiT fields."""
    from phantom_core.mmdit.load import load_any_dit
    from phantom_core.world import mmdit_default as extras
    from tools.motion_toy import build_network

    if not args.init:
        changes = {k: True for k in ("text_positions", "reference_index") if getattr(args, k)}
        changes.update({"reference_key_mask": args.key_mask} if args.key_mask else {})
        return build_network(args.network, args.seed, **changes).train()
    model = load_any_dit(args.init).float().train()
    for flag, add in (("pooled", extras.with_pooled_vectors), ("text_positions", extras.with_text_positions),
                      ("reference_index", extras.with_reference_index)):  # pooled: seed 0, whatever --seed
        if getattr(args, flag):
            model = add(model).train()
    return extras.with_reference_key_mask(model, args.key_mask).train() if args.key_mask else model


def train_run(args: argparse.Namespace, data) -> list[dict]:
    """Train on ``data`` (``training_latents``) and probe as the module says; returns the probe curve (also
    written to ``RUN_curve.json``)."""
    from safetensors.torch import load_file, save_file

    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.loading.disk import atomic_write
    from phantom_core.training.checkpoint import list_checkpoints
    from phantom_core.training.config import load_config
    from phantom_core.training.loop import train
    from phantom_core.training.model import save_output
    from phantom_core.wan.umt5 import load_text_encoder
    from phantom_core.world.default_model import DIT_TRAIN
    from tools.binding_probe import binding_probe, cache_pair_samples, placement_probe
    from tools.motion_probe import cache_samples, probe
    from tools.motion_toy import dropout_settings

    work, device, out = Path(args.work), torch.device(args.device), Path(args.out)
    model = start_model(args)
    settings = {**DIT_TRAIN, "dit": args.init or f"motion-run:{args.network}", "device": args.device,
                "precision": args.precision, "batch_size": args.batch, "steps": args.steps,
                "lr_schedule": args.schedule, "learning_rate": args.lr, "ema_decay": args.ema,
                "checkpoint_every": args.every, "keep_checkpoints": 1, "seed": args.seed,
                "temporal_weight": args.temporal_weight}
    settings.update(dropout_settings(args.dropout))
    if args.clip:  # the paper's both network: CLIP features in the text stream, the VAE-reference dropout
        from phantom_core.world.mmdit_default import CLIP_OUTPUT, MMDIT_VAE_DROPOUT

        vae, clip = args.encoding_dropout or (MMDIT_VAE_DROPOUT, 0.0)
        settings.update(clip_vision=str(args.clip_vision), clip_output=CLIP_OUTPUT, vae_reference_dropout=vae,
                        clip_reference_dropout=clip)
    config = load_config(None, **settings, out=str(out.with_suffix(".safetensors")), run_dir=f"{out}_run",
                         resume=args.resume, dropped_prompt=WAN_NEGATIVE_PROMPT)
    text_encoder = load_text_encoder(work / "umt5.safetensors")
    sets = {"train": cache_samples(work, args.probe, args.clip),
            "held": cache_samples(work / "held_out", args.probe, args.clip)}
    pairs = []  # two-subject triplets for the binding probe: those of the first cache that has them
    for folder in (work, *map(Path, args.mix)):
        pairs = pairs or cache_pair_samples(folder, args.probe, args.clip)
    contexts: dict[str, torch.Tensor] = {}

    def encode(caption: str) -> torch.Tensor:
        if caption not in contexts:
            contexts[caption] = text_encoder.encode([caption])[0]
        return contexts[caption]

    def dit(x, t, context, refs, ref_clip=None):  # the probe's CPU tensors in, the velocity back on the CPU
        clip = None if ref_clip is None else ref_clip.to(device)
        return model(x.to(device), t.to(device), context.to(device), refs.to(device), ref_clip=clip).float().cpu()

    curve_file = Path(f"{out}_curve.json")
    checkpoints = list_checkpoints(config.run_path / "checkpoints") if args.resume else []
    start = checkpoints[-1][0] if checkpoints else 0  # the step the trainer will resume from
    curve = [row for row in json.loads(curve_file.read_text(encoding="utf-8")) if row["step"] <= start] \
        if start and curve_file.is_file() else []
    started = time.perf_counter()

    def write_curve() -> None:
        with atomic_write(curve_file) as tmp:
            tmp.write_text(json.dumps(curve, indent=1), encoding="utf-8")

    def measure(step: int) -> None:
        model.eval()
        row = {"step": step, "seconds": round(time.perf_counter() - started, 1)}
        for tag, samples in sets.items():
            found = probe(dit, encode, samples, sigmas=PROBE_SIGMAS, draws=2)
            row[tag] = {str(s): {k: round(v, 3) for k, v in r.items()} for s, r in found.items()}
        if pairs:
            for key, found in (("binding", binding_probe(dit, encode, pairs, sigmas=PROBE_SIGMAS, draws=2)),
                               ("placement", placement_probe(dit, pairs, sigmas=PROBE_SIGMAS, draws=2))):
                row[key] = {str(s): {k: round(v, 3) for k, v in r.items()} for s, r in found.items()}
        model.train()
        curve.append(row)
        write_curve()
        text = "; ".join(f"{tag} effect {r['0.95']['effect']:.2f} of {r['0.95']['truth']:.2f} at sigma 0.95 "
                         f"(share {r['0.95']['share']:.0f}%), {r['0.85']['effect']:.2f} at 0.85"
                         for tag, r in ((t, row[t]) for t in sets))
        if pairs:
            b, q = row["binding"]["0.95"], row["placement"]["0.95"]
            text += (f"; two subjects at sigma 0.95: heard {b['heard']:.2f}, binding {b['effect']:.2f} of "
                     f"{b['truth']:.2f} (both right {b['share']:.0f}%), placement {q['placed']:.2f} (order "
                     f"{q['order']:.1f}% of the error, closer {q['closer']:.0f}%)")
        print(f"step {step} ({row['seconds']:.0f} s): {text}", flush=True)

    def callback(step: int, total: int, loss: float) -> None:
        if step % 100 == 0:
            print(f"step {step}/{total}: loss {loss:.4f}, {time.perf_counter() - started:.0f} s", flush=True)
        if step % args.every == 0:
            measure(step)
        if time.perf_counter() - started > args.seconds:
            raise _Stop(step)

    try:
        train(config, dataset=data, model=model, callback=callback)
        last = args.steps
    except _Stop as stop:
        last = stop.args[0]
        save_output(model, None, config, config.out, last)
    if not curve or curve[-1]["step"] != last:
        measure(last)
    final = load_file(str(config.out))  # the trainer's file: the EMA of the weights when --ema
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in final.items()}
    with atomic_write(f"{out}_fp16.safetensors") as tmp:
        save_file(half, str(tmp), metadata={"steps": str(last), "network": args.network})
    print(f"{last} steps in {time.perf_counter() - started:.0f} s: {out}.safetensors", flush=True)
    return curve


def main(argv: list[str] | None = None) -> int:
    from phantom_core.training.config import TRAIN_RANGES
    from phantom_core.world.render import MAX_TRAVEL, TRAVEL_FRACTION, check_travel
    from tools.motion_toy import NETWORKS, DropoutOption

    p = argparse.ArgumentParser(prog="python -m tools.motion_run", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="render and encode a world cache (training and held-out)")
    c.add_argument("--work", required=True)
    c.add_argument("--travel", type=float, default=TRAVEL_FRACTION, help=f"(0, {MAX_TRAVEL}], default %(default)s")
    c.add_argument("--samples", type=int, default=1000, help="training triplets (default %(default)s)")
    c.add_argument("--subjects", type=int, choices=(1, 2, 3), default=None,
                   help="subjects in every training scene (default: the world's mix of 1-3)")
    c.add_argument("--first", type=int, default=0, metavar="N",
                   help="the world's index of the first training scene (default 0): --first 450 beside a cache of "
                        "450 scenes gives other scenes of the same world")
    c.add_argument("--held-out", type=int, default=48,
                   help="held-out single-subject triplets (default %(default)s; 0: none, for a --mix cache)")
    c.add_argument("--workers", type=int, default=2, help="rendering processes (default %(default)s)")
    c.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no chunk starts")
    c.add_argument("--device", default="cpu", help="where the VAE encodes (default %(default)s)")
    c.add_argument("--vae", type=Path, default=None, metavar="FILE", help="encode with this world VAE (default: the "
                   "shipped default's); a --work holding another VAE's latents is refused")
    t = sub.add_parser("train", help="train a DiT on the cache, probing the motion word as it learns")
    t.add_argument("--work", required=True)
    t.add_argument("--mix", nargs="+", default=[], metavar="WORK",
                   help="more caches whose training triplets join --work's (the probe reads --work's)")
    t.add_argument("--network", choices=NETWORKS, default="mmdit-pooled")
    t.add_argument("--init", default="", help="start from this DiT / MMDiT file instead of a fresh --network")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--steps", type=int, default=100_000, help="at most (default %(default)s)")
    t.add_argument("--seconds", type=float, default=float("inf"), help="stop after this long (default: never)")
    t.add_argument("--every", type=int, default=500, help="probe every N steps (default %(default)s)")
    t.add_argument("--probe", type=int, default=24, help="triplets per probe set (default %(default)s)")
    t.add_argument("--dropout", type=float, nargs=2, metavar=("TEXT", "REFERENCE"), action=DropoutOption,
                   help="text and reference dropout probabilities (default: the recipe's)")
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="the learning rate after the warm-up: constant, or a cosine to 0 at --steps")
    t.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="write the EMA of the weights with this decay as the final file (default: none)")
    t.add_argument("--pooled", action="store_true",
                   help="add the pooled text and reference vectors to an --init MMDiT (zero at first: it starts as it)")
    t.add_argument("--text-positions", action="store_true",
                   help="learned text positions in the MMDiT (mmdit_default.with_text_positions: a sin-cos "
                        "table x 0.3 to start)")
    t.add_argument("--reference-index", action="store_true",
                   help="a learned index on each reference's VAE tokens "
                        "(--init: mmdit_default.with_reference_index, its CLIP index embedding's values to start)")
    t.add_argument("--key-mask", type=float, default=0.0, metavar="T",
                   help="keep the references' letterbox out of the MMDiT's keys (with_reference_key_mask)")
    t.add_argument("--clip", action="store_true",
                   help="the references' CLIP features too (the shipped world CLIP; an --init with a CLIP branch, "
                        "or --network mmdit-clip-pooled)")
    t.add_argument("--encoding-dropout", type=float, nargs=2, metavar=("VAE", "CLIP"), default=None,
                   help="--clip: the probabilities that a sample's VAE latents / CLIP features alone are zeroed (one "
                        "draw, never both; default: the paper's 0.7 / 0)")
    t.add_argument("--clip-vision", type=Path, default=None, metavar="FILE",
                   help="--clip: the world CLIP tower (default: the shipped one; tools.train_default gives its own)")
    t.add_argument("--temporal-weight", type=float, default=0.0, metavar="W",
                   help="add W x the MSE of the clean estimate's frame-to-frame change to the loss "
                        "(training.objective.temporal_mse; default 0: the plain loss)")
    t.add_argument("--resume", action="store_true",
                   help="go on from the run's latest checkpoint (written at every probe), if it has one")
    t.add_argument("--seed", type=int, default=11079)
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the trainer's bf16 autocast, for a GPU (the world MMDiT ran no faster with it on "
                        "a CPU with AVX512-BF16) (default %(default)s)")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", required=True, help="the run's path without suffix")
    args = p.parse_args(argv)
    if args.command == "cache":
        try:
            check_travel(args.travel)
        except ValueError as err:
            p.error(f"--travel: {err}")
        for name, low in (("samples", 1), ("first", 0), ("held_out", 0), ("workers", 1)):
            if getattr(args, name) < low:
                p.error(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be >= {low}")
        if (message := vae_error(args.vae, Path(args.work))) is not None:
            p.error(message)
        cache(args)
        return 0
    for name in ("batch", "steps", "every", "probe"):
        if getattr(args, name) < 1:
            p.error(f"--{name} is {getattr(args, name)}; it must be >= 1")
    if not 0 <= args.key_mask < 1:
        p.error(f"--key-mask is {args.key_mask}; a fraction in [0, 1) of each reference's largest patch distance")
    for flag, value, field in (("--ema", args.ema, "ema_decay"), ("--temporal-weight", args.temporal_weight,
                                                                  "temporal_weight")):
        if (message := TRAIN_RANGES[field].error(flag, value)) is not None:
            p.error(message)
    if args.pooled and not args.init:
        p.error("--pooled adds the pooled vectors to an --init MMDiT; from scratch, give --network mmdit-pooled")
    mmdit_fields = [f"--{flag.replace('_', '-')}" for flag in ("text_positions", "reference_index", "key_mask")
                    if getattr(args, flag)]
    if mmdit_fields and not args.init and args.network == "phantom-wan":
        p.error(f"{', '.join(mmdit_fields)}: MMDiT fields; the phantom-wan network has none (give an MMDiT --network)")
    if args.ema and args.seconds != float("inf"):
        p.error("--ema with --seconds: a run stopped on time has no final average; give --steps instead")
    for flag, given in (("--clip-vision", args.clip_vision is not None), ("--encoding-dropout", args.encoding_dropout)):
        if given and not args.clip:
            p.error(f"{flag} is for the CLIP features of --clip; give --clip too")
    if args.encoding_dropout and not (min(args.encoding_dropout) >= 0 and sum(args.encoding_dropout) <= 1):
        p.error(f"--encoding-dropout is {args.encoding_dropout}; two probabilities >= 0 whose sum is at most 1")
    if args.clip:
        from phantom_core.tiny.default import TRAINED_DIR

        args.clip_vision = args.clip_vision or TRAINED_DIR / CLIP_FILE
        if not args.clip_vision.is_file():
            p.error(f"--clip-vision: {args.clip_vision} is not a file (a world CLIP tower, .safetensors)")
        if not args.init and args.network != "mmdit-clip-pooled":
            p.error(f"--clip from scratch needs a CLIP branch: --network mmdit-clip-pooled, not {args.network}")
    try:
        if args.clip:
            clip_features(Path(args.work), [Path(m) for m in args.mix], args.clip_vision)
        data = training_latents([Path(args.work), *map(Path, args.mix)], args.clip)
    except ValueError as err:
        p.error(str(err))
    torch.set_num_threads(args.threads)
    train_run(args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
