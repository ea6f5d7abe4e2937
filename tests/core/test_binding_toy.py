"""tools.binding_toy: its geometry (each square moves as its clause says, in its half; the references are the squares
in clause order), its measure (an oracle that binds scores the truth, a bag-of-words one 0, a swapping one minus the
truth), the layouts, and a short run through the real trainer."""

from __future__ import annotations

import pytest
import torch

from tools.binding_probe import region_displacement
from tools.binding_toy import BLOB, FRAMES, HELD_OUT, SIZE, STEP, draw, main, measure, prompt, run, toy_pair


def test_each_square_moves_as_its_clause_says_in_its_half_and_the_references_follow_clause_order():
    colours = torch.stack([torch.full((16,), 1.0), torch.full((16,), -2.0)])
    for top in (0, 1):
        x0, refs, halves = toy_pair(("left", "right"), top, colours, (0, 0, 0, 0))
        assert x0.shape == (16, FRAMES, SIZE, SIZE) and refs.shape == (16, 2, SIZE, SIZE)
        for k, sign in enumerate((-1, 1)):
            inside = x0[0] * halves[k]
            assert int((inside == colours[k, 0]).sum()) == FRAMES * BLOB * BLOB  # whole in every frame, its half
            assert float(region_displacement(x0, halves[k])[0]) == pytest.approx(sign * STEP * (FRAMES - 1), abs=1.0)
            assert float(refs[0, k].sum()) == pytest.approx(float(colours[k, 0]) * BLOB * BLOB)
        assert bool(halves[top][0, 0]) and not bool(halves[1 - top][0, 0])  # square `top` in the top half


def test_draw_is_deterministic_and_the_layouts_differ_as_documented():
    assert prompt(("left", "right")) == "a thing moves left and a thing moves right on a blue background"
    a, b = draw(40, seed=3), draw(40, seed=3)
    assert [c.motions for c in a] == [c.motions for c in b] and all(torch.equal(x.latents, y.latents)
                                                                    for x, y in zip(a, b))
    assert {c.motions for c in a} == {(p, q) for p in ("left", "right") for q in ("left", "right")}
    assert {c.words for c in a} == {("thing", "thing")}
    tops = {bool(c.halves[0][0, 0]) for c in a}
    assert tops == {True, False}  # random: the first clause's square is on top or bottom
    assert {bool(c.halves[0][0, 0]) for c in draw(20, seed=3, layout="anchored")} == {True}
    assert all(c.motions[0] != c.motions[1] for c in draw(HELD_OUT, seed=4, differ=True))
    named = draw(20, seed=3, names=True)
    assert [c.motions for c in named] == [c.motions for c in a[:20]]  # the same draws, other words
    assert len({w for c in named for w in c.words}) > 20 and "thing" not in {w for c in named for w in c.words}
    assert prompt(("up", "left"), ("owl", "red cat")) == "an owl moves up and a red cat moves left on a blue background"
    with pytest.raises(ValueError, match="layout is 'diagonal'; valid: random, anchored"):
        draw(2, seed=0, layout="diagonal")


