"""The modified integrate-and-fire neuron of METHOD.md section 3 (bit-serial, MSB first).

A SpikingJelly node with the usual split of charge, fire and reset:
- charge (integrate phase): the membrane doubles each step, U = 2 U + I_t, so after the input
  window U carries every input spike at its binary weight;
- fire: at output step t the threshold is 2^(T-1-t) * theta, halving every step;
- reset: by subtraction of that threshold.
Firing T steps from potential V emits the binary digits of clamp(floor(V / theta), 0, 2^T - 1).
"""
from __future__ import annotations

import torch
from spikingjelly.activation_based import base
from torch import Tensor

from .quant import channel_view


def step_thresholds(theta: Tensor, timesteps: int) -> list[Tensor]:
    """The threshold of each output step, MSB first: 2^(T-1-t) * theta."""
    return [theta * float(2 ** (timesteps - 1 - t)) for t in range(timesteps)]


def cap_potential(potential: Tensor, theta: Tensor, levels: int, timesteps: int) -> Tensor:
    """With L < 2^T - 1 levels the potential is capped at (L + 1/2) theta, so no level exceeds L."""
    if levels < 2**timesteps - 1:
        potential = torch.minimum(potential, theta * (levels + 0.5))
    return potential


def fire_msb_first(potential: Tensor, theta: Tensor, levels: int, timesteps: int) -> Tensor:
    """Spike planes [T, ...] of a neuron with the given potential (compare, then subtract)."""
    v = cap_potential(potential, theta, levels, timesteps)
    spikes = []
    for threshold in step_thresholds(theta, timesteps):
        spike = (v >= threshold).to(v.dtype)
        v = v - spike * threshold
        spikes.append(spike)
    return torch.stack(spikes)


def decode_levels(spikes: Tensor) -> Tensor:
    """sum_t s_t 2^(T-1-t): the level a spike train [T, ...] carries."""
    timesteps = spikes.shape[0]
    weights = torch.tensor([2.0 ** (timesteps - 1 - t) for t in range(timesteps)], dtype=spikes.dtype,
                           device=spikes.device)
    return torch.tensordot(weights, spikes, dims=1)


def fire_levels(potential: Tensor, theta: Tensor, levels: int, timesteps: int) -> Tensor:
    """The level the T output spikes carry: exactly what compare-and-subtract firing decodes to.

    Each subtraction of the firing loop is exact in floating point (Sterbenz: the potential lies
    in [2^k theta, 2^(k+1) theta) when threshold 2^k theta fires), so firing computes the exact
    floor(V / theta) of the real quotient, clamped to [0, L]. For float32 / float16 potentials
    that floor is taken in float64, which cannot round across an integer (the distance of
    V / theta from one is at least 2^-25, the float64 error at most L 2^-53 <= 2^-37 for
    T <= 16); float64 potentials run the loop itself. The time-folded evaluator uses this, and
    for equal potentials agrees with the simulator bit for bit.
    """
    if potential.dtype == torch.float64:
        return decode_levels(fire_msb_first(potential, theta, levels, timesteps))
    top = min(levels, 2**timesteps - 1)
    quotient = potential.to(torch.float64)  # a new tensor: the in-place steps below save allocations
    return quotient.div_(theta.to(torch.float64)).floor_().clamp_(0, top).to(potential.dtype)


# The most time steps a neuron may have: the evaluator's spike code of a level has at most 16 bits.
MAX_TIMESTEPS = 16


def spike_code_dtype(timesteps: int) -> torch.dtype:
    """The dtype of the bit-packed spike code of a T-step neuron (bit T-1-t = spike at step t, so the
    code is the level q itself): uint8 for T <= 8, uint16 for T <= 16. The one place that says so."""
    if type(timesteps) is not int or not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"a spike code holds 1..{MAX_TIMESTEPS} time steps, got T={timesteps!r}")
    return torch.uint8 if timesteps <= 8 else torch.uint16


def spike_code_arithmetic_dtype(timesteps: int) -> torch.dtype:
    """The dtype to shift, mask and add spike codes in: the code's own dtype, except uint16, which
    torch stores and converts but cannot shift or add on the CPU: int32 then."""
    code = spike_code_dtype(timesteps)
    return torch.int32 if code == torch.uint16 else code


