"""One flat buffer per role: where each tensor lives, views that share it, chunks that cover it."""

import math

import torch

from mergelab.engine.flat import ALIGN, FlatLayout

SHAPES = {"embed": (11, 3), "norm": (3,), "scalar": (), "proj": (5, 7)}


def test_views_share_one_aligned_buffer_in_order():
    layout = FlatLayout.of(SHAPES)
    assert list(layout.offsets) == list(SHAPES) and all(o % ALIGN == 0 for o in layout.offsets.values())
    assert layout.numel >= sum(math.prod(s) for s in SHAPES.values())
    buffer = layout.zeros(dtype=torch.float32, device="cpu")
    views = layout.views(buffer)
    for i, (name, view) in enumerate(views.items()):
        assert view.shape == SHAPES[name] and view.data_ptr() == buffer.data_ptr() + 4 * layout.offsets[name]
        view.fill_(i + 1)
    assert buffer.sum().item() == sum((i + 1) * math.prod(s) for i, s in enumerate(SHAPES.values()))


def test_stacked_views_keep_one_row_per_expert():
    layout = FlatLayout.of(SHAPES)
    stacked = layout.zeros(4, dtype=torch.float32, device="cpu")
    views = layout.views(stacked)
    assert views["proj"].shape == (4, 5, 7)
    views["proj"][2].fill_(1.0)
    start = layout.offsets["proj"]
    assert stacked[2, start:start + 35].eq(1).all() and stacked.sum().item() == 35


def test_chunks_cover_every_tensor_once_without_spanning_two():
    layout = FlatLayout.of(SHAPES)
    covered = torch.zeros(layout.numel, dtype=torch.int32)
    for name, lo, hi in layout.chunks(8):
        start = layout.offsets[name]
        assert 0 < hi - lo <= 8 and start <= lo and hi <= start + math.prod(SHAPES[name])
        covered[lo:hi] += 1
    expected = torch.zeros_like(covered)
    for name, shape in SHAPES.items():
        expected[layout.offsets[name]:layout.offsets[name] + math.prod(shape)] = 1
    assert torch.equal(covered, expected)
