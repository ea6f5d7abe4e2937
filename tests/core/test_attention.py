"""Attention back-ends (phantom_core/wan/attention.py): every back-end against the float32 ``math`` reference, the
whole forward of both networks under ``sdpa`` and ``math``, the selection rules (``auto``, explicit, the
environment variable, scopes) with the optional packages' presence pretended, and the CLI's ``--attention``.

Tolerances: fp32 ``sdpa`` vs ``math`` within 1e-5 of the output's largest magnitude (measured: ~2e-7 on the
tiny networks); the optional GPU kernels in bf16 within the mean relative errors stated by their tests. FlashAttention
and SageAttention are tested only where they are importable and CUDA is present (skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import Tensor

import phantom_core.wan.attention as attn
from phantom_core.__main__ import build_parser, main
from phantom_core.inference.cli import resolve_generate_args
from phantom_core.mmdit.config import MMDIT_PRESETS
from phantom_core.mmdit.model import PhantomMMDiT
from phantom_core.wan.attention import (
    ATTENTION_BACKENDS,
    ATTENTION_CHOICES,
    AttentionBackend,
    attention,
    check_attention,
    resolve_attention,
    selected_attention,
    use_attention,
)
from phantom_core.wan.dit import DIT_PRESETS, PhantomWanDiT
from tests.support.files import make_tiny_files, model_args
from tests.support.weights import random_state_dict

NETWORKS = {"phantom-wan": lambda: PhantomWanDiT(DIT_PRESETS["tiny"]),
            "mmdit": lambda: PhantomMMDiT(MMDIT_PRESETS["tiny"])}


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(attn.ATTENTION_ENV, raising=False)


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def qkv(lq: int = 37, lk: int = 53, heads: int = 3, d: int = 64, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, heads, d, generator=g) for n in (lq, lk, lk))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def networks_inputs(model) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 16, 16, generator=g)
    ctx = torch.randn(1, 7, model.config.text_dim, generator=g)
    return x, torch.tensor([700.0]), ctx, torch.randn(1, 16, 1, 16, 16, generator=g)


@pytest.fixture(scope="module", params=list(NETWORKS))
def network(request):
    model = NETWORKS[request.param]()
    model.load_state_dict(random_state_dict(model, seed=3))
    return model.eval()


# ------------------------------------------------------------------------------------------ the numbers


def test_sdpa_equals_the_float32_formula():
    q, k, v = qkv()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 8.0  # d = 64: an independent fp64 oracle
    oracle = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    for name in ("sdpa", "math"):
        with use_attention(name):
            out = attention(q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert rel_err(out, oracle) < 1e-5, name


@torch.no_grad()
def test_whole_forward_sdpa_equals_math(network):
    """The plain path (sdpa) and the fp32 reference give the same velocity within 1e-5 (relative to its max)."""
    inputs = networks_inputs(network)
    with use_attention("sdpa"):
        sdpa = network(*inputs)
    with use_attention("math"):
        math = network(*inputs)
    assert sdpa.abs().max() > 1e-3
    assert rel_err(sdpa, math) < 1e-5
    assert torch.equal(network(*inputs), sdpa)  # the default on a CPU is sdpa itself


def counting_backend(monkeypatch, name: str) -> list[tuple[int, ...]]:
    """Replace back-end ``name`` by one that records each call's q shape and runs sdpa, on any device, installed."""
    calls: list[tuple[int, ...]] = []

    def kernel(q, k, v):
        calls.append(tuple(q.shape))
        return ATTENTION_BACKENDS["sdpa"].kernel(q, k, v)

    monkeypatch.setitem(ATTENTION_BACKENDS, name, AttentionBackend(name, kernel, package="pretend"))
    monkeypatch.setitem(attn.INSTALLED, name, True)
    return calls


@torch.no_grad()
def test_every_attention_of_both_networks_runs_the_selected_backend(network, monkeypatch):
    calls = counting_backend(monkeypatch, "flash")
    inputs = networks_inputs(network)
    with use_attention("sdpa"):
        plain = network(*inputs)
    assert calls == []
    with use_attention("flash"):
        out = network(*inputs)
    layers = network.config.num_layers
    if isinstance(network, PhantomWanDiT):  # self- and cross-attention of every block
        assert len(calls) == 2 * layers
    else:  # at least one batch of windows per joint block
        assert len(calls) >= layers
    assert rel_err(out, plain) < 1e-6


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_optional_gpu_kernel_against_sdpa(name):
    """Skipped unless the package imports and CUDA is there. bf16, (2, 1024, 4, 128): mean |kernel - sdpa| within
    1% (flash) / 3% (sage, INT8 q k^T) of mean |sdpa|."""
    package = ATTENTION_BACKENDS[name].package
    if importlib.util.find_spec(package) is None or not torch.cuda.is_available():
        pytest.skip(f"{package} not installed or no CUDA")
    q, k, v = qkv(1024, 1024, 4, 128, torch.bfloat16, "cuda")
    with use_attention("sdpa"):
        ref = attention(q, k, v).float()
    with use_attention(name):
        out = attention(q, k, v).float()
    assert out.shape == ref.shape
    assert ((out - ref).abs().mean() / ref.abs().mean()).item() < {"flash": 0.01, "sage": 0.03}[name]


# ------------------------------------------------------------------------------------------ selection


def pretend_installed(monkeypatch, **present: bool) -> None:
    for name, on in present.items():
        monkeypatch.setitem(attn.INSTALLED, name, on)


