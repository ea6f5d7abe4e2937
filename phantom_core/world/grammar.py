"""The world's prompt grammar: a parser from prompt to structured scene, and the canonical prompt of a scene.

Grammar (case-insensitive; one optional trailing period; words separated by single spaces after normalising)::

    prompt  := clause (" and " clause){0,2} " on " ("a" | "an") " " BACKGROUND " background"
    clause  := [article " "] [SIZE " "] SUBJECT_WORDS " " action
    action  := "moves " MOTION | "stays still"
    article := "a" | "an" | "the"
    SIZE    := "small" | "large"                         (absent: normal size)
    MOTION  := "left" | "right" | "up" | "down"
    BACKGROUND := "red" | "green" | "blue" | "yellow" | "black" | "white"

Examples: ``a red striped star moves left on a blue background``, ``a small cat stays still on a white
background``, ``an astronaut moves right and a large red apple moves up on a black background``.

Each clause ends at the first ``moves <motion>`` or ``stays still`` after it starts, so subject words may contain
``and`` or ``on`` (``fork and knife``, ``meat on bone``) but never ``moves``/``stays``, a leading article or a
leading size word (``subject_words_problem`` says why a name is unusable; the subject pool drops such names).

Binding of motions to references (documented contract of the world): **by order**. The k-th clause of the prompt
is the k-th reference image. The clause also names the subject, so a model may use the words as Phantom does, but
the world's data, ground truth and metrics (swap rate) bind by order.

Directions are image directions: ``left`` = towards x = 0, ``up`` = towards y = 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")  # "still" is written "stays still"
SUBJECT_SIZES: tuple[str, ...] = ("small", "normal", "large")  # "normal" has no word in the prompt
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {  # name -> the rendered RGB (uint8)
    "red": (200, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 200),
    "yellow": (235, 200, 50),
    "black": (20, 20, 20),
    "white": (255, 255, 255),
}
MAX_SUBJECTS = 3
ARTICLES = ("a", "an", "the")
GRAMMAR_WORDS = ("moves", "stays", "still", "and", "on", "background", "small", "large", *ARTICLES,
                 "left", "right", "up", "down", *BACKGROUND_COLOURS)

_ENDING = re.compile(r"^(?P<clauses>.+) on (?:a|an) (?P<bg>[a-z]+) background$")
_CLAUSE = re.compile(r"(?P<subject>.+?) (?:moves (?P<motion>left|right|up|down)|stays still)(?: and |$)")


@dataclass(frozen=True)
class SubjectClause:
    """One subject of a scene: its words (lower case, no article or size), its motion and its size."""

    words: str
    motion: str = "still"
    size: str = "normal"

    def __post_init__(self) -> None:
        if self.motion not in MOTIONS:
            raise ValueError(f"motion: got {self.motion!r}; valid motions are {', '.join(MOTIONS)}")
        if self.size not in SUBJECT_SIZES:
            raise ValueError(f"size: got {self.size!r}; valid sizes are {', '.join(SUBJECT_SIZES)}")
        problem = subject_words_problem(self.words)
        if problem:
            raise ValueError(f"subject words {self.words!r}: {problem}")


@dataclass(frozen=True)
class Scene:
    """A parsed prompt: 1-3 subjects in reference order and the background colour's name."""

    subjects: tuple[SubjectClause, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.subjects) <= MAX_SUBJECTS:
            raise ValueError(f"subjects: got {len(self.subjects)}; a world scene has 1 to {MAX_SUBJECTS}")
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"background: got {self.background!r}; valid colours are "
                             f"{', '.join(BACKGROUND_COLOURS)}")

    @property
    def prompt(self) -> str:
        """The canonical prompt (``format_prompt``)."""
        return format_prompt(self)


def subject_words_problem(words: str) -> str | None:
    """Why ``words`` cannot name a subject in the grammar (None when they can)."""
    tokens = words.split(" ")
    if not words or words != words.strip().lower() or "" in tokens:
        return "must be non-empty lower-case words separated by single spaces"
    if tokens[0] in ARTICLES or tokens[0] in ("small", "large"):
        return f"must not start with {tokens[0]!r} (read as an article or a size)"
    if "moves" in tokens or "stays" in tokens:
        return "must not contain 'moves' or 'stays' (they end a clause)"
    if words.endswith(" background") or words == "background":
        return "must not end with 'background'"
    return None


