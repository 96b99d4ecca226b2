"""Region boxes as model inputs: one numpy function the data side (granularities, the streamed
windows, the downstream tasks) and the model share, importing neither torch nor transformers."""

from __future__ import annotations

import numpy as np


def location_features(boxes: np.ndarray, width: float | np.ndarray, height: float | np.ndarray) -> np.ndarray:
    """Paper §3.1 footnote 1: `[x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W·H)]` per box.

    Coordinates are clipped to the image first: the contract tolerates detector boxes that
    overshoot by a pixel, and a location outside [0, 1] would only be noise.
    `width`/`height` may be scalars or one value per box.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w = np.broadcast_to(np.asarray(width, dtype=np.float32), (len(b),))
    h = np.broadcast_to(np.asarray(height, dtype=np.float32), (len(b),))
    x1 = np.clip(b[:, 0], 0, w) / w
    y1 = np.clip(b[:, 1], 0, h) / h
    x2 = np.clip(b[:, 2], 0, w) / w
    y2 = np.clip(b[:, 3], 0, h) / h
    area = (x2 - x1) * (y2 - y1)
    return np.stack([x1, y1, x2, y2, area], axis=1).astype(np.float32)
