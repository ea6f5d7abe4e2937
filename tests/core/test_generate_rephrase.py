"""`generate --rephrase`: the prompt is rewritten by the rephraser before it is encoded, the sidecar records both
prompts, the descriptions and the rephraser's settings (never the key), and `--from-sidecar` regenerates from
the recorded rewritten prompt without asking the model again.

The tiny default checkpoints, a 64x64 x 5-frame video with 2 steps, and a recording chat-completions server on
127.0.0.1 (from test_rephraser) that stands in for the vision-language model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from phantom_core.__main__ import build_parser, main
from phantom_core.inference.sidecar import build_sidecar, write_sidecar
from phantom_core.rephrase.cli import add_rephrase_backend_arguments
from phantom_core.rephrase.rephraser import Rephraser
from phantom_core.video_io import read_mp4_frames
from tests.support.chat import good_answer
from tests.support.files import make_tiny_files, model_args

KEY_ENV = "PHANTOM_GENERATE_REPHRASE_TEST_KEY"
KEY = "sk-generate-SECRET-5566778899"
ORIGINAL = "a car passes a bike on a rainy street"
DESCRIPTIONS = ["a red vintage car with chrome bumpers", "a blue racing bike"]
REWRITTEN = "a red vintage car with chrome bumpers passes a blue racing bike on a rainy street, low angle"
SMALL = ["--width", "64", "--height", "64", "--frames", "5", "--steps", "2", "--solver", "euler", "--seed", "11",
         "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_files(tmp_path_factory.mktemp("generate_rephrase"), seed=3, sizes=[(48, 64), (64, 40)])


def test_prefixed_options_do_not_clash_with_generate():
    args = build_parser().parse_args(["generate", "--out", "v.mp4", "--seed", "3", "--rephrase-seed", "9",
                                      "--rephrase-timeout", "5", "--rephrase-model", "m", "--rephrase-hint", "x"])
    assert (args.seed, args.rephrase_seed, args.rephrase_timeout, args.rephrase_model) == (3, 9, 5.0, "m")
    assert args.rephrase_hint == ["x"] and not args.rephrase
    plain = argparse.ArgumentParser()
    add_rephrase_backend_arguments(plain)  # `rephrase` keeps its unprefixed flags
    ns = plain.parse_args(["--endpoint", "http://h/v1", "--model", "m", "--seed", "4", "--api-key-env", "K"])
    assert (ns.endpoint, ns.model, ns.seed, ns.api_key_env, ns.language) == ("http://h/v1", "m", 4, "K", "auto")


def test_generate_rephrase_sidecar_and_regeneration(files, chat_server, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server = chat_server([{"content": good_answer(DESCRIPTIONS, REWRITTEN)}])
    root = files["root"]
    out = root / "rephrased" / "video.mp4"
    argv = ["generate", *model_args(files), "--prompt", ORIGINAL, *SMALL, "--out", str(out), "--rephrase",
            "--rephrase-endpoint", server.url, "--rephrase-model", "vlm-test", "--rephrase-api-key-env", KEY_ENV,
            "--rephrase-hint", "", "--rephrase-hint", "the bike", "--rephrase-seed", "5",
            "--rephrase-temperature", "0.3"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"rephrased prompt: {REWRITTEN}" in capsys.readouterr().err
    # 1. one request: both references as images, the original prompt, the hint, the key, the rephraser's seed
    (request,) = server.requests
    body = request["json"]
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert sum(p["type"] == "image_url" for p in body["messages"][1]["content"]) == 2
    text = json.dumps(body, ensure_ascii=False)
    assert ORIGINAL in text and "(user's hint: the bike)" in text
    assert (body["model"], body["seed"], body["temperature"]) == ("vlm-test", 5, 0.3)
    # 2. the sidecar: the encoded prompt is the rewrite; the entry records both prompts and settings, no key
    side_text = out.with_suffix(".json").read_text(encoding="utf-8")
    record = json.loads(side_text)
    assert record["settings"]["prompt"] == REWRITTEN and record["seed"] == 11
    entry = record["rephrase"]
    assert (entry["original_prompt"], entry["prompt"], entry["descriptions"]) == (ORIGINAL, REWRITTEN, DESCRIPTIONS)
    assert entry["validated"] is True and entry["language"] == "en" and REWRITTEN in entry["raw_answer"]
    settings = entry["settings"]
    assert settings["backend"]["model"] == "vlm-test" and settings["backend"]["seed"] == 5
    assert settings["backend"]["url"] == server.url + "/chat/completions"
    assert (settings["api_key_env"], settings["hints"], settings["strict"]) == (KEY_ENV, ["", "the bike"], True)
    assert KEY not in side_text
    # 3. the rewritten prompt reached the text encoder: same video as generating from it directly
    direct = root / "direct" / "video.mp4"
    assert main(["generate", *model_args(files), "--prompt", REWRITTEN, *SMALL, "--out", str(direct)]) == 0
    plain = root / "plain" / "video.mp4"
    assert main(["generate", *model_args(files), "--prompt", ORIGINAL, *SMALL, "--out", str(plain)]) == 0
    frames, frames_direct, frames_plain = (read_mp4_frames(p) for p in (out, direct, plain))
    assert frames.shape == (5, 64, 64, 3) and frames.std() > 5
    assert np.array_equal(frames, frames_direct)
    assert np.abs(frames.astype(int) - frames_plain.astype(int)).mean() > 1  # the original prompt differs
    assert "rephrase" not in json.loads(direct.with_suffix(".json").read_text())
    # 4. regenerate from the sidecar: no model call at all (the rephraser may not even be built)
    server.close()

    def no_call(*args, **kwargs):
        raise AssertionError("the rephraser was asked again")

    monkeypatch.setattr(Rephraser, "rephrase", no_call)
    again = root / "again" / "video.mp4"
    assert main(["generate", "--from-sidecar", str(out.with_suffix(".json")), "--out", str(again),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert np.array_equal(read_mp4_frames(again), frames)
    carried = json.loads(again.with_suffix(".json").read_text())
    assert carried["settings"]["prompt"] == REWRITTEN
    assert carried["rephrase"]["original_prompt"] == ORIGINAL
    assert carried["rephrase"]["reused_from"] == str(out.with_suffix(".json").resolve())
    assert len(server.requests) == 1


def test_from_sidecar_rephrase_asks_again_from_the_original(files, chat_server, monkeypatch, capsys, tmp_path):
    """`--from-sidecar --rephrase` rewrites the recorded original prompt (not the rewrite); a new `--prompt`
    without `--rephrase` drops the entry. The sampling is stubbed: only prompts and sidecars matter here."""
    import phantom_core.inference.cli as cli

    def fake_generate_to_file(**kw):
        out = Path(kw["out_path"])
        out.write_bytes(b"not a video")
        record = build_sidecar(kw["settings"], dit_path=kw["dit_path"], vae_path=kw["vae_path"],
                               text_encoder_path=kw["text_encoder_path"], ref_paths=kw["ref_paths"],
                               dtype=kw["dtype"], device=kw["device"], out_path=out)
        return out, write_sidecar(record, kw["sidecar_path"])

    monkeypatch.setattr(cli, "generate_to_file", fake_generate_to_file)
    first = chat_server([{"content": good_answer(DESCRIPTIONS, REWRITTEN)}])
    common = ["--rephrase", "--rephrase-model", "vlm-test", "--no-progress", "--seed", "1"]
    assert main(["generate", *model_args(files), "--prompt", ORIGINAL, "--out", str(tmp_path / "a.mp4"), *common,
                 "--rephrase-endpoint", first.url]) == 0, capsys.readouterr().err
    second_prompt = "a red vintage car with chrome bumpers overtakes a blue racing bike in the rain"
    second = chat_server([{"content": good_answer(DESCRIPTIONS, second_prompt)}])
    assert main(["generate", "--from-sidecar", str(tmp_path / "a.json"), "--out", str(tmp_path / "b.mp4"),
                 *common, "--rephrase-endpoint", second.url]) == 0, capsys.readouterr().err
    asked = json.dumps(second.requests[0]["json"])
    assert ORIGINAL in asked and REWRITTEN not in asked
    b = json.loads((tmp_path / "b.json").read_text())
    assert (b["settings"]["prompt"], b["rephrase"]["original_prompt"]) == (second_prompt, ORIGINAL)
    assert main(["generate", "--from-sidecar", str(tmp_path / "b.json"), "--out", str(tmp_path / "c.mp4"),
                 "--prompt", "something else", "--no-progress"]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["settings"]["prompt"] == "something else" and "rephrase" not in c


def test_rephrase_errors(files, chat_server, capsys, tmp_path):
    out = str(tmp_path / "v.mp4")
    base = ["generate", *model_args(files), "--prompt", ORIGINAL, *SMALL, "--out", out]
    assert main([*base, "--rephrase"]) == 2
    assert "give either --rephrase-endpoint URL --rephrase-model NAME" in capsys.readouterr().err
    assert main([*base, "--rephrase-endpoint", "http://127.0.0.1:9/v1"]) == 2
    assert "given without --rephrase" in capsys.readouterr().err
    refusing = chat_server([{"content": "I'm sorry, I can't help with that."}])
    assert main([*base, "--rephrase", "--rephrase-endpoint", refusing.url, "--rephrase-model", "vlm-test"]) == 1
    err = capsys.readouterr().err
    assert "unusable answer after 2 attempts" in err and len(refusing.requests) == 2
    assert not Path(out).exists() and not Path(out).with_suffix(".json").exists()
