"""Swap the weighted layers of a transformers ``UMT5EncoderModel`` for cast-on-forward ones (``fp8.fp8_ops``).

transformers builds the umT5 stack from plain ``nn.Linear`` / ``nn.Embedding`` and offers no ``ops`` argument, so
the loader replaces them on the meta-device model before the weights are assigned: every ``nn.Linear`` (q, k, v,
o, wi_0, wi_1, wo) and the token embedding ``shared`` (1 G parameters in umT5-XXL; ComfyUI's fp8 files store
it in fp8 too) become ``ops.Linear`` / ``ops.Embedding`` with the same key names. The per-head relative
position biases are tiny and stay plain (loaded in the compute dtype).

One transformers quirk must be bypassed: its feed-forward casts the hidden states to ``wo.weight.dtype`` before
``wo`` (meant for int8 / fp32-kept ``wo``). With an fp8 ``wo`` that would quantize the activations to 8 bits, so
the feed-forward modules are replaced by ``FeedForward`` (same children, same maths, no such cast).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:  # this module must not load transformers: only the loader that builds the model does
    from transformers import UMT5EncoderModel


class FeedForward(nn.Module):
    """umT5 feed-forward: ``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``; children keep their names.

    Dropout is omitted: the encoder only runs in inference (transformers' rate is 0 in our config anyway).
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.gated = hasattr(original, "wi_0")
        if self.gated:
            self.wi_0, self.wi_1 = original.wi_0, original.wi_1
        else:
            self.wi = original.wi
        self.wo = original.wo
        self.act: Callable[[Tensor], Tensor] = original.act

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, d_model)`` -> ``(B, L, d_model)`` in the layers' compute dtype."""
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))  # (B, L, d_ff) -> (B, L, d_model)
        return self.wo(self.act(self.wi(x)))


def use_cast_layers(model: UMT5EncoderModel, ops: SimpleNamespace) -> None:
    """Replace, in place and on the meta device, ``model``'s Linear layers, its ``shared`` embedding and its
    feed-forward modules (see the module docstring). ``ops`` is ``fp8.fp8_ops(compute_dtype)``.

    The encoder's ``embed_tokens`` (tied to ``shared``) is re-pointed at the new ``shared``.
    """
    kw = {"device": "meta", "dtype": ops.compute_dtype}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, ops.Linear(child.in_features, child.out_features,
                                                 bias=child.bias is not None, **kw))
    model.shared = ops.Embedding(model.shared.num_embeddings, model.shared.embedding_dim, **kw)
    model.set_input_embeddings(model.shared)
    for layer_ff in [m for m in model.modules() if hasattr(m, "DenseReluDense")]:
        layer_ff.DenseReluDense = FeedForward(layer_ff.DenseReluDense)
