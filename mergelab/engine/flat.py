"""One buffer per role instead of one allocation per tensor.

The engine keeps the base, the M task vectors and the resident model (plus, on CUDA, an fp32 copy
of the merged weights) for a whole sweep. Stored tensor by tensor, they interleave in the allocator's heap with the per-tensor
temporaries of reading and merging, which fragment it (peak RSS grew ~1.5 model sizes beyond the
tensors held). Laid out back to back in one buffer each, they are a handful of large allocations
that never move, and a linear merge becomes one vectorised op over the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALIGN = 16  # elements: every tensor starts on a 64-byte boundary in fp32


@dataclass(frozen=True)
class FlatLayout:
    """Where each named tensor lives in a flat buffer: in the given order, each aligned to ALIGN
    elements (the gaps hold zeros)."""

    shapes: dict[str, tuple[int, ...]]
    offsets: dict[str, int]
    numel: int

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> "FlatLayout":
        offsets, end = {}, 0
        for name, shape in shapes.items():
            offsets[name] = end
            end += -(-math.prod(shape) // ALIGN) * ALIGN
        return cls(dict(shapes), offsets, end)

    def zeros(self, *lead: int, dtype, device):
        """A zero buffer of shape [*lead, numel]."""
        import torch

        return torch.zeros((*lead, self.numel), dtype=dtype, device=device)

    def views(self, buffer) -> dict:
        """name -> view of `buffer` (shape [*lead, numel]) with shape [*lead, *shape]; no copy."""
        lead = tuple(buffer.shape[:-1])
        return {name: buffer[..., start:start + math.prod(shape)].view((*lead, *shape))
                for name, shape, start in ((n, s, self.offsets[n]) for n, s in self.shapes.items())}

    def chunks(self, size: int):
        """(name, start, stop) flat ranges covering every tensor in pieces of at most `size` elements,
        never spanning two tensors."""
        for name, shape in self.shapes.items():
            start, stop = self.offsets[name], self.offsets[name] + math.prod(shape)
            for lo in range(start, stop, size):
                yield name, lo, min(lo + size, stop)