class _Oracle(torch.nn.Module):
    """Predicts the velocity towards the toy video its context describes: clause k's motion for reference k's square
    (``mode="binds"``), the clauses swapped (``"swaps"``), both squares still (``"deaf"``), or each reference's
    square (and its clause's motion) in the other's half (``"misplaces"``). Squares are found by their reference's
    colour; the context carries the two motions as 0 / 1 (left / right)."""

    def __init__(self, mode: str, cases):
        super().__init__()
        self.mode, self.cases = mode, cases

    def forward(self, x, t, context, refs):
        motions = tuple(("left", "right")[int(v)] for v in context[0, :2, 0])
        if self.mode == "swaps":
            motions = motions[::-1]
        case = next(c for c in self.cases if torch.equal(c[2], refs[0]))
        colours = refs[0][:, :, SIZE // 2, SIZE // 2].T  # (2, 16)
        top = 0 if bool(case[3][0][0, 0]) else 1
        top = 1 - top if self.mode == "misplaces" else top
        x0, _, _ = toy_pair(motions, top, colours, (0, 0, 0, 0))
        if self.mode == "deaf":
            x0 = x0[:, FRAMES // 2:FRAMES // 2 + 1].expand_as(x0)
        sigma = float(t[0]) / 1000
        return (x - x0[None]) / sigma


def test_measure_scores_binding_swapping_deafness_and_placement():
    def encode(text):
        words = text.split(" moves ")[1:]
        return torch.tensor([[float(w.startswith("right"))] * 4 for w in words] + [[0.0] * 4])

    cases = draw(6, seed=5, differ=True)
    rows = {mode: measure(_Oracle(mode, cases), encode, cases, sigmas=(0.9,))[0.9]
            for mode in ("binds", "swaps", "deaf", "misplaces")}
    truth = rows["binds"]["truth"]
    assert truth == pytest.approx(STEP * (FRAMES - 1), abs=1.0)
    assert rows["binds"]["binding"] == pytest.approx(truth, abs=1.0)  # the jitter moves the oracle's path a little
    assert rows["swaps"]["binding"] == pytest.approx(-truth, abs=1.0)
    assert abs(rows["deaf"]["binding"]) < 1e-5 and abs(rows["deaf"]["heard"]) < 1e-5
    assert rows["binds"]["heard"] == pytest.approx(truth, abs=1.0) and rows["swaps"]["heard"] == pytest.approx(
        truth, abs=1.0)  # both told one motion: no binding needed
    assert rows["binds"]["own"] < rows["binds"]["swapped"]
    # each place takes its own reference's colour (the oracle's path misses the jittered truth by a few px) or the
    # other's; placement does not depend on the motions
    for mode in ("binds", "swaps", "deaf"):
        assert 0.5 < rows[mode]["placed"] <= 1.0 + 1e-5
    assert -1.0 - 1e-5 <= rows["misplaces"]["placed"] < -0.5


@pytest.mark.usefixtures("single_thread")
def test_a_short_run_goes_through_the_trainer_and_adds_the_index_tables_late(capsys):
    """One step as a bag of words, then the text positions and the reference index added and one step more (at a
    slower speed: the truth follows it, and the temporal term in the loss); bad options are refused naming the
    flag."""
    lines = []
    final = run(steps=1, every=1, layout="anchored", text_positions=True, reference_index=True, threads=1,
                speed=1.0, late=1, temporal=0.5, pooled=True, report=lines.append)
    assert len(lines) == 2 and "bag of words: step 1/1" in lines[0] and "then with them: step 1/1" in lines[1]
    assert lines[0].startswith("binding toy (anchored, text positions, reference index, pooled vectors, speed 1.0, "
                               "added after 1 steps, temporal weight 0.5, plain)")
    assert "placed " in lines[1]
    assert set(final) == {0.95, 0.8} and all(0 < r["own"] < 10 and -1 <= r["placed"] <= 1 for r in final.values())
    assert final[0.8]["truth"] == pytest.approx(1.0 * (FRAMES - 1), abs=1.0)
    for argv, message in ((["--steps", "0"], "--steps is 0; it must be >= 1"),
                          (["--late", "5"], "--late is 5; it must be >= 0, and a late start needs --text-positions"),
                          (["--speed", "3"], "--speed is 3.0; it must be > 0 and <= 2.5"),
                          (["--temporal-weight", "-2"], "--temporal-weight: got -2.0; expected a number from 0.0 to 1000.0")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_clause_labels_mark_each_clause_and_the_marks_follow_them():
    """Each subject clause's tokens get its 1-based index (the joining ``and``, the background phrase and ``</s>``
    get 0); ``clause_marks`` adds one fixed vector per clause, of the tokens' norm times the scale, to those tokens
    only; a prompt outside the grammar is all 0."""
    from phantom_core.tiny.default import TRAINED_DIR
    from phantom_core.wan.umt5 import load_text_encoder
    from tools.binding_toy import clause_labels, clause_marks

    text_encoder = load_text_encoder(TRAINED_DIR / "phantom_world_umt5.safetensors")
    sp = text_encoder.tokenizer
    text = "a small red star stays still and an egg moves up and a large cat moves down on a white background"
    labels = clause_labels(sp, text)
    pieces = sp.encode(text, return_type="proto").pieces
    assert len(labels) == len(text_encoder.tokenize([text])[0]) and labels[-1] == 0
    words = {k: "".join(p.piece for p, x in zip(pieces, labels) if x == k).replace("\u2581", " ").strip()
             for k in range(4)}
    assert words == {1: "a small red star stays still", 2: "an egg moves up", 3: "a large cat moves down",
                     0: "and and on a white background"}
    assert set(clause_labels(sp, "two cats dance")) == {0}
    context = text_encoder.encode([text])[0]
    marked = clause_marks(sp, text, context, 0.5)
    added = marked - context
    norms = added.norm(dim=1)
    label = torch.tensor(labels)
    assert float(norms[label == 0].max()) == 0.0
    torch.testing.assert_close(norms[label > 0], torch.full_like(norms[label > 0], 0.5 * context.shape[1] ** 0.5))
    torch.testing.assert_close(added[label == 2][0], added[label == 2][-1], rtol=0, atol=1e-5)  # one vector a clause
    assert float((added[label == 1][0] - added[label == 2][0]).norm()) > 1.0  # another for the next clause
