"""Where each step's rows lie, for the engines that keep per-step buffers.

A call's buffers hold its rows step after step, (R, ·): step t's B_t rows (a prefix of the
batch's B, sequences sorted longest first) start at row ``offsets[t]``; a padded batch is the
case B_t = B (R = T·B, and its (R, ·) buffers are the (T, B, ·) ones). Values carried from one
step to the next (h, c) are stacked as [their B starting rows; each step's rows] (B + R rows):
:meth:`StepRows.previous` reads the rows a step starts from, :meth:`StepRows.at_last_step`
each sequence's last step.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mogrifier_fast.mogrify import Sequence


class StepRows:
    """Where a call's rows lie over time: step t's B_t rows (a prefix of the batch's B) are
    rows ``offsets[t]`` onwards of an (R, ·) buffer, R = sum of B_t; padded input is the case
    B_t = B. The input and output keep their own layout ((T, B, ·) or packed rows)."""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq
        self.batch, self.steps = seq.batch, seq.steps
        self.sizes = seq.batch_sizes or (self.batch,) * self.steps
        # starts[t]: step t's first row; starts[T] = R.
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self.total = self.starts[-1]

    def per_step(self, buffer: Tensor) -> list[Tensor]:
        """An (R, ·) buffer's view for each step, (B_t, ·)."""
        return list(buffer.split(self.sizes))

    def span(self, begin: int, end: int) -> slice:
        """The rows of steps [begin, end)."""
        return slice(self.starts[begin], self.starts[end])

    def laid_out(self, rows: Tensor) -> Tensor:
        """An (R, ·) result in the input's layout: (T, B, ·) when padded."""
        return rows if self.seq.packed else rows.view(self.steps, self.batch, -1)

    def all_rows(self, t: Tensor) -> Tensor:
        """A tensor in the input's layout as (R, ·)."""
        return t if self.seq.packed else t.reshape(self.total, -1)

    @functools.cached_property
    def lengths(self) -> Tensor:
        """Each sequence's length (B,)."""
        sizes = torch.tensor(self.sizes)
        return (sizes[None, :] > torch.arange(self.batch)[:, None]).sum(1)

    @functools.cached_property
    def offsets(self) -> Tensor:
        """Each step's first row (T,)."""
        return torch.tensor(self.starts[:-1])

    @functools.cached_property
    def _step_and_sequence(self) -> tuple[Tensor, Tensor]:
        """For each row, its step and its sequence (R,), (R,)."""
        step = torch.arange(self.steps).repeat_interleave(torch.tensor(self.sizes))
        return step, torch.arange(self.total) - self.offsets[step]

    @functools.cached_property
    def last_rows(self) -> Tensor:
        """Each sequence's row at its own last step (B,)."""
        return self.offsets[self.lengths - 1] + torch.arange(self.batch)

    def at_last_step(self, rows: Tensor) -> Tensor:
        """Each sequence's row of an (R, ·) buffer at its own last step, (B, ·)."""
        return rows.index_select(0, self.last_rows.to(rows.device))

    @functools.cached_property
    def previous_rows(self) -> Tensor:
        """For each row, its previous step's row in [h_0 (B rows); output (R rows)] (R,)."""
        step, sequence = self._step_and_sequence
        previous = self.batch + self.offsets[(step - 1).clamp(min=0)] + sequence
        return torch.where(step == 0, sequence, previous)

    @functools.cached_property
    def reversed_rows(self) -> Tensor:
        """For each row, the row of the same sequence at the mirrored step within its own
        length, (t, b) -> (length_b - 1 - t, b) (R,): gathering by it reverses every sequence,
        and gathering again restores them."""
        step, sequence = self._step_and_sequence
        return self.offsets[self.lengths[sequence] - 1 - step] + sequence

    def previous(self, stacked: Tensor, span: slice) -> Tensor:
        """Rows ``span`` of a per-row value taken from the step before, for ``stacked`` =
        [the value at the start (B rows); each step's (R rows)]: padded, row i is row i there;
        packed, a gather."""
        if not self.seq.packed:
            return stacked[span]
        return stacked.index_select(0, self.previous_rows[span].to(stacked.device))

    def step_span(self, t: int) -> slice:
        """Step t's rows."""
        return self.span(t, t + 1)

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """What a kernel that walks the steps itself reads: each step's row count (then a 0),
        its first row, and the first row of the cell it starts from (then of the one the last
        step writes) in [c_0 (B rows); each step's (R rows)], as int32 tensors on ``device``."""
        counts = [*self.sizes, 0]
        firsts = self.starts[:-1]
        cells = [0, *(self.batch + f for f in firsts)]
        return tuple(
            torch.tensor(values, dtype=torch.int32, device=device)
            for values in (counts, firsts, cells)
        )
