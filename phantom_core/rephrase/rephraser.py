"""Subject-aware prompt rephraser (Phantom paper, arXiv 2502.11079).

Phantom is trained on captions that describe every subject's appearance distinctly; at inference the paper
rewrites the user's prompt into that form with a vision-language model, which raises the multi-subject success
rate from 65% to 95%. The official code ships no such rephraser; this module is ours.

Flow: `Rephraser.rephrase(prompt, images, hints, language)` builds one chat (`build_messages`: our instructions
`INSTRUCTIONS`, then "Reference k" + image for every reference in order, then the user's prompt), asks a
`ChatBackend` (see `rephrase_backends`: a local transformers VLM or an OpenAI-compatible endpoint), parses the
JSON answer (`parse_answer`), checks it (`check_answer`), retries once with a corrective turn when the answer
is unusable, and caches the result under a hash of every input and setting (`cache_key`), so identical inputs
never call the model twice.

Around it: `rephrase_types` (the errors, `RephraseResult`, the `ChatBackend` protocol), `rephrase_cache` (where
results are kept), `rephrase_backends` (`make_backend` over `rephrase_endpoint` and `rephrase_local`). The names
moved out of this module in the split (`RephraseError`, `UnusableAnswer`, `ChatBackend`, `RephraseResult`,
`RephraseCache`, `DEFAULT_CACHE`) are re-exported here for existing callers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

from PIL import Image

from phantom_core.log import logger
from phantom_core.references import MAX_REFERENCES
from phantom_core.rephrase.cache import DEFAULT_CACHE, RephraseCache
from phantom_core.rephrase.types import ChatBackend, RephraseError, RephraseResult, UnusableAnswer

LANGUAGES = {"en": "English", "zh": "Simplified Chinese (简体中文)"}
LANGUAGE_ALIASES = {"auto": "auto", "en": "en", "english": "en", "zh": "zh", "chinese": "zh", "中文": "zh"}
CACHE_FORMAT = 2  # bump when the meaning of a cached entry changes (2: whole-word, one-place check)

INSTRUCTIONS = """\
You rewrite prompts for a subject-to-video model. Besides the prompt, that model receives one to four \
reference images, each showing one subject (a person, an animal, an object or a scene element). It follows the \
prompt best when every reference subject is named with a distinct description of its appearance, so that two \
similar subjects cannot be mixed up.

You are given the reference images in order, each labelled "Reference k" and sometimes with a hint from the \
user, and then the user's prompt.

1. For every reference, write one short appearance description (at most 15 words): what the subject is, \
followed by its visible colours, clothing, materials, hairstyle and distinguishing marks. Describe only what \
is visible, use the user's hint when there is one, and do not guess names or identities.
2. Rewrite the user's prompt. Keep its action, scene, camera movement and style. Name every reference subject \
exactly once, using its description word for word. Do not add any person, animal or object that appears \
neither in the references nor in the user's prompt. One paragraph, at most 120 words.
3. Write the descriptions and the rewritten prompt in {language}.

Answer with one JSON object and nothing else, with one entry per reference, in reference order:
{{"subjects": [{{"index": 1, "description": "..."}}], "prompt": "..."}}"""

RETRY_MESSAGE = ("That answer cannot be used: {reason}. Answer again with only the JSON object described above, "
                 "with exactly {n} subjects, each description repeated word for word, at a place of its own, "
                 "inside \"prompt\".")

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_REFUSAL = re.compile(r"\b(i can(?:no|')t|i'm sorry|i am sorry|i am unable|i'm unable|i won't)\b|抱歉|无法|不能帮",
                      re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


# ----------------------------------------------------------------------------------------------- inputs
def resolve_language(language: str, prompt: str) -> str:
    """"auto" -> "zh" when CJK characters make up >= 30% of the prompt's letters, else "en" (auto picks only
    between these two: Chinese if the prompt is mostly Chinese, else English).

    Raises ValueError naming `language` when it is not auto / en / english / zh / chinese.
    """
    code = LANGUAGE_ALIASES.get(language.strip().lower())
    if code is None:
        raise ValueError(f"language is {language!r}; valid: auto, en (english), zh (chinese)")
    if code != "auto":
        return code
    return "zh" if cjk_ratio(prompt) >= 0.3 else "en"


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among the alphanumeric characters of `text` (0 when there are none)."""
    letters = [c for c in text if c.isalnum()]
    return sum(bool(_CJK.match(c)) for c in letters) / len(letters) if letters else 0.0


