"""Exact percentiles of activations streamed in batches, in memory that does not grow with the data.

torch.quantile needs every value at once: a VGG16's first site sees 3.2 million activations an
image. Positive float32 values sort as their bit patterns do (as int32), so the k-th smallest is
found digit by digit, from the highest bits down: a pass over the data counts, per row (channel),
the values whose higher bits equal the ones already found, in a histogram of the next few bits;
the bin that holds rank k fixes those bits. After ceil(31 / bits) passes every bit is known and
the value is exact. The result is then torch.nanquantile's own (linear interpolation between the
two order statistics around rank q (n - 1), in float64), bit for bit, whatever the batch size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

_VALUE_BITS = 31         # a positive float32: the sign bit is 0
_HISTOGRAM_BYTES = 1 << 26   # the counts of one site's rows in one pass, at most
_CHUNK = 1 << 22              # values counted at once: bounds the temporary tensors


def radix_bits(rows: int) -> int:
    """Bits of the bit pattern resolved per pass for `rows` rows: as many as the histogram budget
    allows (16 for a per-layer site: two passes), at least 8."""
    return max(8, min(16, int(math.log2(_HISTOGRAM_BYTES // (8 * (rows + 1))))))


def passes_needed(rows: int) -> int:
    """How many passes over the data the quantiles of a stream of `rows` rows take."""
    return math.ceil(_VALUE_BITS / radix_bits(rows))


class StreamingQuantile:
    """The `q` quantile of the positive values of each row of a stream of (rows, n) batches, and of
    all rows together (the "layer" value), exact (module docstring).

    Use: for each pass in `passes()`, feed every batch of the data to `add`, then call
    `end_pass()`; the same batches each pass. Then `result()`: (per-row quantiles, layer quantile),
    NaN where a row saw no positive value.
    """

    def __init__(self, rows: int, q: float) -> None:
        self.rows, self.q = rows, q
        self.bits = radix_bits(rows)
        self.shift = _VALUE_BITS
        # per target (row 0..rows-1 below and above rank, then the layer's two): the bits found so far,
        # the rank still to find among the values that share them
        self.prefix = torch.zeros(2 * (rows + 1), dtype=torch.int64)
        self.rank = torch.zeros(2 * (rows + 1), dtype=torch.int64)
        self.count: Tensor | None = None   # positive values per row, known after the first pass
        self.counts = self._empty()

    def _empty(self) -> Tensor:
        return torch.zeros((2 * (self.rows + 1), 1 << self._width()), dtype=torch.int64)

    def _width(self) -> int:
        return min(self.bits, self.shift)

    def passes(self) -> range:
        return range(passes_needed(self.rows))

    def add(self, values: Tensor) -> None:
        """One batch: `values` (rows, n), any float dtype; only values > 0 count (zeros, negatives
        and NaN are a ReLU's "off" state or no value). Taken in chunks of _CHUNK values."""
        values = values.detach().float()
        step = max(1, _CHUNK // max(1, values.shape[0]))
        for start in range(0, values.shape[1], step):
            self._add(values[:, start:start + step])

    def _add(self, values: Tensor) -> None:
        width, layer, above = self._width(), self.rows, self.rows + 1
        bits = values.contiguous().view(torch.int32)
        positive = values > 0
        high = bits >> self.shift                                   # the bits found already
        digits = (bits >> (self.shift - width)) & ((1 << width) - 1)  # the bits this pass finds
        prefix = self.prefix.to(values.device, torch.int32)
        rows = torch.arange(self.rows, device=values.device, dtype=torch.int32)[:, None].expand_as(bits)
        # the targets that share their bits with ones counted already count the same values: in
        # most passes the two ranks around q (n - 1) do, and a one-row site's layer is its row
        same_ranks = torch.equal(prefix[above:], prefix[:above])
        keep = positive & (high == prefix[:self.rows, None])
        self._count(rows[keep], digits[keep], [0] + ([above] if same_ranks else []))
        layers = [layer] + ([2 * above - 1] if same_ranks else [])
        if self.rows == 1 and prefix[layer] == prefix[0]:
            self._count(rows[keep], digits[keep], layers)
        else:
            keep = positive & (high == prefix[layer])
            self._count(torch.zeros_like(digits[keep]), digits[keep], layers)
        if not same_ranks:
            keep = positive & (high == prefix[above:above + self.rows, None])
            self._count(rows[keep], digits[keep], [above])
            keep = positive & (high == prefix[-1])
            self._count(torch.zeros_like(digits[keep]), digits[keep], [2 * above - 1])

    def _count(self, row: Tensor, digit: Tensor, bases: list[int]) -> None:
        """Count each `digit` in histogram row `base + row`, for each of `bases`."""
        width = self.counts.shape[1]
        index = (row.long() * width + digit).cpu()
        ones = torch.ones_like(index)
        flat = self.counts.view(-1)
        for base in bases:
            flat.index_add_(0, index + base * width, ones)

    def end_pass(self) -> None:
        """Fix the next digits of every target from this pass's histograms."""
        if self.count is None:   # the first pass saw every positive value: the ranks follow
            per_row = self.counts[:self.rows].sum(1)
            self.count = torch.cat([per_row, per_row.sum()[None]])
            position = self._position()
            self.rank = torch.cat([position.floor().long(), position.ceil().long()])
        cumulative = self.counts.cumsum(1)
        digit = (cumulative <= self.rank[:, None]).sum(1).clamp(max=self.counts.shape[1] - 1)
        below = torch.where(digit > 0, cumulative.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
        width = self._width()
        self.rank = self.rank - below
        self.prefix = (self.prefix << width) | digit
        self.shift -= width
        self.counts = self._empty() if self.shift > 0 else self.counts

    def _position(self) -> Tensor:
        """Rank q (n - 1) of each target's n values, as torch.nanquantile computes it (float64)."""
        return self.q * (self.count.double() - 1).clamp(min=0)

    def result(self) -> tuple[Tensor, Tensor]:
        values = self.prefix.to(torch.int32).view(torch.float32).double()
        targets = self.rows + 1
        below, above = values[:targets], values[targets:]
        position = self._position()
        weight = position - position.floor()
        quantile = torch.lerp(below, above, weight)
        quantile = torch.where(self.count > 0, quantile, torch.nan)
        return quantile[:self.rows], quantile[self.rows]


def streaming_quantiles(passes: Callable[[Callable[[str, Tensor], None]], None], rows: dict[str, int],
                        q: float) -> dict[str, tuple[Tensor, Tensor]]:
    """The exact `q` quantile of every named stream: `passes(add)` runs the data once, calling
    `add(name, values)` with each batch's (rows, n) values of stream `name`; it is called once per
    pass (the same data each time). Returns name -> (per-row quantiles, layer quantile)."""
    quantiles = {name: StreamingQuantile(count, q) for name, count in rows.items()}
    for step in range(max((len(s.passes()) for s in quantiles.values()), default=0)):
        active = {name: s for name, s in quantiles.items() if step < len(s.passes())}
        passes(lambda name, values: active[name].add(values) if name in active else None)
        for s in active.values():
            s.end_pass()
    return {name: s.result() for name, s in quantiles.items()}


__all__ = ["StreamingQuantile", "passes_needed", "streaming_quantiles", "radix_bits"]
