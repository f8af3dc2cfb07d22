"""What flows along the edges of the simulated SNN (docs/method.md sections 3 and 7).

A Signal is the sum of two parts that a spiking layer integrates differently:
- steps [T, N, ...]: synaptic currents per time step, MSB first; step t has weight 2^(T-1-t), so
  the membrane doubling rule U = 2 U + I_t integrates them;
- const [N, ...]: what enters once: the analog input (direct encoding) and the biases.
Linear ops act on both parts but add their bias to const alone, so a bias enters once and not
once per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Signal:
    steps: Tensor | None = None
    const: Tensor | None = None
    spikes: Tensor | None = None  # the binary planes, when a neuron emitted this signal

    @staticmethod
    def analog(x: Tensor) -> "Signal":
        return Signal(const=x)

    @property
    def timesteps(self) -> int:
        return 0 if self.steps is None else self.steps.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.const.shape if self.const is not None else self.steps.shape[1:]

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def currents(self) -> Tensor:
        """The current sequence a neuron integrates: const rides on the last step (weight 1)."""
        if self.steps is None:
            return self.const.unsqueeze(0)
        if self.const is None:
            return self.steps
        return torch.cat([self.steps[:-1], (self.steps[-1] + self.const).unsqueeze(0)])

    def potential(self) -> Tensor:
        """The integrated value: sum_t 2^(T-1-t) steps_t + const, by the doubling rule."""
        potential = None
        for current in self.currents():
            potential = current if potential is None else 2.0 * potential + current
        return potential

    def map(self, on_steps, on_const) -> "Signal":
        """Apply a linear op: `on_steps` to the time-major currents, `on_const` (with bias) to const."""
        return Signal(steps=None if self.steps is None else on_steps(self.steps),
                      const=None if self.const is None else on_const(self.const))


def align_steps(a: Tensor | None, b: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Pad the shorter step sequence at the front: the last step always has weight 1."""
    if a is None or b is None or a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] < b.shape[0]:
        b, a = align_steps(b, a)
        return a, b
    pad = a.new_zeros((a.shape[0] - b.shape[0],) + b.shape[1:])
    return a, torch.cat([pad, b])


def _add_parts(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def add_signals(a: Signal, b: Signal) -> Signal:
    steps_a, steps_b = align_steps(a.steps, b.steps)
    return Signal(steps=_add_parts(steps_a, steps_b), const=_add_parts(a.const, b.const))


def scale_signal(a: Signal, factor) -> Signal:
    return a.map(lambda s: s * factor, lambda c: c * factor)
