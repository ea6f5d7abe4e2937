"""Does amplifying what the order of the references changes place two looks better? ``evaluate`` with order guidance.

    python -m tools.order_guidance --weight 2 [evaluate's options: --dit D --vae V --text-encoder T ...]

An experiment, not a sampler setting. ``binding_probe.placement_probe`` finds MMDiTs whose one-step estimate puts each
reference's look where its own subject is, but by a few % of the estimate's error, and their sampled videos place the
looks at chance (docs/WORLD.md, fifteenth session). As classifier-free guidance (Ho & Salimans, arXiv 2207.12598)
amplifies what a condition changes, this amplifies what the references' order changes: every model call that has two
or more references (the passes of Phantom's Eq. 5 with references: ``v_text_img``, ``v_img``) returns

    v' = v + w (v - v_reversed)

where ``v_reversed`` is the same call with the references (VAE latents and CLIP features) in reverse order, and the
sampler combines the ``v'`` as Eq. 5 does. Calls without references (``v_neg``, all-zero references) and with one
reference are unchanged, so one-subject cases sample exactly as without it. It costs one more model evaluation for
each call that has references. ``--weight 0`` is plain ``evaluate`` (the same model calls, the same noise).
"""

from __future__ import annotations

import argparse
import sys

from torch import Tensor, nn


class OrderGuided(nn.Module):
    """A velocity model (``model(x, t, context, ref_latents, ref_clip=None)``, either network) whose calls with two or
    more references are amplified along their order: ``v + weight * (v - v_reversed)`` (see the module), per batch
    row, rows whose references are all zero (the ``v_neg`` pass) unchanged. Any other attribute is the wrapped
    model's (``config``, ``dtype`` ...), so the sampler and ``evaluate`` treat it as the model.

    Raises:
        ValueError: ``weight`` negative or not finite.
    """

    def __init__(self, model: nn.Module, weight: float) -> None:
        if not (weight >= 0 and weight != float("inf")):
            raise ValueError(f"order guidance weight is {weight}; it must be a finite number >= 0")
        super().__init__()
        self.inner, self.weight = model, float(weight)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, ref_latents: Tensor | None = None,
                ref_clip: Tensor | None = None, **kwargs) -> Tensor:
        """``x`` ``[B, 16, F, h, w]``, ``ref_latents`` ``[B, 16, N, h, w]``, ``ref_clip`` ``[B, N, T, C]`` or None;
        returns the (amplified) velocity, shaped and typed as the model's."""
        extra = {} if ref_clip is None else {"ref_clip": ref_clip}
        v = self.inner(x, t, context, ref_latents, **extra, **kwargs)
        if ref_latents is None or ref_latents.shape[2] < 2 or not self.weight:
            return v
        if ref_clip is not None:
            extra = {"ref_clip": ref_clip.flip(1)}
        v_reversed = self.inner(x, t, context, ref_latents.flip(2), **extra, **kwargs)
        has_refs = (ref_latents.flatten(1).abs().sum(1) > 0).to(v.dtype).view(-1, *([1] * (v.ndim - 1)))  # (B, 1...)
        return v + self.weight * has_refs * (v - v_reversed)


def main(argv: list[str] | None = None) -> int:
    import phantom_core.world.cli as world_cli
    from phantom_core.__main__ import main as phantom_main

    p = argparse.ArgumentParser(prog="python -m tools.order_guidance", description=__doc__.split("\n")[0],
                                epilog="Every other option is evaluate's (python -m phantom_core evaluate --help).")
    p.add_argument("--weight", type=float, required=True, help="w of v + w (v - v_reversed); 0: plain evaluate")
    args, rest = p.parse_known_args(argv)
    if not (args.weight >= 0 and args.weight != float("inf")):
        p.error(f"--weight is {args.weight}; it must be a finite number >= 0")
    load = world_cli._load

    def guided_load(*a, **k):
        dit, *others = load(*a, **k)
        return (OrderGuided(dit, args.weight), *others)

    world_cli._load = guided_load
    try:
        return phantom_main(["evaluate", *rest])
    finally:
        world_cli._load = load


if __name__ == "__main__":
    sys.exit(main())
