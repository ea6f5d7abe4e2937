"""The rephraser: prompt building, answer parsing/validation, caching, and the OpenAI-compatible back-end
against a recording chat-completions server on 127.0.0.1 (request shape, key handling, timeout, retry, errors)."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phantom_core.__main__ import main as cli_main
from phantom_core.rephrase.backends import make_backend
from phantom_core.rephrase.cache import RephraseCache
from phantom_core.rephrase.endpoint import EndpointBackend, EndpointConfig
from phantom_core.rephrase.rephraser import (
    INSTRUCTIONS,
    Rephraser,
    build_messages,
    check_answer,
    parse_answer,
    place_descriptions,
    resolve_language,
)
from phantom_core.rephrase.types import RephraseError, UnusableAnswer
from tests.support.chat import good_answer, make_images

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-SECRET-0123456789"


def endpoint(url: str, **kw) -> EndpointBackend:
    cfg = dict(base_url=url, model="vlm-test", api_key_env="PHANTOM_TEST_KEY", timeout_s=5.0, max_retries=1,
               retry_backoff_s=0.0) | kw
    return EndpointBackend(EndpointConfig(**cfg))


# ------------------------------------------------------------------------------------------ prompt building
@pytest.mark.parametrize("n", [1, 2, 4])
def test_messages_mention_every_reference_in_order_with_hints(n):
    images = make_images(n)
    hints = [f"hint-{k}" if k % 2 else "" for k in range(1, n + 1)]
    system, user = build_messages("A family is having a meal.", images, hints, "en")
    assert system["role"] == "system" and system["content"] == INSTRUCTIONS.format(language="English")
    items = user["content"]
    labels = [i for i, c in enumerate(items) if c["type"] == "text" and c["text"].startswith("Reference ")]
    assert [items[i]["text"].split(":")[0].split(" (")[0] for i in labels] == [f"Reference {k}" for k in
                                                                               range(1, n + 1)]
    for k, i in enumerate(labels):  # each label is followed by its own image, in order
        assert items[i + 1]["type"] == "image" and items[i + 1]["image"] is images[k]
        assert (f"hint-{k + 1}" in items[i]["text"]) == bool(hints[k])
    assert sum(c["type"] == "image" for c in items) == n
    assert items[-1]["type"] == "text" and "A family is having a meal." in items[-1]["text"]
    assert f"There are {n} references" in items[-1]["text"]


def test_language_is_respected_and_auto_detected():
    images = make_images(2)
    for code, name in (("en", "English"), ("zh", "Simplified Chinese")):
        system, user = build_messages("p", images, ["", ""], code)
        assert name in system["content"] and name in user["content"][-1]["text"]
    assert "Chinese" not in build_messages("p", images, ["", ""], "en")[0]["content"]
    assert resolve_language("auto", "一家三口正在吃饭") == "zh"
    assert resolve_language("auto", "A family of three is having a meal") == "en"
    assert resolve_language("auto", "A dog next to 北京 tower in the park at night") == "en"
    assert resolve_language("Chinese", "a dog") == "zh" and resolve_language("english", "一只狗") == "en"
    with pytest.raises(ValueError, match="language is 'fr'"):
        resolve_language("fr", "a dog")


def test_bad_inputs_name_the_input():
    backend = make_backend("openai-compatible", endpoint_url="http://127.0.0.1:9/v1", endpoint_model="m")
    r = Rephraser(backend, cache=RephraseCache())
    with pytest.raises(ValueError, match="1 to 4"):
        r.rephrase("a cat", make_images(5))
    with pytest.raises(ValueError, match="1 to 4"):
        r.rephrase("a cat", [])
    with pytest.raises(ValueError, match="prompt is empty"):
        r.rephrase("  ", make_images(1))
    with pytest.raises(ValueError, match="hints: got 3 hints for 2"):
        r.rephrase("a cat", make_images(2), hints=["a", "b", "c"])
    with pytest.raises(ValueError, match="no rephraser back-end configured.*endpoint_url"):
        make_backend("openai-compatible")
    with pytest.raises(ValueError, match="no rephraser back-end configured.*model folder"):
        make_backend("local")
    with pytest.raises(ValueError, match="backend is 'magic'"):
        make_backend("magic")
    with pytest.raises(ValueError, match="endpoint_url is 'localhost:1'"):
        make_backend("openai-compatible", endpoint_url="localhost:1", endpoint_model="m")


# ------------------------------------------------------------------------------------- parsing and checking
def test_parse_answer_tolerates_fences_prose_and_think():
    descs = ["a woman in a black coat", "a small girl in a white dress"]
    raw = ("<think>{\"prompt\": \"draft\"}</think>Sure! Here it is:\n```json\n"
           + good_answer(descs[::-1]).replace('"index": 1', '"index": 9').replace('"index": 2', '"index": 1')
           .replace('"index": 9', '"index": 2') + "\n```\nHope this helps {not json}.")
    prompt, got = parse_answer(raw, 2)
    assert got == tuple(descs)  # sorted by index, not by listing order
    assert prompt.startswith("a small girl") and "draft" not in prompt
    assert parse_answer('{"subjects": ["a red car"], "prompt": "a red car drives"}', 1) == ("a red car drives",
                                                                                            ("a red car",))
    for raw, reason in (("", "empty"), ("I'm sorry, I can't help with that.", "refused"),
                        ("prompt: a dog", "no JSON"), ('{"subjects": [{"index": 2, "description": "x"}], '
                                                       '"prompt": "x"}', "indices")):
        with pytest.raises(UnusableAnswer, match=reason) as info:
            parse_answer(raw, 1)
        assert info.value.raw == raw


@pytest.mark.parametrize("descriptions, prompt, reason", [
    (("a white cat", "a white cat with a black tail"), "a white cat with a black tail sleeps on the sofa",
     "reference 1 occurs in the prompt only inside"),  # one subject dropped, its words reused by the other
    (("a man in a red shirt", "a man"), "a man in a red shirt walks", "reference 2 occurs in the prompt only inside"),
    (("a cat",), "a catamaran sails past the pier", "does not contain the description of reference 1"),
    (("a red car", "a red car"), "a red car drives away", "reference 2 occurs"),  # same words need two places
])
def test_check_answer_needs_whole_words_at_separate_places(descriptions, prompt, reason):
    with pytest.raises(UnusableAnswer, match=reason):
        check_answer(prompt, descriptions, len(descriptions), "en")


def test_check_answer_places_each_description_once():
    check_answer("A white cat, and a white cat with a black tail, sleep on the sofa.",
                 ("a white cat", "a white cat with a black tail"), 2, "en")
    check_answer("a man in a red shirt greets a man", ("a man", "a man in a red shirt"), 2, "en")
    check_answer("a red car follows a red car", ("a red car", "a red car"), 2, "en")
    check_answer("a cat's toy", ("a cat",), 1, "en")  # punctuation is a word boundary
    assert place_descriptions("a man in a red shirt greets a man", ["a man", "a man in a red shirt"]) == \
        [(28, 33), (0, 20)]
    # Chinese has no spaces: plain substrings, still at separate places
    check_answer("一只白猫和一只黑猫在玩", ("一只白猫", "一只黑猫"), 2, "zh")
    with pytest.raises(UnusableAnswer, match="reference 1 occurs"):
        check_answer("一只白猫戴着红色项圈在睡觉", ("一只白猫", "一只白猫戴着红色项圈"), 2, "zh")


def test_check_answer_rule():
    d = ("a woman in a black coat", "an elderly man in a grey suit")
    ok = "A Woman in a black-coat and an elderly man, in a grey suit, eat at the table."
    check_answer(ok, d, 2, "en")  # case and punctuation are ignored
    for args, reason in (((ok, d[:1], 2, "en"), "1 subjects for 2"), ((ok, d + ("a dog",), 2, "en"), "3 subjects"),
                         (("a woman in a black coat eats", d, 2, "en"), "reference 2"),
                         ((ok, (d[0], ""), 2, "en"), "reference 2 is empty"), (("", d, 2, "en"), "empty"),
                         ((ok, d, 2, "zh"), "not in Simplified Chinese")):
        with pytest.raises(UnusableAnswer, match=reason):
            check_answer(*args)
    check_answer("穿黑色外套的女人和穿灰色西装的老人在吃饭", ("穿黑色外套的女人", "穿灰色西装的老人"), 2, "zh")
    with pytest.raises(UnusableAnswer, match="not in English"):
        check_answer("穿黑色外套的女人在吃饭", ("穿黑色外套的女人",), 1, "en")


# --------------------------------------------------------------------------------------- endpoint back-end
def test_endpoint_request_shape_key_and_cache(chat_server, monkeypatch, caplog):
    descs = ["a woman in a black coat", "a girl in a white dress"]
    server = chat_server([{"content": good_answer(descs)}])
    monkeypatch.setenv("PHANTOM_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    images = make_images(2, size=(900, 600))  # downscaled to 768 px on the longer side before sending
    r = Rephraser(endpoint(server.url), cache=RephraseCache())
    result = r.rephrase("A family is having a meal", images, hints=["the mother"], language="auto")

    assert result.descriptions == tuple(descs) and result.validated and not result.cached
    assert len(server.requests) == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["json"]
    assert body["model"] == "vlm-test" and body["temperature"] == 0.0 and body["stream"] is False
    assert body["max_tokens"] == 512 and body["seed"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    parts = body["messages"][1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    sent = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]
    assert [im.size for im in sent] == [(768, 512)] * 2
    assert np.abs(np.asarray(sent[0], np.float32) - np.asarray(images[0].resize((768, 512)), np.float32)).mean() < 40
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert texts[0] == "Reference 1 (user's hint: the mother):" and texts[1] == "Reference 2:"

    again = r.rephrase("A family is having a meal", images, hints=["the mother"], language="en")
    assert again.cached and again.prompt == result.prompt and len(server.requests) == 1
    r.rephrase("A family is having a meal", images, hints=["the father"])
    assert len(server.requests) == 2  # a different hint is a different key
    Rephraser(endpoint(server.url, model="other"), cache=r.cache).rephrase("A family is having a meal", images,
                                                                            hints=["the mother"])
    assert len(server.requests) == 3  # so is another model

    everything = caplog.text + json.dumps(result.to_json()) + json.dumps(r.backend.settings())
    assert KEY not in everything and "vlm-test" in caplog.text


def test_endpoint_retries_transient_http_errors(chat_server):
    server = chat_server([{"status": 503, "body": {"error": "loading"}}, {"content": good_answer(["a red car"])}])
    result = Rephraser(endpoint(server.url, api_key_env=""), cache=RephraseCache()).rephrase("a car", make_images(1))
    assert result.descriptions == ("a red car",) and len(server.requests) == 2
    assert "Authorization" not in server.requests[0]["headers"]


def test_endpoint_http_error_is_reported_without_retry_or_key(chat_server, monkeypatch):
    monkeypatch.setenv("PHANTOM_TEST_KEY", KEY)
    server = chat_server([{"status": 401, "body": {"error": f"invalid key {KEY}"}}])
    with pytest.raises(RephraseError) as info:
        Rephraser(endpoint(server.url), cache=RephraseCache()).rephrase("a car", make_images(1))
    msg = str(info.value)
    assert "OpenAI-compatible endpoint" in msg and "HTTP 401" in msg and "***" in msg and KEY not in msg
    assert len(server.requests) == 1


def test_endpoint_timeout_is_bounded(chat_server):
    server = chat_server([{"delay": 1.5, "content": good_answer(["a red car"])}])
    t0 = time.monotonic()
    with pytest.raises(RephraseError, match=r"timed out after 0.3 s \(gave up after 2 attempts\)"):
        Rephraser(endpoint(server.url, timeout_s=0.3, api_key_env=""), cache=RephraseCache()).rephrase(
            "a car", make_images(1))
    assert time.monotonic() - t0 < 1.4 and len(server.requests) == 2


def test_endpoint_timeout_is_total_per_request_against_a_trickling_server(chat_server):
    """20 bytes every 0.2 s: each read succeeds well within 0.5 s, the whole reply would take ~3 s."""
    body = good_answer(["a red car"]).ljust(300)
    server = chat_server([{"body": body, "trickle": (20, 0.2)}])
    t0 = time.monotonic()
    with pytest.raises(RephraseError, match=r"timed out after 0.5 s \(gave up after 2 attempts\)"):
        Rephraser(endpoint(server.url, timeout_s=0.5, api_key_env=""), cache=RephraseCache()).rephrase(
            "a car", make_images(1))
    assert time.monotonic() - t0 < 1.6 and len(server.requests) == 2


def test_rephrase_time_limit_covers_every_retry(chat_server):
    """503 after 0.3 s, 5 transport retries per attempt, 2 attempts: unbounded this would take ~3.6 s."""
    server = chat_server([{"status": 503, "body": {"error": "busy"}, "delay": 0.3}])
    t0 = time.monotonic()
    with pytest.raises(RephraseError, match="OpenAI-compatible endpoint.*overall time limit ran out"):
        Rephraser(endpoint(server.url, api_key_env="", max_retries=5), cache=RephraseCache(),
                  time_limit_s=1.0).rephrase("a car", make_images(1))
    assert time.monotonic() - t0 < 1.5 and 2 <= len(server.requests) <= 4
    trickle = chat_server([{"body": good_answer(["a red car"]).ljust(300), "trickle": (20, 0.2)}])
    t0 = time.monotonic()
    with pytest.raises(RephraseError, match="overall time limit ran out while waiting"):
        Rephraser(endpoint(trickle.url, api_key_env="", timeout_s=30.0), cache=RephraseCache(),
                  time_limit_s=0.7).rephrase("a car", make_images(1))
    assert time.monotonic() - t0 < 1.2
    with pytest.raises(ValueError, match="time_limit_s is 0"):
        Rephraser(endpoint(trickle.url), time_limit_s=0)


def test_endpoint_label_hides_credentials_and_key_like_variable_names(chat_server):
    server = chat_server([{"status": 400, "body": {"error": "bad request"}}])
    url = server.url.replace("http://", "http://user:tok-SECRET-1@") + "?api_key=q-SECRET-2"
    backend = endpoint(url, api_key_env="")
    assert "SECRET" not in backend.label and backend.label.startswith(f"OpenAI-compatible endpoint {server.url}/")
    with pytest.raises(RephraseError) as info:
        Rephraser(backend, cache=RephraseCache()).rephrase("a car", make_images(1))
    assert "HTTP 400" in str(info.value) and "SECRET" not in str(info.value)
    (request,) = server.requests  # the request itself still carries the query string and the credentials
    assert request["path"] == "/v1/chat/completions?api_key=q-SECRET-2"
    assert request["headers"]["Authorization"].startswith("Basic ")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RephraseError, match="cannot connect") as info:
        Rephraser(endpoint(f"http://u:p-SECRET@127.0.0.1:{port}/v1?k=SECRET", api_key_env="", max_retries=0),
                  cache=RephraseCache()).rephrase("a car", make_images(1))
    assert "SECRET" not in str(info.value)
    for pasted in (KEY, "sk-proj-abc", "ghp_a1B2c3D4e5F6g7H8i9J0kLmN", "my key"):
        with pytest.raises(ValueError, match="api_key_env must be the NAME of an environment variable") as info:
            make_backend("openai-compatible", endpoint_url=server.url, endpoint_model="m", api_key_env=pasted)
        assert pasted not in str(info.value)
    for name in ("OPENAI_API_KEY", "HF_TOKEN", "my_service_key_2024"):
        make_backend("openai-compatible", endpoint_url=server.url, endpoint_model="m", api_key_env=name)


def test_unreachable_endpoint_and_missing_key_variable(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(RephraseError, match=f"cannot connect.*127.0.0.1:{port}"):
        Rephraser(endpoint(f"http://127.0.0.1:{port}/v1", api_key_env=""), cache=RephraseCache()).rephrase(
            "a car", make_images(1))
    monkeypatch.delenv("PHANTOM_TEST_KEY", raising=False)
    with pytest.raises(RephraseError, match="environment variable PHANTOM_TEST_KEY"):
        Rephraser(endpoint(f"http://127.0.0.1:{port}/v1"), cache=RephraseCache()).rephrase("a car", make_images(1))


def test_unusable_answer_is_retried_once_with_the_reason(chat_server):
    dropped = good_answer(["a red car"], prompt="a red car and a blue bike race")  # drops reference 2
    fixed = good_answer(["a red car", "a blue bike"], prompt="a red car and a blue bike race")
    server = chat_server([{"content": dropped}, {"content": fixed}])
    result = Rephraser(endpoint(server.url, api_key_env=""), cache=RephraseCache()).rephrase(
        "a car and a bike race", make_images(2))
    assert result.descriptions == ("a red car", "a blue bike") and len(server.requests) == 2
    retry = server.requests[1]["json"]["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert retry[2]["content"] == dropped and "1 subjects for 2 references" in retry[3]["content"][0]["text"]


@pytest.mark.parametrize("item, reason", [({"content": "Here is a nice prompt about a car."}, "no JSON"),
                                          ({"content": ""}, "empty"),
                                          ({"content": None, "refusal": "not allowed"}, "refused")])
def test_unusable_answer_twice_is_an_error(chat_server, item, reason):
    server = chat_server([item])
    with pytest.raises(RephraseError, match=f"OpenAI-compatible endpoint.*unusable answer after 2 attempts.*{reason}"):
        Rephraser(endpoint(server.url, api_key_env=""), cache=RephraseCache()).rephrase("a car", make_images(1))
    assert len(server.requests) == 2


def test_lenient_mode_returns_the_raw_text(chat_server):
    server = chat_server([{"content": "A red car drives at night."}])
    cache = RephraseCache()
    result = Rephraser(endpoint(server.url, api_key_env=""), cache=cache, strict=False).rephrase(
        "a car", make_images(2))
    assert result.prompt == "A red car drives at night." and result.descriptions == ("", "")
    assert not result.validated and len(server.requests) == 2


def test_disk_cache_survives_a_new_process_cache(chat_server, tmp_path):
    server = chat_server([{"content": good_answer(["a red car"])}])
    for k in range(2):
        r = Rephraser(endpoint(server.url, api_key_env=""), cache=RephraseCache(directory=tmp_path))
        assert r.rephrase("a car", make_images(1)).cached == (k == 1)
    assert len(server.requests) == 1 and len(list(tmp_path.glob("*.json"))) == 1


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_rephrase_endpoint(chat_server, tmp_path, capsys, monkeypatch):
    server = chat_server([{"content": good_answer(["a red car", "a blue bike"], "a red car passes a blue bike")}])
    refs = []
    for k, im in enumerate(make_images(2)):
        refs += ["--ref", str(tmp_path / f"r{k}.png")]
        im.save(refs[-1])
    monkeypatch.setenv("PHANTOM_TEST_KEY", KEY)
    args = ["rephrase", *refs, "--prompt", "a car passes a bike", "--endpoint", server.url, "--model", "vlm-test",
            "--api-key-env", "PHANTOM_TEST_KEY", "--hint", "", "--hint", "the bike"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip() == "a red car passes a blue bike"
    assert "(user's hint: the bike)" in json.dumps(server.requests[0]["json"])
    assert cli_main(args + ["--json"]) == 0  # in-process default cache: no second request
    out = json.loads(capsys.readouterr().out)
    assert out["descriptions"] == ["a red car", "a blue bike"] and out["cached"] and len(server.requests) == 1
    assert cli_main(["rephrase", *refs, "--prompt", "x"]) == 2
    assert "either --endpoint" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        cli_main(["rephrase", "--help"])
    assert "auto: Chinese if the prompt is mostly Chinese, else English" in " ".join(capsys.readouterr().out.split())
    proc = subprocess.run([sys.executable, "-m", "phantom_core", "rephrase", *refs, "--prompt", "a car passes a bike",
                           "--endpoint", server.url + "/", "--model", "vlm-test"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "a red car passes a blue bike" and len(server.requests) == 2


def test_cli_reads_references_like_generate(chat_server, tmp_path, capsys):
    """Transparent pixels are white (not black) and EXIF orientation is applied, as `generate --rephrase` does."""
    server = chat_server([{"content": good_answer(["a red square"], "a red square spins")}])
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:30, 20:40] = (255, 0, 0, 255)  # an opaque red square on a fully transparent background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp_path / "rotated.jpg", exif=exif)
    assert cli_main(["rephrase", "--ref", str(tmp_path / "cutout.png"), "--ref", str(tmp_path / "rotated.jpg"),
                     "--prompt", "a square spins", "--endpoint", server.url, "--model", "vlm-test", "--lenient"]) == 0
    parts = server.requests[0]["json"]["messages"][1]["content"]
    sent = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))))
            for p in parts if p["type"] == "image_url"]
    assert sent[0].shape == (40, 60, 3) and (sent[0][0, 0] == 255).all() and tuple(sent[0][20, 30]) == (255, 0, 0)
    assert sent[1].shape == (60, 40, 3)  # portrait once the EXIF orientation is applied


def test_rephraser_names_have_one_home_and_one_import_point():
    """The rephraser's public names come from the `phantom_core` facade, each the very object of its one home
    module (no copies, no re-exports), and a rephraser shares the process-wide cache by default."""
    import phantom_core
    from phantom_core.rephrase import backends, cache, rephraser, types

    homes = {rephraser: ["Rephraser"], backends: ["make_backend"], types: ["RephraseError", "RephraseResult"]}
    for module, names in homes.items():
        for name in names:
            assert getattr(phantom_core, name) is getattr(module, name), name
    assert rephraser.Rephraser(make_backend("openai-compatible", endpoint_url="http://127.0.0.1:1/v1",
                                            endpoint_model="m")).cache is cache.DEFAULT_CACHE