def check_levels_exact(levels: int, dtype: torch.dtype) -> None:
    """Refuse L levels that `dtype` cannot hold as exact integers (float16 holds 0..2048, so T <= 11;
    bfloat16 0..256, T <= 8): the evaluator carries q in the potential's dtype, and a rounded q
    would fire and count the wrong spikes without a word."""
    exact = int(2 / torch.finfo(dtype).eps)   # 2^(mantissa bits + 1)
    if levels > exact:
        raise ValueError(f"{levels} levels are not exact in {str(dtype).removeprefix('torch.')} (integers up to "
                         f"{exact}): the SNN needs float32")


class BitSerialIFNode(base.MemoryModule):
    """Bit-serial IF neuron, multi-step: integrates an input window, then fires T steps MSB first.

    theta: one quantization step (scalar or per channel over dimension 1 of [N, C, ...]).
    levels: the largest level L (2^T - 1 unless the source had an odd level count).
    membrane_offset: added to the potential once, after integration; theta / 2 where no bias of a
    linear producer could carry the shift of METHOD.md section 2, else 0.

    Input of `forward`: currents [T_in, N, ...], MSB first (the last step has weight 1 and also
    carries the bias, which enters once). Output: binary spike planes [T, N, ...].
    """

    def __init__(self, theta: Tensor, levels: int, timesteps: int, membrane_offset: Tensor | None = None,
                 step_mode: str = "m") -> None:
        super().__init__()
        if levels > 2**timesteps - 1:
            raise ValueError(f"{levels} levels need more than T={timesteps} time steps")
        self.levels = int(levels)
        self.timesteps = int(timesteps)
        self.register_buffer("theta", torch.as_tensor(theta).detach().clone().reshape(-1).squeeze())
        offset = torch.zeros(()) if membrane_offset is None else torch.as_tensor(membrane_offset)
        self.register_buffer("membrane_offset", offset.detach().clone().reshape(-1).squeeze())
        self.register_memory("v", 0.0)
        self.step_mode = step_mode

    def artifact_config(self) -> dict:
        return {"levels": self.levels, "timesteps": self.timesteps, "theta_shape": list(self.theta.shape),
                "membrane_offset_shape": list(self.membrane_offset.shape)}

    @classmethod
    def from_artifact_config(cls, config: dict) -> "BitSerialIFNode":
        # theta and membrane_offset arrive with the state dict
        timesteps, levels = config["timesteps"], config["levels"]
        if type(timesteps) is not int or not 1 <= timesteps <= MAX_TIMESTEPS:
            raise ValueError(f"timesteps must be an integer in 1..{MAX_TIMESTEPS}, got {timesteps!r}")
        if type(levels) is not int or not 1 <= levels <= 2**timesteps - 1:
            raise ValueError(f"levels must be an integer in 1..{2**timesteps - 1} for T={timesteps}, got {levels!r}")
        return cls(torch.zeros(config["theta_shape"]), levels, timesteps,
                   torch.zeros(config["membrane_offset_shape"]))

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("m",)

    def _theta_like(self, x: Tensor) -> Tensor:
        return channel_view(self.theta.to(x.dtype), x.dim())

    # charge / fire / reset, in SpikingJelly's split
    def neuronal_charge(self, current: Tensor) -> None:
        """Integrate phase: the membrane doubles, then adds this step's synaptic current."""
        self.v = 2.0 * self.v + current

    def neuronal_fire(self, threshold: Tensor) -> Tensor:
        return (self.v >= threshold).to(self.v.dtype)

    def neuronal_reset(self, spike: Tensor, threshold: Tensor) -> None:
        self.v = self.v - spike * threshold

    def multi_step_forward(self, current_seq: Tensor) -> Tensor:
        if not isinstance(self.v, Tensor):
            self.v = torch.zeros_like(current_seq[0])
        for current in current_seq:
            self.neuronal_charge(current)
        theta = self._theta_like(current_seq[0])
        offset = channel_view(self.membrane_offset.to(current_seq.dtype), current_seq.dim() - 1)
        self.v = cap_potential(self.v + offset, theta, self.levels, self.timesteps)
        spikes = []
        for threshold in step_thresholds(theta, self.timesteps):
            spike = self.neuronal_fire(threshold)
            self.neuronal_reset(spike, threshold)
            spikes.append(spike)
        return torch.stack(spikes)

    def single_step_forward(self, x: Tensor) -> Tensor:
        raise ValueError("BitSerialIFNode is multi-step only: an MSB-first spike needs the whole input window")

    def extra_repr(self) -> str:
        per = f"per-channel({self.theta.numel()})" if self.theta.dim() else "per-layer"
        return f"T={self.timesteps}, levels={self.levels}, theta={per}, step_mode={self.step_mode}"
