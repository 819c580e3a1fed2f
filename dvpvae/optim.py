"""The paper's optimisation recipe: Adamax with weight decay, warm-up + cosine schedule, EMA.

The training step must skip an update (non-finite loss or gradient, or a gradient norm
above ``grad_skip_thr`` or far above its recent values: ``GradNormGuard``) without
reading the decision on the host, which would stall a GPU every step. So the optimizer
and the EMA take the decision as a 0-d device tensor and apply it arithmetically: with ``apply == 0`` parameters, moments and step counts
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
            keep = ok > 0
            grads = [torch.where(keep, p.grad, 0.0) for p in params]
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
            # p <- p - clr * exp_avg / (exp_inf + 1 - ok) with each parameter's own step count.
            # clr is 0 on a skipped step; clamp(step, 1) avoids 0/0 before the first applied
            # step and the + (1 - ok) keeps the denominator of a fresh state > 0.
            clr = ok * group["lr"] / (1.0 - b1 ** torch.stack(steps).clamp(min=1.0))
            update = torch._foreach_mul(m, clr.unbind())
            torch._foreach_div_(update, torch._foreach_add(u, 1.0 - ok))
            torch._foreach_sub_(params, update)
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


class GradNormGuard:
    """Decides on the device which updates to apply, and counts the run of skipped ones.

    An update is skipped when its loss or gradient norm is non-finite, when the norm
    exceeds ``threshold`` (> 0; VDVAE's fixed skip) or, with ``factor`` > 0, when it
    exceeds ``factor`` times a running mean of recent norms (once ``warmup`` norms have
    been seen). Every finite norm feeds that mean, clamped to ``factor`` times it: a
    single spike moves the mean by at most ``(factor - 1) / window`` of itself, while a lasting
    rise of the norms lifts it within a few dozen steps, so the adaptive rule alone
    cannot skip forever. ``streak`` counts consecutive skipped steps and ``max_streak``
    its largest value since the last ``take_max_streak()``, the one host read (made at
    logging time by the trainer).
    """

    def __init__(self, device: torch.device, threshold: float = 0.0, factor: float = 0.0,
                 window: int = 100, warmup: int = 10):
        if threshold < 0 or factor < 0 or (0 < factor <= 1) or window < 1 or warmup < 1:
            raise ValueError(f"invalid skip settings threshold={threshold} factor={factor} "
                             f"(must be 0 or > 1) window={window} warmup={warmup}")
        self.threshold, self.factor, self.window, self.warmup = threshold, factor, window, warmup
        z = torch.zeros((), dtype=torch.float32, device=device)
        self.mean, self.count, self.streak, self.max_streak = z.clone(), z.clone(), z.clone(), z.clone()

    @torch.no_grad()
    def __call__(self, gnorm: torch.Tensor, finite_loss: torch.Tensor) -> torch.Tensor:
        """0-d bool: apply this update. ``finite_loss`` is a 0-d bool/float (1 = finite)."""
        g = gnorm.detach().float()
        finite = (finite_loss > 0) & torch.isfinite(g)
        apply = finite
        if self.threshold > 0:
            apply = apply & (g < self.threshold)
        if self.factor > 0:
            ready = self.count >= self.warmup
            limit = self.factor * self.mean
            apply = apply & ~(ready & (g > limit))
            fed = torch.where(ready, torch.minimum(g, limit), g)
            # A plain average of the first ``warmup`` norms, then an exponential one.
            rate = torch.where(ready, 1.0 / self.window, 1.0 / (self.count + 1.0)) * finite
            self.mean.add_(rate * (torch.where(finite, fed, self.mean) - self.mean))
            self.count.add_(finite.float())
        self.streak.copy_(torch.where(apply, 0.0, self.streak + 1.0))
        torch.maximum(self.max_streak, self.streak, out=self.max_streak)
        return apply

    def take_max_streak(self) -> int:
        """The longest run of skipped steps since the last call (a host sync)."""
        m = int(self.max_streak.item())
        self.max_streak.copy_(self.streak)
        return m

    def state_dict(self) -> dict:
        return {"mean": self.mean.item(), "count": self.count.item(), "streak": self.streak.item(),
                "max_streak": self.max_streak.item()}

    def load_state_dict(self, d: dict) -> None:
        for k in ("mean", "count", "streak", "max_streak"):
            getattr(self, k).fill_(float(d[k]))


class EMA:
    """Exponential moving average of a model's parameters, held in a copy.

    ``update(model, step, apply)`` moves the shadow parameters by ``(1 - rate_at(step)) * apply``
    towards the model's and copies the buffers (e.g. ``dct_scale``). ``module`` is a
    complete model usable for evaluation and sampling.

    With ``warmup`` the rate of 0-based step s is min(rate, (1 + s) / (10 + s)): the initial
    weights keep a share of 1 / C(s + 10, 9) after s + 1 steps instead of rate^(s + 1), so the
    average is usable early in a run; without it every step uses ``rate`` (the paper's EMA).
    The rate depends on the step alone, so a run resumed at its saved step continues exactly.
    """

    def __init__(self, model: torch.nn.Module, rate: float, warmup: bool):
        if not 0 <= rate < 1:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate, self.warmup = rate, warmup
        # The copy keeps the model's requires_grad flags: compiled passes guard on them, so the
        # average then shares the model's compiled evaluation pass. update() needs no autograd.
        self.module = copy.deepcopy(model).eval()

    def rate_at(self, step: int) -> float:
        """The rate of the update at 0-based training step ``step``."""
        return min(self.rate, (1.0 + step) / (10.0 + step)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, apply: torch.Tensor | None = None) -> None:
        src = [p for p in model.parameters()]
        dst = [p for p in self.module.parameters()]
        w = 1.0 - self.rate_at(step)
        if apply is not None:
            w = w * apply.to(src[0].device, torch.float32)
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
