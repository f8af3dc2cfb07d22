"""The modified integrate-and-fire neuron of docs/method.md section 3 (bit-serial, MSB first).

A SpikingJelly node (`SimpleBaseNode`, whose split of charge, fire and reset it keeps):
- charge (integrate phase): the membrane doubles each step, U = 2 U + I_t, so after the input
  window U carries every input spike at its binary weight;
- fire: SpikingJelly's Heaviside step of U - v_threshold, where at output step t the threshold is
  2^(T-1-t) * theta, halving every step;
- reset: SpikingJelly's soft reset, by subtraction of that threshold.
Firing T steps from potential V emits the binary digits of clamp(floor(V / theta), 0, 2^T - 1).
"""
from __future__ import annotations

import torch
from spikingjelly.activation_based import neuron, surrogate
from torch import Tensor

from ..levels import MAX_TIMESTEPS, cap_potential, channel_view, step_thresholds


class BitSerialIFNode(neuron.SimpleBaseNode):
    """Bit-serial IF neuron, multi-step: integrates an input window, then fires T steps MSB first.

    theta: one quantization step (scalar or per channel over dimension 1 of [N, C, ...]).
    levels: the largest level L (2^T - 1 unless the source had an odd level count).
    membrane_offset: added to the potential once, after integration; theta / 2 where no bias of a
    linear producer could carry the shift of docs/method.md section 2, else 0.

    Input of `forward`: currents [T_in, N, ...], MSB first (the last step has weight 1 and also
    carries the bias, which enters once). Output: binary spike planes [T, N, ...].
    """

    def __init__(self, theta: Tensor, levels: int, timesteps: int, membrane_offset: Tensor | None = None,
                 step_mode: str = "m") -> None:
        # v_reset None: reset by subtraction; the surrogate only shapes gradients, its forward is the step
        super().__init__(v_threshold=1.0, v_reset=None, surrogate_function=surrogate.Sigmoid(), step_mode=step_mode)
        if levels > 2**timesteps - 1:
            raise ValueError(f"{levels} levels need more than T={timesteps} time steps")
        self.levels = int(levels)
        self.timesteps = int(timesteps)
        self.register_buffer("theta", torch.as_tensor(theta).detach().clone().reshape(-1).squeeze())
        offset = torch.zeros(()) if membrane_offset is None else torch.as_tensor(membrane_offset)
        self.register_buffer("membrane_offset", offset.detach().clone().reshape(-1).squeeze())

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

    # charge is this neuron's own; fire and reset are SimpleBaseNode's, at each step's v_threshold
    def neuronal_charge(self, current: Tensor) -> None:
        """Integrate phase: the membrane doubles, then adds this step's synaptic current."""
        self.v = 2.0 * self.v + current

    def multi_step_forward(self, current_seq: Tensor) -> Tensor:
        if not isinstance(self.v, Tensor):
            self.v = torch.zeros_like(current_seq[0])
        for current in current_seq:
            self.neuronal_charge(current)
        theta = self._theta_like(current_seq[0])
        offset = channel_view(self.membrane_offset.to(current_seq.dtype), current_seq.dim() - 1)
        self.v = cap_potential(self.v + offset, theta, self.levels, self.timesteps)
        spikes = []
        for threshold in step_thresholds(theta, self.timesteps):   # it ends at theta, one step
            self.v_threshold = threshold
            spike = self.neuronal_fire()
            self.neuronal_reset(spike)
            spikes.append(spike)
        return torch.stack(spikes)

    def single_step_forward(self, x: Tensor) -> Tensor:
        raise ValueError("BitSerialIFNode is multi-step only: an MSB-first spike needs the whole input window")

    def extra_repr(self) -> str:
        per = f"per-channel({self.theta.numel()})" if self.theta.dim() else "per-layer"
        return f"T={self.timesteps}, levels={self.levels}, theta={per}, step_mode={self.step_mode}"
