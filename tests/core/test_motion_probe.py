"""tools.motion_probe: its path and displacement arithmetic, and that it tells a DiT that reads the motion word from
one that does not (synthetic velocity models with a known clean estimate)."""

from __future__ import annotations

import pytest
import torch

from phantom_core.training.cache import LatentSample
from tools.binding_probe import (
    binding_probe,
    pair_motions,
    placement_probe,
    same_motions,
    subject_regions,
    swap_motions,
)
from tools.motion_probe import (
    change_background,
    displacement,
    encoding_probe,
    latent_path,
    probe,
    reverse_motion,
    single_motion,
    token_gradients,
    token_roles,
)

FRAMES, SIDE = 5, 16


def blob_latents(motion: str, step: float = 1.5, level: float = 2.0) -> torch.Tensor:
    """``[16, F, h, w]``: a flat background of 0.3 with a 3 x 3 square of ``level`` whose corner moves ``step`` latent
    px a frame towards ``motion`` (rounded to whole px), from the centre."""
    x = torch.full((16, FRAMES, SIDE, SIDE), 0.3)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
    for f in range(FRAMES):
        cx, cy = 6 + round(dx * step * f), 6 + round(dy * step * f)
        x[:, f, cy:cy + 3, cx:cx + 3] = level
    return x


def test_latent_path_and_displacement_follow_a_moving_square():
    x = blob_latents("right", step=1.0)
    path = latent_path(x)
    assert path.shape == (FRAMES, 2)
    assert torch.allclose(path[:, 0], torch.tensor([7.0, 8, 9, 10, 11]), atol=1e-4)  # x centre of columns 6-8, ...
    assert torch.allclose(path[:, 1], torch.full((FRAMES,), 7.0), atol=1e-4)
    assert displacement(x, "right") == pytest.approx(4.0, abs=1e-4)
    assert displacement(x, "left") == pytest.approx(-4.0, abs=1e-4)
    assert displacement(blob_latents("up"), "up") == pytest.approx(6.0, abs=1e-4)


def test_captions():
    assert single_motion("a cat face moves left on a blue background") == "left"
    assert single_motion("a small red star stays still on a white background") is None
    assert single_motion("a cat moves left and a dog moves up on a red background") is None
    assert single_motion("fork and knife moves down on a black background") == "down"
    assert reverse_motion("a cat moves up on a blue background", "up") == "a cat moves down on a blue background"


class FakeDiT:
    """A velocity model whose clean estimate is a square moving the way its context's first value says
    (``reads_text``), or always the cached sample's true motion's square at rest (``reads_text=False``)."""

    def __init__(self, reads_text: bool):
        self.reads_text = reads_text

    def __call__(self, x, t, context, ref_latents):
        sigma = float(t[0]) / 1000.0
        motion = {1.0: "left", -1.0: "right"}[float(context[0, 0, 0])] if self.reads_text else "left"
        x0 = blob_latents(motion, step=1.5 if self.reads_text else 0.0)[None]
        return (x - x0) / sigma  # x_t - sigma v = x0


def test_probe_tells_a_text_reading_dit_from_one_that_ignores_the_word():
    contexts = {"left": torch.ones(4, 8), "right": -torch.ones(4, 8)}
    caption = "a cat moves left on a blue background"
    sample = LatentSample("s", blob_latents("left"), torch.zeros(16, 1, SIDE, SIDE), contexts["left"])
    encode = {reverse_motion(caption, "left"): contexts["right"]}.__getitem__
    reading = probe(FakeDiT(True), encode, [(caption, "left", sample)] * 3, sigmas=(0.9,))[0.9]
    assert reading["truth"] == pytest.approx(6.0, abs=1e-3)  # 4 frames x 1.5 px, rounded: 0, 2, 3, 4(.5->4), 6
    assert reading["own"] == pytest.approx(6.0, abs=1e-3) and reading["reversed"] == pytest.approx(-6.0, abs=1e-3)
    assert reading["effect"] == pytest.approx(6.0, abs=1e-3) and reading["share"] == 100.0
    ignoring = probe(FakeDiT(False), encode, [(caption, "left", sample)] * 3, sigmas=(0.9,))[0.9]
    assert ignoring["effect"] == pytest.approx(0.0, abs=1e-4) and ignoring["share"] == 0.0


