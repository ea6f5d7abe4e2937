"""What a node shows: numeric widgets and text drawn on the node.

The numeric widgets are declared from the core's ranges (`phantom_core.inference.settings.Range`), so that a
widget's min / max (and an integer's step) are exactly what the core accepts: a value the UI lets through is
never refused later, after the models have loaded. tests/nodes/test_validation.py compares them through /object_info.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from phantom_core.inference.settings import Range


def int_input(name: str, limits: Range, default: int, tooltip: str, **options: Any) -> io.Int.Input:
    """An INT widget spanning `limits` (min, max, step)."""
    return io.Int.Input(name, default=default, min=limits.low, max=limits.high, step=limits.step, tooltip=tooltip,
                        **options)


def float_input(name: str, limits: Range, default: float, step: float, tooltip: str, **options: Any) -> io.Float.Input:
    """A FLOAT widget spanning `limits` (min, max), moved by `step` in the UI."""
    return io.Float.Input(name, default=default, min=limits.low, max=limits.high, step=step, tooltip=tooltip, **options)


def show_on_node(text: str, node_id: str | None) -> None:
    """Draw `text` on the node (the frontend's progress-text preview, which the bundled frontend draws on any
    node; a `ui` "text" output is drawn only on PreviewAny); a no-op outside a running server."""
    from server import PromptServer

    if node_id is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_progress_text(text, node_id)
