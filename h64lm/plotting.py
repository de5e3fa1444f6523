"""Plot conventions shared by the trainer's per-run figures and the sweep report, so that one
colour means one expert load everywhere.

Expert load is drawn as load / mean load (1 = balanced) on a fixed log colour scale centred at 1:
an expert at twice its share and one at half of it are equally far from white. The limits are
fixed, not fitted to the data, because the trainer draws one run at a time and the report compares
many: a fitted scale would give the same red to 2x in one figure and 8x in another. 8x covers the
largest possible overload E/k (an expert taking every token) of 8 experts top-1, 16 top-2 and 64
top-8; beyond it, and below 1/8 (a starved expert, zero load included), colours saturate.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LOAD_RATIO_CMAP", "LOAD_RATIO_LIMIT", "clip_load_ratio", "load_ratio_colorbar",
           "load_ratio_norm"]

LOAD_RATIO_LIMIT = 8.0  # colour limits 1/8x .. 8x of the mean load
LOAD_RATIO_CMAP = "RdBu_r"  # red: over-used, white: balanced, blue: under-used


def load_ratio_norm() -> Any:
    """The colour norm of every expert-load heat map: LogNorm over 1/LIMIT .. LIMIT."""
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=1 / LOAD_RATIO_LIMIT, vmax=LOAD_RATIO_LIMIT, clip=True)


def clip_load_ratio(rows: Any) -> Any:
    """Ratios clipped into the colour limits (NaN kept as "no data"). A zero load has no logarithm:
    unclipped, LogNorm would draw a starved expert as missing instead of darkest blue."""
    import numpy as np

    return np.clip(np.asarray(rows, dtype=float), 1 / LOAD_RATIO_LIMIT, LOAD_RATIO_LIMIT)


def load_ratio_colorbar(fig: Any, image: Any, ax: Any) -> Any:
    """A colour bar ticked at the powers of 2 (1/8, 1/4, ..., 8), arrows for saturation."""
    top = int(math.log2(LOAD_RATIO_LIMIT))
    ticks = [2.0**k for k in range(-top, top + 1)]
    bar = fig.colorbar(image, ax=ax, ticks=ticks, extend="both")
    bar.ax.set_yticklabels([f"{t:g}x" if t >= 1 else f"1/{1 / t:g}x" for t in ticks])
    bar.ax.minorticks_off()  # a log colour bar otherwise draws (and lays out) dozens of ticks
    bar.set_label("load / mean load (1 = balanced)")
    return bar