class ResidualDiT(FakeDiT):
    """``FakeDiT`` whose estimate keeps a quarter of the noise (a velocity model that does not remove it all) and
    whose background level is the context's second value (the background word)."""

    def __call__(self, x, t, context, ref_latents):
        sigma = float(t[0]) / 1000.0
        x0 = x - sigma * super().__call__(x, t, context, ref_latents)
        x0 = x0 + float(context[0, 0, 1]) - 0.3  # the background of blob_latents is 0.3
        noise = (x - (1 - sigma) * x0) / sigma
        return (x - (x0 + 0.25 * noise)) / sigma


def test_controls_and_draws():
    """The background word changes the estimate of any model (the positive control); the motion word changes only a
    reading model's; averaging draws removes the leftover noise from the displacement."""
    assert change_background("a cat moves up on a blue background") == "a cat moves up on a yellow background"
    assert change_background("a cat moves up on a white background.") == "a cat moves up on a red background"
    caption = "a cat moves left on a blue background"
    left, right, green = torch.ones(4, 8), -torch.ones(4, 8), torch.ones(4, 8)
    left[:, 1], right[:, 1], green[:, 1] = 0.3, 0.3, 1.3
    sample = LatentSample("s", blob_latents("left"), torch.zeros(16, 1, SIDE, SIDE), left)
    encode = {reverse_motion(caption, "left"): right, change_background(caption): green}.__getitem__
    runs = {}
    for reads in (True, False):
        for draws in (1, 16):
            runs[reads, draws] = probe(ResidualDiT(reads), encode, [(caption, "left", sample)] * 2, sigmas=(0.9,),
                                       draws=draws, controls=True)[0.9]
    for draws in (1, 16):
        assert runs[False, draws]["motion_change"] == pytest.approx(0.0, abs=1e-4)
        assert runs[False, draws]["background_change"] > 50.0 and runs[True, draws]["background_change"] > 50.0
        assert runs[True, draws]["motion_change"] > 50.0
    # the leftover noise pulls the centroid towards the middle; the mean of 16 draws pulls it less
    assert abs(runs[True, 16]["own"] - 6.0) < abs(runs[True, 1]["own"] - 6.0)
    with pytest.raises(ValueError, match="draws is 0"):
        probe(ResidualDiT(True), encode, [(caption, "left", sample)], sigmas=(0.9,), draws=0)


def test_token_roles_and_gradient_shares():
    """The motion word's and the background word's pieces are found (final period or not), and the gradient shares
    follow what a velocity model reads: all on the motion word for one that reads only it."""
    import sentencepiece

    from phantom_core.tiny.text import train_tiny_tokenizer
    from phantom_core.wan.umt5 import tokenize_prompt

    sp = sentencepiece.SentencePieceProcessor(model_proto=train_tiny_tokenizer())
    for caption in ("a red striped star moves left on a blue background", "a cat moves up on a white background."):
        ids, roles = tokenize_prompt(sp, caption), token_roles(sp, caption)
        assert len(roles) == len(ids) and roles[-1] == "other"
        text = {role: "".join(sp.id_to_piece(i) for i, r in zip(ids, roles) if r == role).replace("\u2581", "")
                for role in ("motion", "background")}
        assert text == ({"motion": "left", "background": "blue"} if "left" in caption
                        else {"motion": "up", "background": "white"})

    caption = "a cat moves left on a blue background"
    roles = token_roles(sp, caption)
    reads = torch.tensor([r == "motion" for r in roles], dtype=torch.float32)

    def motion_reader(x, t, context, ref_latents):
        return x * 0 + (context[0] * reads[:, None]).sum()  # depends on the motion word's tokens only

    context = torch.randn(len(roles), 8, generator=torch.Generator().manual_seed(0))
    sample = LatentSample("s", blob_latents("left"), torch.zeros(16, 1, SIDE, SIDE), context)
    shares = token_gradients(motion_reader, sp, [(caption, "left", sample)])
    assert shares["motion"] == pytest.approx(100.0, abs=1e-3) and shares["background"] == pytest.approx(0.0, abs=1e-6)
    assert shares["uniform"] == pytest.approx(100.0 / len(roles))


def two_blobs(motions: tuple[str, str], vertical: bool, step: float = 1.0) -> torch.Tensor:
    """``[16, F, h, w]``: two 3 x 3 squares of 2.0 on 0.3, each moving ``step`` latent px a frame as its motion says
    (``still``: at rest). ``vertical``: up-down motions, the first square in the left half and the second in the
    right; else left-right motions, the first in the top half and the second in the bottom (the anchored layout's
    first subject is the higher one)."""
    x = torch.full((16, FRAMES, SIDE, SIDE), 0.3)
    starts = ((3, 6), (10, 6)) if vertical else ((6, 3), (6, 10))  # (x, y) of each square's corner at rest
    units = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
    for (x0, y0), motion in zip(starts, motions):
        dx, dy = units[motion]
        for f in range(FRAMES):
            cx, cy = x0 + round(dx * step * (f - 2)), y0 + round(dy * step * (f - 2))  # centred on its start
            x[:, f, cy:cy + 3, cx:cx + 3] = 2.0
    return x


