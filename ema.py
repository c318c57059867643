"""Exponential moving average of a model's weights, step for step as ema-pytorch 0.8.3.

The official trainer uses `ema_pytorch.EMA(model, beta=0.99, update_every=16)`. Written out here
(about 60 lines) instead of depending on that package because its schedule has moved between
releases; what matters for reproduction is this exact one (REFERENCE.md section 5):

Number the `update()` calls k = 0, 1, 2, ... (one per optimiser step). Call 0 copies the weights;
a call with k % update_every != 0 does nothing; k % update_every == 0 and k <= update_after_step
copies; k % update_every == 0 and k > update_after_step averages,
ema = decay * ema + (1 - decay) * online, with
decay = clamp(1 - (1 + (k - update_after_step) / inv_gamma) ** -power, min_value, beta).
Floating-point buffers (BatchNorm statistics) are copied and averaged like weights; integer
buffers (BatchNorm's batch counter) are left alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(
        self,
        model: nn.Module,
        beta: float = 0.99,
        update_every: int = 16,
        update_after_step: int = 100,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_value: float = 0.0,
    ):
        self.online_model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.update_every, self.update_after_step = beta, update_every, update_after_step
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value
        self.step = 0
        self.initted = False

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema, online = [], []
        for module_ema, module in (
            (self.ema_model.parameters(), self.online_model.parameters()),
            (self.ema_model.buffers(), self.online_model.buffers()),
        ):
            for e, o in zip(module_ema, module, strict=True):
                if e.is_floating_point():
                    ema.append(e.data)
                    online.append(o.data)
        return ema, online

    def current_decay(self) -> float:
        """The decay of an averaging update at the current step (after its increment)."""
        epoch = self.step - self.update_after_step - 1
        if epoch <= 0:
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        return min(max(value, self.min_value), self.beta)

    @torch.no_grad()
    def copy_from_online(self) -> None:
        ema, online = self._pairs()
        torch._foreach_copy_(ema, online)

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimiser step."""
        step = self.step
        self.step += 1
        if not self.initted:
            self.copy_from_online()
            self.initted = True
        if step % self.update_every != 0:
            return
        if step <= self.update_after_step:
            self.copy_from_online()
            return
        ema, online = self._pairs()
        # lerp(ema, online, 1 - decay) == decay * ema + (1 - decay) * online, in one fused kernel
        torch._foreach_lerp_(ema, online, 1.0 - self.current_decay())

    def state_dict(self) -> dict:
        """ema-pytorch's layout (`initted`, `step`, `ema_model.*`) without its online copy."""
        out = {"initted": torch.tensor(self.initted), "step": torch.tensor(self.step)}
        out.update({f"ema_model.{k}": v for k, v in self.ema_model.state_dict().items()})
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Accepts this class's state dicts and ema-pytorch's (its `online_model.*` is ignored)."""
        self.initted = bool(state_dict["initted"])
        self.step = int(state_dict["step"])
        weights = {
            k.removeprefix("ema_model."): v
            for k, v in state_dict.items()
            if k.startswith("ema_model.")
        }
        self.ema_model.load_state_dict(weights)
