"""matplotlib, imported only when a PNG is asked for (it is an optional extra, not a runtime requirement),
and figures turned into PNG bytes for the atomic writers of library.destination."""

from __future__ import annotations

import io

from library.errors import LoraToolsError

HINT = "PNG output needs matplotlib, an optional extra: pip install -r requirements-extras.txt"


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LoraToolsError(HINT) from None
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()
