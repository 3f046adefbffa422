"""The temperature's unit: the layer's *margin*, measured on the current centroids (empty ones re-seeded).

The margin is the mean, over weight vectors, of the squared distance to the
second-nearest centroid minus that to the nearest: the logit gap a softmax at
temperature 1 would see.  Measuring ``tau`` in it gives the same sharpness at
any weight scale, bit width and vector length (the k-means distortion would
not: vectors have small margins next to it).  Margins (and squared norms, for
the floor) beyond ``MARGIN_CLIP`` times their median count as that much
(:func:`.hard.clipped_mean`), so a few outlying weights do not set the
temperature of all the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hard import clipped_mean, nearest_two, reseed_empty, squared_norms

#: The margin never drops below this fraction of the weights' mean square,
#: so a layer with duplicate centroids still gets a finite temperature.
MARGIN_FLOOR = 1e-6


def margin(
    x: Tensor,
    m: Tensor | None,
    c: Tensor,
    rows: int,
    two: tuple[Tensor, Tensor, Tensor] | None = None,
    picks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Re-seed empty centroids; return them and the layer's margin per group ``(G,)``.

    ``two``: :func:`.hard.nearest_two` of ``x`` at ``c``, if already known; ``picks``: the
    median's sample positions per group (:func:`.hard.median_picks`, for layers stacked as groups).
    """
    with torch.no_grad():
        index, first, second = nearest_two(x, c, rows) if two is None else two
        reseeded = reseed_empty(x, m, c, index, first)
        if reseeded is not c:
            c = reseeded
            _, first, second = nearest_two(x, c, rows)
        g = x.shape[0]  # (both clipped means in one call: every op works row by row)
        both = clipped_mean(
            torch.cat([squared_norms(x), second - first]),
            None if m is None else m.repeat(2, 1),
            g,
            None if picks is None else picks.repeat(2, 1),
        )
        mean_sq, gap = both[:g], both[g:]
        scale = gap.clamp_min(MARGIN_FLOOR * mean_sq + 1e-30)
    return c, scale
