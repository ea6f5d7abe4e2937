"""The world's prompt grammar: the issue's forms parse, canonical prompts round-trip, bad prompts are refused."""

from __future__ import annotations

import pytest

from phantom_core.world.grammar import (
    BACKGROUND_COLOURS,
    Scene,
    SubjectClause,
    format_prompt,
    parse_prompt,
    prompt_in_form,
    subject_words_problem,
)
from tests.support.world import small_sample


def test_single_subject_moves_on_every_background():
    for colour in BACKGROUND_COLOURS:
        for motion in ("left", "right", "up", "down"):
            scene = parse_prompt(f"a red striped star moves {motion} on a {colour} background")
            assert scene == Scene((SubjectClause("red striped star", motion),), colour)


def test_static_sizes_articles_case_and_period():
    scene = parse_prompt("The Small cat stays still on a WHITE background.")
    assert scene == Scene((SubjectClause("cat", "still", "small"),), "white")
    assert parse_prompt("large espresso cup moves up on a black background").subjects[0].size == "large"
    assert parse_prompt("an astronaut moves down on an yellow background").background == "yellow"


def test_two_and_three_subjects_keep_their_order_and_motions():
    scene = parse_prompt("a cat moves left and a rocket moves up on a blue background")
    assert [(s.words, s.motion) for s in scene.subjects] == [("cat", "left"), ("rocket", "up")]
    scene = parse_prompt("a small cat stays still and a rocket moves right and a large blue ring moves down "
                         "on a green background")
    assert [(s.words, s.motion, s.size) for s in scene.subjects] == [
        ("cat", "still", "small"), ("rocket", "right", "normal"), ("blue ring", "down", "large")]


def test_subject_words_may_contain_and_or_on():
    scene = parse_prompt("a fork and knife moves left and a meat on bone stays still on a red background")
    assert [s.words for s in scene.subjects] == ["fork and knife", "meat on bone"]


@pytest.mark.parametrize("index", range(12))
def test_canonical_prompts_round_trip(index):
    sample = small_sample(index)
    assert parse_prompt(sample.prompt) == sample.scene
    assert format_prompt(parse_prompt(sample.prompt)) == sample.prompt
    assert parse_prompt(sample.prompt.upper() + ".") == sample.scene


@pytest.mark.parametrize("prompt, part", [
    ("a cat moves left", "must end with 'on a <colour> background'"),
    ("a cat moves left on a purple background", "background 'purple'"),
    ("a cat jumps on a red background", "cannot read 'a cat jumps'"),
    ("a moves left on a red background", "no subject words"),
    ("a cat moves left and moves up on a red background", "cannot read"),
    ("an ant moves left and a bee moves up and a cat moves down and a dog stays still on a red background",
     "4 subjects"),
])
def test_bad_prompts_are_refused_naming_the_prompt(prompt, part):
    with pytest.raises(ValueError, match="prompt") as err:
        parse_prompt(prompt)
    assert part in str(err.value)


def test_words_the_grammar_cannot_carry():
    assert subject_words_problem("large red circle") is not None  # would read as size "large"
    assert subject_words_problem("the cat") is not None
    assert subject_words_problem("cat moves fast") is not None
    assert subject_words_problem("Cat") is not None
    assert subject_words_problem("black large square") is None
    with pytest.raises(ValueError, match="motion"):
        SubjectClause("cat", "sideways")
    with pytest.raises(ValueError, match="background"):
        Scene((SubjectClause("cat"),), "purple")


def test_generic_prompt_form_keeps_everything_but_the_subject_words():
    scene = parse_prompt("a small cat moves left and a red striped star moves up on a blue background")
    assert prompt_in_form(scene) == scene.prompt
    generic = prompt_in_form(scene, "generic")
    assert generic == "a small thing moves left and a thing moves up on a blue background"
    back = parse_prompt(generic)
    assert [(s.motion, s.size) for s in back.subjects] == [(s.motion, s.size) for s in scene.subjects]
    assert back.background == scene.background
    with pytest.raises(ValueError, match="prompt form: got 'rephrased'; valid forms are named, generic"):
        prompt_in_form(scene, "rephrased")