def check_inputs(prompt: str, images: Sequence[Image.Image], hints: Sequence[str]) -> list[str]:
    """Validate the user's inputs; returns the hints padded with "" to one per image.

    Raises ValueError naming `prompt`, `images` or `hints` and what is valid.
    """
    if not prompt.strip():
        raise ValueError("prompt is empty; the rephraser needs the prompt to rewrite")
    if not 1 <= len(images) <= MAX_REFERENCES:
        raise ValueError(f"images: got {len(images)} reference images; the rephraser takes 1 to {MAX_REFERENCES}")
    if len(hints) > len(images):
        raise ValueError(f"hints: got {len(hints)} hints for {len(images)} reference images; at most one each")
    return [h.strip() for h in hints] + [""] * (len(images) - len(hints))


def prepare_image(image: Image.Image, max_side: int) -> Image.Image:
    """RGB copy of `image`, downscaled (aspect kept, Lanczos) so that its longer side is at most `max_side` px."""
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    return image


# ------------------------------------------------------------------------------------------ the chat
def build_messages(prompt: str, images: Sequence[Image.Image], hints: Sequence[str], language: str) -> list[dict]:
    """The chat sent to every back-end: a system turn with `INSTRUCTIONS`, one user turn with the references.

    Back-end-neutral format: `[{"role": "system", "content": str}, {"role": "user", "content": [items]}]`
    where items are `{"type": "text", "text": str}` or `{"type": "image", "image": PIL.Image}`; the user turn
    holds "Reference k" (+ the user's hint) followed by image k, for k = 1..N in order, then the prompt.
    `language` is a resolved code ("en" | "zh"); `hints` has one (possibly empty) entry per image.
    """
    lang = LANGUAGES[language]
    content: list[dict] = []
    for k, (image, hint) in enumerate(zip(images, hints, strict=True), start=1):
        label = f"Reference {k}" + (f" (user's hint: {hint})" if hint else "") + ":"
        content += [{"type": "text", "text": label}, {"type": "image", "image": image}]
    content.append({"type": "text", "text": f"User's prompt: {prompt.strip()}\n\nThere are {len(images)} "
                                            f"references. Write the JSON answer in {lang}."})
    return [{"role": "system", "content": INSTRUCTIONS.format(language=lang)}, {"role": "user", "content": content}]


def retry_messages(messages: list[dict], raw: str, reason: str, n_refs: int) -> list[dict]:
    """`messages` + the unusable answer + a corrective user turn saying why (so greedy decoding can change)."""
    return messages + [{"role": "assistant", "content": raw},
                       {"role": "user", "content": [{"type": "text",
                                                     "text": RETRY_MESSAGE.format(reason=reason, n=n_refs)}]}]


# --------------------------------------------------------------------------------------- the answer
def parse_answer(raw: str, n_refs: int) -> tuple[str, tuple[str, ...]]:
    """Extract (prompt, descriptions) from a model answer, tolerating code fences, <think> blocks and prose.

    The first JSON object holding a "prompt" key is used; "subjects" is a list of `{"index", "description"}`
    objects (or plain strings), put in index order. Raises UnusableAnswer when there is no such object
    (reason "the model refused" when the text reads as a refusal).
    """
    text = _THINK.sub("", raw).strip()
    if not text:
        raise UnusableAnswer("the answer is empty", raw)
    obj = _first_json_object(text)
    if obj is None:
        refused = _REFUSAL.search(text) is not None
        raise UnusableAnswer("the model refused" if refused else "no JSON object with a \"prompt\" key", raw)
    subjects = obj.get("subjects") or []
    if not isinstance(subjects, list):
        raise UnusableAnswer("\"subjects\" is not a list", raw)
    items = [(s.get("index", i + 1), s.get("description", "")) if isinstance(s, dict) else (i + 1, s)
             for i, s in enumerate(subjects)]
    try:
        items.sort(key=lambda item: int(item[0]))
    except (TypeError, ValueError):
        raise UnusableAnswer("a subject has a non-integer \"index\"", raw) from None
    if [int(i) for i, _ in items] != list(range(1, len(items) + 1)):
        raise UnusableAnswer(f"subject indices are {[i for i, _ in items]}, expected 1..{len(items)}", raw)
    return str(obj.get("prompt") or "").strip(), tuple(str(d or "").strip() for _, d in items)


def _first_json_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "prompt" in obj:
            return obj
    return None


