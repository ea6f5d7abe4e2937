"""The world caches that ``tools.motion_run train`` reads: ``python -m tools.motion_run cache`` (its CLI) renders the
world's triplets and encodes them with a world VAE and the shipped umT5, resumable by chunks (``motion_run``'s docstring
says how; docs/WORLD.md what was measured on them).
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

CHUNK = 150  # training scenes per chunk: each chunk's index is written atomically, so a stopped run keeps a cache
HELD_OUT_SEED = 777  # the held-out scenes' seed (split "test"), one for every cache


def render(job: tuple[str, int, int, float, int | None]):
    """Worker: ``(split, seed, index, travel, subjects)`` -> that world's ``RawSample`` (subjects None: the mix)."""
    from phantom_core.world.default_model import WORLD, _raw_samples

    split, seed, index, travel, subjects = job
    torch.set_num_threads(1)
    return next(_raw_samples([index], replace(WORLD, travel=travel), split, seed, subjects))


def cache(args: argparse.Namespace) -> None:
    """``motion_run cache``: copy the VAE (``args.vae`` or the shipped one) and umT5 into ``args.work`` unless there,
    then render and encode the held-out and training triplets chunk by chunk (each chunk's index written at once)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from phantom_core.inference.settings import WAN_NEGATIVE_PROMPT
    from phantom_core.tiny.default import TRAINED_FILES, trained_file
    from phantom_core.training.cache import build_cache
    from phantom_core.world import default_model as recipe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shipped = {role: trained_file(relative) for role, relative in TRAINED_FILES.items()}
    for name, source in ((recipe.VAE_STAGE_FILE, args.vae or shipped["vae"]),
                         (recipe.TEXT_STAGE_FILE, shipped["text_encoder"])):
        if not (work / name).is_file():
            shutil.copyfile(source, work / name)
    load, fingerprints = recipe._encoders(work)
    device = torch.device(args.device)

    def encoders():  # the VAE encodes on --device and gives float32 latents back on the CPU; not an nn.Module, so
        vae, text_encoder = load()  # references.encode_references hands it CPU pixels
        vae = vae.to(device)
        return SimpleNamespace(encode=lambda video: vae.encode(video.to(device)).float().cpu()), text_encoder

    started, fmt = time.perf_counter(), recipe.WORLD.video
    held = [("test", HELD_OUT_SEED, i, args.travel, 1) for i in range(args.held_out)]
    end = args.first + args.samples
    chunks = [(work / "held_out" / recipe.LATENT_DIR, 1, held)] * bool(held) + [
        (work / recipe.LATENT_DIR, args.subjects, [("train", recipe.RECIPE_SEED + 4, i, args.travel, args.subjects)
                                    for i in range(a, min(a + CHUNK, end))])
        for a in range(args.first, end, CHUNK)]
    files: dict[Path, list[str]] = {}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for folder, subjects, jobs in chunks:
            if files.get(folder) and time.perf_counter() - started > args.deadline:
                print(f"deadline: {len(files[folder])} training samples cached", flush=True)
                break
            data, bad = build_cache(pool.map(render, jobs, chunksize=4), folder, encoders=encoders,
                                    fingerprints=fingerprints, frames=fmt.frames, width=fmt.width,
                                    height=fmt.height, dropped_prompt=WAN_NEGATIVE_PROMPT)
            files.setdefault(folder, []).extend(p.name for p in data.files)
            recipe.write_latent_index(folder, files[folder], args.travel, subjects)
            print(f"{folder}: {len(files[folder])} cached, {len(bad)} skipped, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)


def vae_error(vae: Path | None, work: Path) -> str | None:
    """Why ``cache --vae`` cannot encode ``work`` with ``vae`` (not a file; ``work`` holds another VAE's latents)."""
    from phantom_core.world.default_model import VAE_STAGE_FILE

    if vae is None:
        return None
    if not vae.is_file():
        return f"--vae: {vae} is not a file"
    held = work / VAE_STAGE_FILE  # the VAE whose latents are cached there
    if held.is_file() and held.read_bytes() != vae.read_bytes():
        return f"--vae: {held} holds another VAE (the latents in {work} are its); give a new --work for {vae}'s"
    return None
