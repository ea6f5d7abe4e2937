"""tools.motion_toy: the toy world's geometry, its measure (an oracle that reads the word scores the truth, a
word-blind one 0), the three networks, and a short run through the real trainer."""

from __future__ import annotations

import pytest
import torch

from tools.motion_probe import REVERSED, displacement
from tools.motion_toy import (
    BACKGROUNDS,
    BLOB,
    DIRECTIONS,
    FRAMES,
    JITTER,
    MAX_SPEED,
    SIZE,
    STEP,
    build_network,
    direction_of,
    draw,
    floor_loss,
    main,
    measure,
    posterior_x0,
    prompt,
    reverse,
    run,
    toy_sample,
)


def test_the_square_moves_the_prompted_way_and_the_reference_is_centred():
    colour = torch.arange(16.0) + 1
    for direction in DIRECTIONS:
        x0, ref = toy_sample(direction, (8, 7), colour)
        assert x0.shape == (16, FRAMES, SIZE, SIZE) and ref.shape == (16, 1, SIZE, SIZE)
        assert all(int((x0[0, f] != 0).sum()) == BLOB * BLOB for f in range(FRAMES))  # whole in every frame
        assert displacement(x0, direction) == pytest.approx(STEP * (FRAMES - 1), abs=1.0)
        assert displacement(x0, REVERSED[direction]) == pytest.approx(-STEP * (FRAMES - 1), abs=1.0)
        assert torch.equal(ref[:, 0, 6:10, 6:10], colour[:, None, None].expand(16, 4, 4))
        assert float(ref.abs().sum()) == pytest.approx(float(colour.abs().sum()) * BLOB * BLOB)


@pytest.mark.parametrize("speed", [0.5, 1.0])
def test_the_speed_sets_the_path_and_the_floors_follow_it(speed):
    """``--speed`` (latent px per latent frame) moves the square that far, and the Bayes-optimal estimate, told the
    same speed, recovers the clean latent from a barely noisy input (1e-4)."""
    for direction in DIRECTIONS:
        x0, _ = toy_sample(direction, (8, 8), torch.ones(16), speed=speed)
        assert displacement(x0, direction) == pytest.approx(speed * (FRAMES - 1), abs=1.0)
    text, x0, ref = draw(1, seed=2, variety="both", speed=speed)[0]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    estimate = posterior_x0(0.95 * x0 + 0.05 * noise, 0.05, text, ref, x0[:, 0, 0, 0], aware=False, speed=speed)
    assert torch.allclose(estimate, x0, atol=1e-4)