def test_auto_prefers_flash_then_sage_where_they_fit(monkeypatch):
    pretend_installed(monkeypatch, flash=True, sage=True)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert resolve_attention("auto", "cpu", bf16, 128) == "sdpa"  # CPU: never a CUDA kernel
    assert resolve_attention("auto", "cuda", bf16, 128) == "flash"
    assert resolve_attention("auto", "cuda", fp32, 128) == "sdpa"  # neither takes fp32
    assert resolve_attention("auto", "cuda", fp16, 264) == "sdpa"  # head_dim beyond both
    pretend_installed(monkeypatch, flash=False)
    assert resolve_attention("auto", "cuda", fp16, 128) == "sage"
    assert resolve_attention("auto", "cuda", fp16, 80) == "sdpa"  # sage: 64, 96, 128 only
    pretend_installed(monkeypatch, sage=False)
    assert resolve_attention("auto", "cuda", bf16, 128) == "sdpa"
    assert resolve_attention("auto", "mps", torch.float16, 64) == "sdpa"


def test_explicit_backends_are_refused_when_missing_or_unfit(monkeypatch):
    pretend_installed(monkeypatch, flash=False, sage=False)
    with pytest.raises(ValueError, match=r"attention: 'flash' needs the Python package 'flash_attn'.*available: "
                                         r"auto, sdpa, math"):
        check_attention("flash")
    with pytest.raises(ValueError, match="'sageattention'"):
        resolve_attention("sage", "cuda", torch.bfloat16, 128)
    pretend_installed(monkeypatch, flash=True)
    with pytest.raises(ValueError, match="'flash' cannot run .* CUDA only, the tensors are on cpu; choose auto"):
        resolve_attention("flash", "cpu", torch.bfloat16, 128)
    with pytest.raises(ValueError, match="it takes float16, bfloat16, the tensors are float32"):
        resolve_attention("flash", "cuda", torch.float32, 128)
    assert resolve_attention("flash", "cuda", torch.bfloat16, 128) == "flash"
    assert resolve_attention("math", "cpu", torch.float64, 7) == "math"  # sdpa and math take anything
    assert resolve_attention("sdpa", "cuda", torch.float32, 7) == "sdpa"
    with pytest.raises(ValueError, match=r"attention: got 'xformers'; valid: auto, sdpa, flash, sage, math"):
        check_attention("xformers")
    with pytest.raises(ValueError, match="cannot run"), use_attention("flash"):  # refused at the call, not replaced
        attention(*qkv(dtype=torch.bfloat16))


def test_scope_then_environment_then_auto(monkeypatch):
    assert selected_attention() == "auto" and ATTENTION_CHOICES == ("auto", "sdpa", "flash", "sage", "math")
    monkeypatch.setenv(attn.ATTENTION_ENV, "Math")
    assert selected_attention() == "math"
    with use_attention("sdpa") as chosen:
        assert chosen == selected_attention() == "sdpa"
        with use_attention(None) as inner:  # None: leave the outer choice
            assert inner == "sdpa"
    assert selected_attention() == "math"
    with pytest.raises(RuntimeError), use_attention("sdpa"):
        raise RuntimeError("boom")
    assert selected_attention() == "math"  # restored after an exception too
    monkeypatch.setenv(attn.ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match=r"environment variable PHANTOM_ATTENTION: got 'fast'; valid"):
        selected_attention()
    with pytest.raises(ValueError, match="attention: got 'fast'"), use_attention("fast"):
        pass


# ------------------------------------------------------------------------------------------ the CLI


def parse(argv: list[str]):
    return build_parser().parse_args(argv)


BASE = ["generate", "--dit", "d", "--vae", "v", "--text-encoder", "t", "--ref", "r", "--prompt", "p", "--out", "o.mp4"]


def test_cli_attention_and_compile_options(monkeypatch, capsys):
    kw = resolve_generate_args(parse(BASE))
    assert (kw["attention"], kw["compiled"]) == (None, False)  # not given: $PHANTOM_ATTENTION or auto; not compiled
    kw = resolve_generate_args(parse([*BASE, "--attention", "math", "--compile"]))
    assert (kw["attention"], kw["compiled"]) == ("math", True)
    with pytest.raises(SystemExit):
        parse([*BASE, "--attention", "xformers"])
    assert "invalid choice: 'xformers'" in capsys.readouterr().err
    pretend_installed(monkeypatch, flash=False)
    with pytest.raises(ValueError, match="--attention: 'flash' needs the Python package 'flash_attn'"):
        resolve_generate_args(parse([*BASE, "--attention", "flash"]))


def test_cli_records_the_attention_choice_and_backend(tmp_path, capsys):
    files = make_tiny_files(tmp_path, seed=0, sizes=[(40, 56), (64, 30)])
    out = tmp_path / "v.mp4"
    argv = ["generate", *model_args(files), "--prompt", "p", "--width", "32", "--height", "32", "--frames", "1",
            "--steps", "2", "--seed", "3", "--no-progress", "--attention", "math", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "attention math)" in capsys.readouterr().err
    runtime = json.loads(out.with_suffix(".json").read_text())["runtime"]
    assert (runtime["attention"], runtime["compiled"], runtime["resolved"]["attention"]) == ("math", False, "math")
    kw = resolve_generate_args(parse(["generate", "--from-sidecar", str(out.with_suffix(".json")), "--out", "x.mp4"]))
    assert (kw["attention"], kw["compiled"]) == ("math", False)  # the sidecar's choice comes back