def article_for(words: str) -> str:
    """``an`` before a vowel letter, else ``a`` (by spelling: 'an unicorn face' is accepted and canonical)."""
    return "an" if words[:1] in "aeiou" else "a"


def format_prompt(scene: Scene) -> str:
    """The canonical prompt of ``scene`` (lower case, no final period); ``parse_prompt`` inverts it."""
    clauses = []
    for s in scene.subjects:
        sized = s.words if s.size == "normal" else f"{s.size} {s.words}"
        action = "stays still" if s.motion == "still" else f"moves {s.motion}"
        clauses.append(f"{article_for(sized)} {sized} {action}")
    return f"{' and '.join(clauses)} on {article_for(scene.background)} {scene.background} background"


PROMPT_FORMS = ("named", "generic")
GENERIC_WORDS = "thing"


def check_prompt_form(form: str) -> str:
    """``form`` when it is one of ``PROMPT_FORMS``; else ``ValueError`` naming the valid forms."""
    if form not in PROMPT_FORMS:
        raise ValueError(f"prompt form: got {form!r}; valid forms are {', '.join(PROMPT_FORMS)}")
    return form


def prompt_in_form(scene: Scene, form: str = "named") -> str:
    """The prompt of ``scene`` in ``form``: ``named`` (``format_prompt``: each clause names and describes its subject,
    as Phantom's rephraser makes a prompt describe each reference) or ``generic`` (every subject called
    ``GENERIC_WORDS``, sizes, motions and background kept: a prompt that describes no reference, the paper's
    un-rephrased case, where only the clauses' order binds a motion to a reference). Raises ``ValueError`` for
    another form."""
    if check_prompt_form(form) == "generic":
        from dataclasses import replace

        scene = replace(scene, subjects=tuple(replace(s, words=GENERIC_WORDS) for s in scene.subjects))
    return format_prompt(scene)


def normalise_prompt(text: str) -> str:
    """Lower case, single spaces, no surrounding space or final period."""
    return " ".join(text.strip().rstrip(".").lower().split())


def parse_prompt(text: str) -> Scene:
    """Parse a world prompt into a :class:`Scene` (subjects in prompt order = reference order).

    Raises:
        ValueError: naming the prompt and what part does not follow the grammar (module docstring).
    """
    prompt = normalise_prompt(text)
    ending = _ENDING.match(prompt)
    if ending is None:
        raise ValueError(f"prompt {text!r}: must end with 'on a <colour> background' "
                         f"(colours: {', '.join(BACKGROUND_COLOURS)})")
    background, body = ending["bg"], ending["clauses"]
    if background not in BACKGROUND_COLOURS:
        raise ValueError(f"prompt {text!r}: background {background!r} is not one of {', '.join(BACKGROUND_COLOURS)}")
    subjects, position = [], 0
    for match in _CLAUSE.finditer(body):
        if match.start() != position:
            break
        subjects.append(_clause(match["subject"], match["motion"] or "still", text))
        position = match.end()
    if position != len(body) or not subjects:
        raise ValueError(f"prompt {text!r}: each subject must be '<subject words> moves left|right|up|down' or "
                         f"'<subject words> stays still', joined by 'and'; cannot read {body[position:]!r}")
    if len(subjects) > MAX_SUBJECTS:
        raise ValueError(f"prompt {text!r}: {len(subjects)} subjects; the world has 1 to {MAX_SUBJECTS}")
    return Scene(tuple(subjects), background)


def _clause(phrase: str, motion: str, text: str) -> SubjectClause:
    """``[article] [size] words`` -> SubjectClause; ValueError naming the prompt when the words are empty."""
    tokens = phrase.split(" ")
    if tokens[0] in ARTICLES:
        tokens = tokens[1:]
    size = "normal"
    if tokens and tokens[0] in ("small", "large"):
        size, tokens = tokens[0], tokens[1:]
    if not tokens:
        raise ValueError(f"prompt {text!r}: a clause has no subject words before its motion")
    return SubjectClause(" ".join(tokens), motion, size)