def test_the_fastest_allowed_path_stays_whole_and_a_faster_one_is_refused(capsys):
    """At ``MAX_SPEED`` the square is whole in every frame from the farthest jitter; ``--speed`` beyond it, or not
    above 0, is refused with an error naming the flag and the valid range."""
    for direction in DIRECTIONS:
        for jitter in (-JITTER, JITTER):
            x0, _ = toy_sample(direction, (SIZE // 2 + jitter, SIZE // 2 + jitter), torch.ones(16), speed=MAX_SPEED)
            assert all(int((x0[0, f] != 0).sum()) == BLOB * BLOB for f in range(FRAMES))
    for speed in ("0", "-1", str(MAX_SPEED + 0.5)):
        with pytest.raises(SystemExit):
            main(["--speed", speed])
        assert f"--speed is {float(speed)}; it must be > 0 and <= {MAX_SPEED}" in capsys.readouterr().err


def test_draw_is_deterministic_and_covers_every_direction():
    a, b = draw(40, seed=3), draw(40, seed=3)
    assert [p for p, _, _ in a] == [p for p, _, _ in b]
    assert all(torch.equal(x, y) for (_, x, _), (_, y, _) in zip(a, b))
    assert set(direction_of(p) for p, _, _ in a) == set(DIRECTIONS)
    assert {p for p, _, _ in a} == {prompt(d) for d in DIRECTIONS}  # only the word differs
    assert [p for p, _, _ in draw(40, seed=4)] != [p for p, _, _ in a]


def test_variety_draws_backgrounds_named_in_the_prompt_and_square_colours_shown_by_the_reference():
    cases = draw(60, seed=5, variety=True)
    assert {p.split(" on a ")[1] for p, _, _ in cases} == {f"{b} background" for b in BACKGROUNDS}
    by_word = {}
    for text, x0, ref in cases:
        corner = x0[:, 0, 0, 0]  # never covered: the path stays near the centre
        assert torch.allclose(by_word.setdefault(text.split(" on a ")[1], corner), corner)  # one latent per word
        square = ref[:, 0, SIZE // 2, SIZE // 2]
        assert torch.equal(ref[:, 0, 0, 0], torch.zeros(16))  # the reference: on zero
        assert (x0[:, FRAMES // 2] == square[:, None, None]).all(0).sum() == BLOB * BLOB  # the square shown
    colours = {tuple(ref[:, 0, SIZE // 2, SIZE // 2].tolist()) for _, _, ref in cases}
    assert len(colours) == len(cases)
    assert reverse(prompt("up", "red")) == prompt("down", "red")
    colour_only, background_only = draw(20, seed=5, variety="colour"), draw(20, seed=5, variety="background")
    assert {p.split(" on a ")[1] for p, _, _ in colour_only} == {"blue background"}
    assert len({tuple(ref[:, 0, SIZE // 2, SIZE // 2].tolist()) for _, _, ref in colour_only}) == 20
    assert len({p.split(" on a ")[1] for p, _, _ in background_only}) > 1
    assert len({tuple(ref[:, 0, SIZE // 2, SIZE // 2].tolist()) for _, _, ref in background_only}) == 1
    with pytest.raises(ValueError, match="valid: none, colour, background, both"):
        draw(1, seed=0, variety="shape")


class _Oracle(torch.nn.Module):
    """Predicts the velocity towards the toy video of the direction its context names (``reads=False``: of 'left'
    whatever the context): the one-step estimate is that video exactly."""

    def __init__(self, reads: bool):
        super().__init__()
        self.reads = reads

    def forward(self, x, t, context, ref):
        word = DIRECTIONS[int(context[0, 0, 0])] if self.reads else "left"
        x0, _ = toy_sample(word, (SIZE // 2, SIZE // 2), torch.ones(16))
        sigma = float(t[0]) / 1000
        return (x - x0[None]) / sigma


def test_measure_scores_a_model_that_reads_the_word_at_the_truth_and_a_blind_one_at_zero():
    def encode(text):  # the direction's index as a context
        return torch.full((3, 4), float(DIRECTIONS.index(direction_of(text))))

    cases = draw(8, seed=0)
    reads = measure(_Oracle(True), encode, cases, sigmas=(0.9,))[0.9]
    blind = measure(_Oracle(False), encode, cases, sigmas=(0.9,))[0.9]
    assert reads["truth"] == pytest.approx(STEP * (FRAMES - 1), abs=1.0)
    assert reads["effect"] == pytest.approx(reads["truth"], abs=0.5)
    assert abs(blind["effect"]) < 1e-6 and blind["own"] == pytest.approx(blind["reversed"], rel=1e-6)


@pytest.mark.parametrize("variety", [False, True])
def test_the_floors_know_the_path_from_a_clean_input_and_the_word_only_at_high_noise(variety):
    """The Bayes-optimal estimate recovers ``x0`` from a barely noisy input (sigma 0.05, 1e-4), both floors are 0 at
    sigma 0.5 (the input shows the path), and near sigma 1 reading the word lowers the floor by at least a fifth."""
    cases = draw(8, seed=3, variety=variety)
    text, x0, ref = cases[0]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    estimate = posterior_x0(0.95 * x0 + 0.05 * noise, 0.05, text, ref, x0[:, 0, 0, 0], aware=False)
    assert torch.allclose(estimate, x0, atol=1e-4)

    def floors(sigma):
        gen, out = torch.Generator().manual_seed(1), {True: 0.0, False: 0.0}
        for text, x0, ref in cases:
            noise = torch.randn(x0.shape, generator=gen)
            for aware in out:
                out[aware] += floor_loss((1 - sigma) * x0 + sigma * noise, noise, x0, sigma, text, ref, aware) / 8
        return out

    assert max(floors(0.5).values()) < 1e-3
    high = floors(0.99)
    assert high[True] < 0.8 * high[False]
    rows = measure(_Oracle(False), lambda text: torch.zeros(3, 4), cases[:2], sigmas=(0.99,))[0.99]
    assert 0 <= rows["floor_aware"] < rows["floor_blind"] <= rows["own"] + 1e-6


@pytest.mark.parametrize("name, positions, pooled", [("phantom-wan", False, False), ("mmdit", False, False),
                                                     ("mmdit-pos", True, False), ("mmdit-pooled", False, True)])
def test_the_networks_and_their_position_tables(name, positions, pooled):
    model = build_network(name, seed=0)
    assert ("pos_embed" in dict(model.named_buffers())) == positions
    assert hasattr(model, "y_embedder") == pooled and hasattr(model, "r_embedder") == pooled
    assert sum(p.numel() for p in model.parameters()) > 4_000_000  # the world presets, not a miniature
    with pytest.raises(ValueError, match="valid: phantom-wan, mmdit, mmdit-pos, mmdit-pooled"):
        build_network("wan")
    if name == "phantom-wan":
        with pytest.raises(ValueError, match=r"config changes \['text_positions'\] are for an MMDiT network"):
            build_network(name, text_positions=True)
    else:
        assert build_network(name, text_positions=True).config.text_positions


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("speed", [STEP, 0.5])
def test_a_short_run_goes_through_the_trainer_and_reports_each_measure(speed):
    """Two steps through the trainer at the default and a slower speed; the reported floors are those of the run's
    own speed (0 at sigma 0.8, where the noisy input shows the path: a floor computed for another speed is not) and
    the truth is the square's displacement at that speed."""
    lines = []
    final = run("mmdit", steps=2, every=1, threads=1, report=lines.append, variety=True, plain=True, speed=speed)
    assert len(lines) == 2 and lines[-1].startswith("mmdit (variety) (plain) step 2/2") and "effect" in lines[-1]
    assert "floor" in lines[-1] and all(r["floor_aware"] <= r["floor_blind"] for r in final.values())
    assert set(final) == {0.95, 0.8} and all(0 < r["own"] < 10 for r in final.values())
    assert final[0.8]["floor_aware"] < 1e-3 and final[0.8]["truth"] == pytest.approx(speed * (FRAMES - 1), abs=1.0)


def test_dropout_reaches_the_trainer_and_a_bad_one_is_refused(monkeypatch, capsys):
    """``--dropout TEXT REFERENCE`` replaces the recipe's (and ``--plain``'s) dropouts in the trainer's config and is
    named in the report; a probability outside [0, 1) is refused with an error naming the flag."""
    import phantom_core.training.loop as loop

    seen = []
    monkeypatch.setattr(loop, "train", lambda config, **kw: seen.append(config))
    run("mmdit", steps=1, every=1, threads=1, report=lambda s: None, plain=True, dropout=(0.3, 0.05))
    run("mmdit", steps=1, every=1, threads=1, report=lambda s: None, plain=True)
    assert (seen[0].text_dropout, seen[0].reference_dropout) == (0.3, 0.05)
    assert (seen[1].text_dropout, seen[1].reference_dropout) == (0.0, 0.0)
    with pytest.raises(SystemExit):
        main(["--dropout", "0.2", "1"])
    assert "--dropout is [0.2, 1.0]; each must be >= 0 and < 1" in capsys.readouterr().err
