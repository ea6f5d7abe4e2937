"""A tokenizer corpus for the world: every grammar word and every subject name, in sentences of the grammar.

``train_tiny_tokenizer(world_corpus(), vocab_size=...)`` (``phantom_core.tiny.text``) trains a umT5-style
sentencepiece model on it, whose pieces cover the world's whole vocabulary (the grammar's words become whole
pieces). The names of held-out subjects are in the corpus too: a tokenizer's vocabulary is not training data for
the video model (it never sees their pictures), and a held-out name must not fall back to bytes.
The embedded default's tokenizer (``train_tiny_tokenizer()`` with its defaults) is not affected.
"""

from __future__ import annotations

import numpy as np

from phantom_core.world.grammar import BACKGROUND_COLOURS, MOTIONS, Scene, SubjectClause
from phantom_core.world.subjects import Subject, subject_pool

CORPUS_SEED = 2502


def world_corpus(subjects: list[Subject] | None = None, sentences_per_subject: int = 2,
                 seed: int = CORPUS_SEED) -> list[str]:
    """Corpus lines: for each subject (default: the whole available pool) a few random prompts naming it.

    Deterministic in ``seed`` and the pool. Each prompt uses the grammar's constructions (sizes, every motion,
    ``stays still``, ``and`` between two subjects, every background), so the grammar's words dominate the counts.
    """
    subjects = subject_pool() if subjects is None else subjects
    rng = np.random.default_rng(seed)
    lines = []
    for subject in subjects:
        for _ in range(sentences_per_subject):
            lines.append(_sentence(subject.name, subjects, rng))
    return lines


def _sentence(name: str, subjects: list[Subject], rng: np.random.Generator) -> str:
    sizes = ("small", "normal", "large")
    clauses = [SubjectClause(name, MOTIONS[int(rng.integers(len(MOTIONS)))], sizes[int(rng.integers(3))])]
    if rng.random() < 0.5:
        other = subjects[int(rng.integers(len(subjects)))].name
        clauses.append(SubjectClause(other, MOTIONS[int(rng.integers(len(MOTIONS)))], sizes[int(rng.integers(3))]))
    colours = list(BACKGROUND_COLOURS)
    return Scene(tuple(clauses), colours[int(rng.integers(len(colours)))]).prompt
