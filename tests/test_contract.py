"""Validation of the data contract: each rule rejects with file, row and field."""

from __future__ import annotations

import numpy as np
import pytest

from raysys.contract import ContractError, ImageRecord, images_table, validate_images


def _rec(i=0, n=3, dim=8, w=100, h=80, **kw):
    rng = np.random.default_rng(i)
    boxes = np.array([[0, 0, 50, 40]] * n, np.float32)
    base = dict(image_id=f"i{i}", width=w, height=h, boxes=boxes, features=rng.random((n, dim)).astype(np.float32),
                tags=["dog"] * n, tag_scores=np.ones(n, np.float32), class_ids=np.zeros(n, np.int32))  # fmt: skip
    base.update(kw)
    return ImageRecord(**base)


def test_valid_table_passes():
    validate_images(images_table([_rec(0), _rec(1)], 8), "x.parquet", 8)


@pytest.mark.parametrize(
    "bad,field",
    [
        (dict(features=np.full((3, 8), np.nan, np.float32)), "features"),
        (dict(features=np.full((3, 8), np.inf, np.float32)), "features"),
        (dict(boxes=np.array([[0, 0, 50, 40], [10, 10, 120, 20], [0, 0, 1, 1]], np.float32)), "boxes"),
        (dict(boxes=np.array([[0, -5, 50, 40]] * 3, np.float32)), "boxes"),
        (dict(boxes=np.array([[30, 0, 20, 40]] * 3, np.float32)), "boxes"),
    ],
)
def test_rejections_name_row_and_field(bad, field):
    t = images_table([_rec(0), _rec(1, **bad)], 8)
    with pytest.raises(ContractError) as e:
        validate_images(t, "f.parquet", 8, row_offset=10)
    assert e.value.row == 11 and e.value.field == field
    assert str(e.value).startswith("f.parquet: row 11: field")


def test_wrong_dim_and_no_regions():
    with pytest.raises(ContractError, match="feature dim 8, expected 16"):
        validate_images(images_table([_rec(0)], 8), "f", 16)
    empty = _rec(1, n=0, boxes=np.zeros((0, 4), np.float32), features=np.zeros((0, 8), np.float32), tags=[],
                 tag_scores=np.zeros(0, np.float32), class_ids=np.zeros(0, np.int32))  # fmt: skip
    with pytest.raises(ContractError, match="no regions") as e:
        validate_images(images_table([_rec(0), empty], 8), "f", 8)
    assert e.value.row == 1
