"""The paper's optimisation recipe: Adamax with weight decay, warm-up + cosine schedule, EMA.

The training step must skip an update (non-finite loss or gradient, or a gradient norm
above ``grad_skip_thr``) without reading the decision on the host, which would stall a
GPU every step. So the optimizer and the EMA take the decision as a 0-d device tensor
and apply it arithmetically: with ``apply == 0`` parameters, moments and step counts
stay bit-identical.
"""
from __future__ import annotations

import copy
import math

import torch


class MaskedAdamax(torch.optim.Optimizer):
    """Adamax (same update and state layout as ``torch.optim.Adamax``) with a device-side skip.

    ``step(apply)`` with ``apply`` a 0-d bool/float tensor (1 = apply, 0 = skip) updates
    every parameter, moment and step counter only where ``apply`` is 1, using foreach
    kernels and no host synchronisation. ``step()`` always applies.
    """

    def __init__(self, params, lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid Adamax hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, apply: torch.Tensor | None = None):  # noqa: D401 (torch signature)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            dev = params[0].device
            ok = torch.ones((), device=dev) if apply is None else apply.to(dev, torch.float32)
            b1, b2 = group["betas"]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            m = [s["exp_avg"] for s in states]
            u = [s["exp_inf"] for s in states]
            # A skipped step may carry NaN/inf gradients: zero them so that the masked
            # arithmetic below never multiplies 0 by NaN.
            grads = [torch.where(ok > 0, p.grad, 0.0) for p in params]
            if group["weight_decay"] != 0:
                torch._foreach_add_(grads, torch._foreach_mul(params, group["weight_decay"]))
                torch._foreach_mul_(grads, ok)
            # exp_avg <- lerp(exp_avg, g, (1 - b1) * ok)
            torch._foreach_mul_(m, 1.0 - (1.0 - b1) * ok)
            torch._foreach_add_(m, torch._foreach_mul(grads, 1.0 - b1))
            # exp_inf <- max(b2 * exp_inf, |g| + eps) when applied; unchanged when skipped
            # (exp_inf >= 0, so max(exp_inf, 0) = exp_inf).
            torch._foreach_mul_(u, b2 + (1.0 - b2) * (1.0 - ok))
            absg = torch._foreach_abs(grads)
            torch._foreach_add_(absg, group["eps"] * ok)
            torch._foreach_maximum_(u, absg)
            torch._foreach_add_(steps, ok)
            for p, st, mi, ui in zip(params, steps, m, u):
                # clr is 0 on a skipped step; clamp(step, 1) avoids 0/0 before the first
                # applied step and the +(1-ok) keeps the denominator of a fresh state > 0.
                clr = ok * group["lr"] / (1.0 - b1 ** st.clamp(min=1.0))
                p.sub_(clr * mi / (ui + (1.0 - ok)))
        return None


class CosineSchedule:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``eta_min``.

    The learning rate is a pure function of the step, so resuming needs only the step;
    ``state_dict`` records the parameters to detect a changed schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int,
                 warmup_steps: int = 0, eta_min: float = 0.0):
        self.optimizer = optimizer
        self.lr, self.total, self.eta_min = lr, max(1, total_steps), eta_min
        self.warmup = min(max(0, warmup_steps), self.total)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimisation step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        frac = min(1.0, (step - self.warmup) / span)
        return self.eta_min + (self.lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def set_step(self, step: int) -> float:
        """Write the learning rate of ``step`` into every param group and return it."""
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return dict(lr=self.lr, total_steps=self.total, warmup_steps=self.warmup, eta_min=self.eta_min)

    def load_state_dict(self, d: dict) -> None:
        self.lr, self.total = float(d["lr"]), int(d["total_steps"])
        self.warmup, self.eta_min = int(d["warmup_steps"]), float(d["eta_min"])


class EMA:
    """Exponential moving average of a model's parameters, held in a frozen copy.

    ``update(model, apply)`` moves the shadow parameters by ``(1 - rate) * apply``
    towards the model's and copies the buffers (e.g. ``dct_scale``). ``module`` is a
    complete model usable for evaluation and sampling.
    """

    def __init__(self, model: torch.nn.Module, rate: float):
        self.rate = rate
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, apply: torch.Tensor | None = None) -> None:
        src = [p for p in model.parameters()]
        dst = [p for p in self.module.parameters()]
        w = (1.0 - self.rate) if apply is None else (1.0 - self.rate) * apply.to(src[0].device, torch.float32)
        # ema <- ema + w * (p - ema); p is finite whenever apply = 1 (skipped steps leave
        # the parameters untouched), so the product with w = 0 cannot produce NaN.
        delta = torch._foreach_sub(src, dst)
        torch._foreach_mul_(delta, w)
        torch._foreach_add_(dst, delta)
        for b_dst, b_src in zip(self.module.buffers(), model.buffers()):
            b_dst.copy_(b_src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