class PairDiT:
    """A velocity model whose clean estimate is ``two_blobs`` of the motions its context encodes (context[0, 0, :2]
    as indices into MOTIONS): ``bound`` (each subject its own clause's), ``swapped`` (each the other clause's) or
    ``deaf`` (both at rest, whatever the words)."""

    MOTIONS = ("left", "right", "up", "down", "still")

    def __init__(self, mode: str, vertical: bool):
        self.mode, self.vertical = mode, vertical

    def __call__(self, x, t, context, ref_latents):
        sigma = float(t[0]) / 1000.0
        motions = tuple(self.MOTIONS[int(i)] for i in context[0, 0, :2])
        motions = {"bound": motions, "swapped": motions[::-1], "deaf": ("still", "still")}[self.mode]
        return (x - two_blobs(motions, self.vertical)[None]) / sigma


def pair_encoder():
    """``encode(caption)``: a context whose first two values index the caption's two motions in PairDiT.MOTIONS."""
    from phantom_core.world.grammar import parse_prompt

    def encode(caption: str) -> torch.Tensor:
        context = torch.zeros(4, 8)
        context[0, :2] = torch.tensor([float(PairDiT.MOTIONS.index(s.motion)) for s in parse_prompt(caption).subjects])
        return context

    return encode


def test_pair_captions():
    caption = "a cat moves left and a small red star stays still on a blue background"
    assert pair_motions(caption) == ("left", "still")
    assert swap_motions(caption) == "a cat stays still and a small red star moves left on a blue background"
    assert same_motions(caption, "up") == "a cat moves up and a small red star moves up on a blue background"
    assert pair_motions("a cat moves up and a dog moves down on a red background") == ("up", "down")
    assert pair_motions("a cat moves up and a dog moves up on a red background") == ("up", "up")  # heard, not bound
    assert pair_motions("a cat moves up and a dog moves left on a red background") is None  # two axes
    assert pair_motions("a cat stays still and a dog stays still on a red background") is None  # nothing moves
    assert pair_motions("a cat moves up on a red background") is None  # one subject
    assert pair_motions("not a world prompt") is None


@pytest.mark.parametrize("vertical", [False, True])
def test_binding_probe_tells_a_bound_dit_from_a_swapped_and_a_deaf_one(vertical):
    pairs = [("right", "left"), ("still", "left"), ("right", "still")] if not vertical else \
        [("up", "down"), ("down", "still"), ("still", "up")]
    captions = [f"a cat {'stays still' if a == 'still' else 'moves ' + a} and a dog "
                f"{'stays still' if b == 'still' else 'moves ' + b} on a red background" for a, b in pairs]
    encode = pair_encoder()
    samples = [(c, m, LatentSample("s", two_blobs(m, vertical), torch.zeros(16, 2, SIDE, SIDE), encode(c)))
               for c, m in zip(captions, pairs)]
    regions = subject_regions(samples[0][2].latents, pairs[0])
    assert regions[0].sum() == regions[1].sum() == SIDE * SIDE // 2 and not (regions[0] & regions[1]).any()
    results = {mode: binding_probe(PairDiT(mode, vertical), encode, samples, sigmas=(0.9,))[0.9]
               for mode in ("bound", "swapped", "deaf")}
    truth = 4.0  # 4 frames x 1 latent px
    assert results["bound"]["truth"] == pytest.approx(truth, abs=1e-3)
    bound, swapped, deaf = results["bound"], results["swapped"], results["deaf"]
    assert bound["first"] == pytest.approx(truth, abs=1e-3) and bound["second"] == pytest.approx(truth, abs=1e-3)
    assert bound["share"] == 100.0 and bound["pairs"] == 3
    assert bound["heard"] == pytest.approx(truth, abs=1e-3)
    assert swapped["effect"] == pytest.approx(-truth, abs=1e-3) and swapped["share"] == 0.0
    assert deaf["effect"] == pytest.approx(0.0, abs=1e-4) and deaf["heard"] == pytest.approx(0.0, abs=1e-4)
    assert deaf["share"] == 0.0