def normalize_text(text: str) -> str:
    """NFKC, casefolded, every run of non-alphanumerics -> one space (for tolerant containment checks)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


def check_answer(prompt: str, descriptions: Sequence[str], n_refs: int, language: str, raw: str = "") -> None:
    """The usability rule. Raises UnusableAnswer unless all of these hold:

    1. the rewritten prompt is not empty;
    2. there are exactly `n_refs` descriptions (one per reference: fewer drops a subject, more invents one),
       none of them empty;
    3. every description is named in the rewritten prompt at a place of its own (`place_descriptions`): as
       whole words (after `normalize_text` on both, so case and punctuation do not matter; "a cat" is not found
       in "a catamaran"), and not inside the words already taken by another description ("a man" does not
       count inside "a man in a red shirt"; two identical descriptions need two occurrences);
    4. the language matches: "zh" needs CJK ideographs in the prompt (>= 30% of its letters), "en" allows at
       most 10% (a quoted name or sign may be Chinese).
    """
    if not prompt:
        raise UnusableAnswer("the rewritten \"prompt\" is empty", raw)
    if len(descriptions) != n_refs:
        raise UnusableAnswer(f"it describes {len(descriptions)} subjects for {n_refs} references", raw)
    empty = [k for k, d in enumerate(descriptions, start=1) if not normalize_text(d)]
    if empty:
        raise UnusableAnswer(f"the description of reference {empty[0]} is empty", raw)
    spans = place_descriptions(prompt, descriptions)
    if isinstance(spans, int):
        k = spans
        if not _occurrences(normalize_text(prompt), normalize_text(descriptions[k - 1])):
            raise UnusableAnswer(f"the prompt does not contain the description of reference {k}", raw)
        raise UnusableAnswer(f"the description of reference {k} occurs in the prompt only inside the words of "
                             "another reference's description; each subject must be named at a place of its own", raw)
    ratio = cjk_ratio(prompt)
    if (language == "zh" and ratio < 0.3) or (language == "en" and ratio > 0.1):
        raise UnusableAnswer(f"the prompt is not in {LANGUAGES[language]}", raw)


def place_descriptions(prompt: str, descriptions: Sequence[str]) -> list[tuple[int, int]] | int:
    """Give every description its own occurrence in `prompt`: spans (start, end) in `normalize_text(prompt)`,
    one per description, pairwise disjoint; or the 1-based index of a description that cannot be placed.

    Occurrences are whole-word matches (`_occurrences`). Every combination of occurrences is tried, longer
    descriptions first (at most 4 descriptions: the search is tiny). On failure the index is that of the first
    description, longest first, left without a free occurrence when each takes its first free one.
    """
    flat = normalize_text(prompt)
    order = sorted(range(len(descriptions)), key=lambda i: -len(normalize_text(descriptions[i])))
    found = {i: _occurrences(flat, normalize_text(descriptions[i])) for i in order}

    def free(span: tuple[int, int], taken: list[tuple[int, int]]) -> bool:
        return all(span[1] <= s or span[0] >= e for s, e in taken)

    def place(pos: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
        if pos == len(order):
            return taken
        for span in found[order[pos]]:
            if free(span, taken) and (done := place(pos + 1, taken + [span])) is not None:
                return done
        return None

    chosen = place(0, [])
    if chosen is not None:
        return [chosen[order.index(i)] for i in range(len(descriptions))]
    taken: list[tuple[int, int]] = []
    for i in order:  # greedy pass, only to name the description that is left out
        span = next((sp for sp in found[i] if free(sp, taken)), None)
        if span is None:
            return i + 1
        taken.append(span)
    return order[-1] + 1


def _occurrences(flat: str, needle: str) -> list[tuple[int, int]]:
    """Spans of `needle` in `flat` (both `normalize_text`ed) that start and end on word boundaries.

    A boundary is needed only between two letters/digits that are not CJK ideographs: Chinese has no spaces, so
    there a plain substring match is the rule, while "a cat" must not match inside "a catamaran".
    """
    def joined(a: str, b: str) -> bool:  # True when a|b would split one non-CJK word
        return a.isalnum() and b.isalnum() and not _CJK.match(a) and not _CJK.match(b)

    spans, start = [], flat.find(needle)
    while needle and start >= 0:
        end = start + len(needle)
        if not (start > 0 and joined(flat[start - 1], flat[start])) and \
                not (end < len(flat) and joined(flat[end - 1], flat[end])):
            spans.append((start, end))
        start = flat.find(needle, start + 1)
    return spans


# ------------------------------------------------------------------------------------ the cache key
def cache_key(backend_settings: dict[str, Any], prompt: str, images: Sequence[Image.Image],
              hints: Sequence[str], language: str, strict: bool) -> str:
    """sha256 hex over the cache format, `INSTRUCTIONS`, back-end settings, inputs and pixels (RGB bytes).

    Kept here rather than in `rephrase_cache`: the key is defined by this module's instructions and answer rule
    (`CACHE_FORMAT` is bumped when that rule changes), while the cache only stores what it is given.
    """
    h = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "instructions": INSTRUCTIONS, "retry": RETRY_MESSAGE, "backend": backend_settings,
            "prompt": prompt, "hints": list(hints), "language": language, "strict": strict}
    h.update(json.dumps(head, sort_keys=True, ensure_ascii=False, default=str).encode())
    for image in images:
        h.update(f"|{image.mode}:{image.width}x{image.height}|".encode())
        h.update(image.tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------- the rephraser
class Rephraser:
    """Rewrites a prompt for Phantom with a `ChatBackend`.

    strict=True (default): an unusable answer (see `parse_answer`, `check_answer`) is retried once with a
    corrective turn; if the second answer is unusable too, RephraseError names the back-end, the reason and
    the raw answer. strict=False: the second unusable answer is returned anyway with `validated=False` (its
    parsed prompt, or the raw text when it holds no JSON; descriptions padded with "" to one per reference);
    only an empty answer still raises. Lenient mode exists for small local models that cannot follow the
    JSON format; results are cached either way.

    time_limit_s: the most seconds one `rephrase` call may spend asking the back-end, over both attempts and
    every transport retry (None = no overall limit; each endpoint request still has its own timeout). When it
    runs out, RephraseError says so. After every call that asked the back-end, `backend.release()` runs (the
    local back-end moves its model off the GPU there unless told to keep it).
    """

    def __init__(self, backend: ChatBackend, *, cache: RephraseCache | None = None, strict: bool = True,
                 max_image_side: int = 768, time_limit_s: float | None = None):
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"time_limit_s is {time_limit_s}; it must be > 0 seconds (or None for no limit)")
        self.backend, self.strict, self.max_image_side = backend, strict, max_image_side
        self.cache = DEFAULT_CACHE if cache is None else cache
        self.time_limit_s = time_limit_s

    def rephrase(self, prompt: str, images: Sequence[Image.Image], *, hints: Sequence[str] = (),
                 language: str = "auto") -> RephraseResult:
        """prompt + 1..4 reference images (PIL, in order) -> RephraseResult.

        hints: optional user text per reference (fewer than images is fine). language: auto | en | zh.
        Raises ValueError for bad inputs, RephraseError when the back-end fails or answers unusably.
        """
        hints = check_inputs(prompt, images, hints)
        code = resolve_language(language, prompt)
        images = [prepare_image(img, self.max_image_side) for img in images]
        key = cache_key(self.backend.settings(), prompt.strip(), images, hints, code, self.strict)
        hit = self.cache.get(key)
        if hit is not None:
            logger.info("rephraser: cache hit (%s)", key[:12])
            return dataclasses.replace(hit, cached=True)
        deadline = None if self.time_limit_s is None else time.monotonic() + self.time_limit_s
        try:
            result = self._ask(build_messages(prompt, images, hints, code), len(images), code, deadline)
        finally:
            release = getattr(self.backend, "release", None)
            if release is not None:
                release()
        self.cache.put(key, result)
        return result

    def _ask(self, messages: list[dict], n_refs: int, language: str, deadline: float | None) -> RephraseResult:
        for attempt in (1, 2):
            if deadline is not None and time.monotonic() >= deadline:
                raise RephraseError(f"{self.backend.label}: the time limit of {self.time_limit_s:g} s ran out "
                                    f"before attempt {attempt} of 2 (the first answer was unusable)")
            logger.info("rephraser: asking %s (attempt %d of 2)", self.backend.label, attempt)
            raw = ""
            try:
                raw = self.backend.chat(messages, deadline=deadline)
                prompt, descriptions = parse_answer(raw, n_refs)
                check_answer(prompt, descriptions, n_refs, language, raw)
                return RephraseResult(prompt, descriptions, language, raw, validated=True)
            except UnusableAnswer as err:
                raw = err.raw or raw
                logger.warning("rephraser: unusable answer from %s: %s", self.backend.label, err.reason)
                if attempt == 1:
                    messages = retry_messages(messages, raw, err.reason, n_refs)
                elif not self.strict and _THINK.sub("", raw).strip():
                    return _lenient_result(raw, n_refs, language)
                else:
                    raise RephraseError(f"{self.backend.label}: unusable answer after 2 attempts ({err.reason}); "
                                        f"raw answer: {_clip(raw)!r}") from err
        raise AssertionError("unreachable")


def _lenient_result(raw: str, n_refs: int, language: str) -> RephraseResult:
    try:
        prompt, descriptions = parse_answer(raw, n_refs)
    except UnusableAnswer:
        prompt, descriptions = "", ()
    descriptions = (tuple(descriptions) + ("",) * n_refs)[:n_refs]
    return RephraseResult(prompt or _THINK.sub("", raw).strip(), descriptions, language, raw, validated=False)


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