def test_binding_probe_refuses_nothing_to_read():
    with pytest.raises(ValueError, match="no two-subject samples"):
        binding_probe(PairDiT("bound", False), pair_encoder(), [], sigmas=(0.9,))
    with pytest.raises(ValueError, match="draws is 0"):
        binding_probe(PairDiT("bound", False), pair_encoder(), [], sigmas=(0.9,), draws=0)


def two_looks(colours: torch.Tensor) -> torch.Tensor:
    """``[16, F, h, w]``: ``two_blobs``' left-right layout at rest, the top square in ``colours[0]`` and the bottom one
    in ``colours[1]`` (``[2, 16]``)."""
    x = torch.zeros(16, FRAMES, SIDE, SIDE)
    for (cx, cy), colour in zip(((6, 3), (6, 10)), colours):
        x[:, :, cy:cy + 3, cx:cx + 3] = colour[:, None, None, None]
    return x


class LookDiT:
    """A velocity model whose clean estimate draws its references' looks (each reference latent's mean per channel)
    at the two places: reference k on top when ``ordered`` (as the truth), the other way round when ``reversed``,
    their average in both when ``bag``. Takes the CLIP features too and ignores them."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, x, t, context, ref_latents, ref_clip=None):
        looks = ref_latents[0].mean((2, 3)).T  # (2, 16)
        looks = {"ordered": looks, "reversed": looks.flip(0), "bag": looks.mean(0).expand(2, 16)}[self.mode]
        return (x - two_looks(looks)[None]) / (float(t[0]) / 1000.0)


def test_placement_probe_tells_an_ordered_dit_from_a_reversed_and_a_bag_of_references():
    gen = torch.Generator().manual_seed(3)
    samples = []
    for k in range(3):
        colours = torch.randn(2, 16, generator=gen)
        refs = colours.T[:, :, None, None].expand(16, 2, SIDE, SIDE).clone()
        samples.append(("caption", ("left", "right"), LatentSample(f"s{k}", two_looks(colours), refs, torch.zeros(4, 8),
                                                                     torch.randn(2, 3, 8, generator=gen))))
    results = {mode: placement_probe(LookDiT(mode), samples, sigmas=(0.9,), draws=2)[0.9]
               for mode in ("ordered", "reversed", "bag")}
    assert results["ordered"]["placed"] == pytest.approx(1.0, abs=1e-4) and results["ordered"]["closer"] == 100.0
    assert results["reversed"]["placed"] == pytest.approx(-1.0, abs=1e-4) and results["reversed"]["closer"] == 0.0
    assert results["ordered"]["order"] > 100  # an exact estimate: the order's change is far above its (rounding) error
    assert results["bag"]["order"] == pytest.approx(0.0, abs=1e-6) and results["bag"]["placed"] == 0.0
    with pytest.raises(ValueError, match="no two-subject samples"):
        placement_probe(LookDiT("bag"), [], sigmas=(0.9,))
    with pytest.raises(ValueError, match="draws is 0"):
        placement_probe(LookDiT("bag"), samples, sigmas=(0.9,), draws=0)


class OneEncodingDiT:
    """A velocity model whose clean estimate is a flat latent of its CLIP features' mean (``reads="clip"``) or of its
    VAE reference latents' mean (``"vae"``), the other encoding ignored."""

    def __init__(self, reads: str):
        self.reads = reads

    def __call__(self, x, t, context, ref_latents, ref_clip=None):
        level = (ref_clip if self.reads == "clip" else ref_latents).mean()
        return (x - torch.full_like(x, float(level))) / (float(t[0]) / 1000.0)


def test_encoding_probe_names_the_encoding_a_dit_reads():
    gen = torch.Generator().manual_seed(4)
    samples = [("caption", "left", LatentSample(f"s{k}", torch.zeros(16, FRAMES, SIDE, SIDE),
                                                 torch.randn(16, 1, SIDE, SIDE, generator=gen) + k,
                                                 torch.zeros(4, 8), torch.randn(1, 3, 8, generator=gen) - k))
               for k in range(3)]
    for reads, other in (("clip", "vae"), ("vae", "clip")):
        rows = encoding_probe(OneEncodingDiT(reads), samples, sigmas=(0.9,))[0.9]
        assert rows[other] == pytest.approx(0.0, abs=1e-4)
        assert rows[reads] > 10.0 and rows["both"] == pytest.approx(rows[reads], rel=1e-4)
    with pytest.raises(ValueError, match="needs two or more samples with CLIP features, got 1"):
        encoding_probe(OneEncodingDiT("vae"), samples[:1])
