"""AdamW (and SGD with momentum) that only ever touch the entries a mask selects (METHODS §7).

Each parameter gets one of three layouts, chosen by its mask:

  full    no mask (or all selected): moments of the full tensor; a float32 master copy when the
          weight is bf16/fp16.
  sparse  density < `sparse_below` (GaLLoP, ρ ≈ 1 %): flat indices of the selected entries and
          moments and float32 master values for those entries only, so the state is ~ρ·D, not D.
  dense   other masks (staged retraining, most entries trainable): full-size moments, and the
          new values are written only where the mask is set (`torch.where`).

Unselected entries are never written, so they stay bit-identical after any number of steps,
whatever the weight decay, momentum or clipping. Gradient clipping uses the norm of the
gradient entries that are actually applied (selected entries only), so frozen entries do not
shrink the updates of trainable ones. Parameters whose mask selects nothing are frozen
(`requires_grad=False`) and skipped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class MaskedAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) on the selected entries."""

    moments = ("m", "v")

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        masks: dict[str, Tensor] | None = None,
        *,
        lr: float = 1e-4,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        sparse_below: float = 0.1,
    ):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.groups: list[dict] = []
        for name, p in named_params:
            mask = None if masks is None else masks.get(name)
            g = {"name": name, "param": p}
            if mask is not None and not mask.any():
                p.requires_grad_(False)
                continue
            low_precision = p.dtype in (torch.bfloat16, torch.float16)
            if mask is None or bool(mask.all()):
                g["mode"] = "full"
                g["master"] = p.detach().float().clone() if low_precision else None
                shape = p.shape
            elif float(mask.float().mean()) < sparse_below:
                g["mode"] = "sparse"
                flat = mask.reshape(-1)
                idx_dtype = torch.int32 if p.numel() < 2**31 else torch.int64
                g["idx"] = flat.nonzero().squeeze(1).to(idx_dtype)  # (k,)
                g["master"] = p.detach().reshape(-1)[g["idx"].long()].float().clone()  # (k,)
                shape = (g["idx"].numel(),)
            else:
                g["mode"] = "dense"
                g["mask"] = mask.to(torch.bool).reshape(p.shape)
                g["master"] = p.detach().float().clone() if low_precision else None
                shape = p.shape
            for key in self.moments:
                g[key] = torch.zeros(shape)
            self.groups.append(g)

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _grad(g: dict) -> Tensor | None:
        grad = g["param"].grad
        if grad is None:
            return None
        if g["mode"] == "sparse":
            return grad.reshape(-1)[g["idx"].long()].float()  # (k,)
        grad = grad.float()
        return grad * g["mask"] if g["mode"] == "dense" else grad

    def grad_norm(self) -> float:
        """L2 norm of the gradient entries that the optimizer would apply."""
        total = 0.0
        for g in self.groups:
            grad = self._grad(g)
            if grad is not None:
                total += float(grad.pow(2).sum())
        return math.sqrt(total)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (moments, indices, master copies)."""
        n = 0
        for g in self.groups:
            for key in ("m", "v", "idx", "master"):
                t = g.get(key)
                if t is not None:
                    n += t.numel() * t.element_size()
        return n

    def zero_grad(self) -> None:
        for g in self.groups:
            g["param"].grad = None

    # -- the update -------------------------------------------------------------------------------
    def _direction(self, g: dict, grad: Tensor, w: Tensor, lr: float) -> tuple[Tensor, float]:
        """(update, decay): the step moves w to w·decay − lr·update (moments updated in place)."""
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        g["m"].mul_(b1).add_(grad, alpha=1 - b1)
        g["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        return (g["m"] / bc1) / ((g["v"] / bc2).sqrt() + self.eps), 1 - lr * self.weight_decay

    @torch.no_grad()
    def step(self, *, lr: float | None = None, clip: float | None = None) -> float:
        """One optimizer step; returns the (pre-clipping) gradient norm."""
        lr = self.lr if lr is None else lr
        norm = self.grad_norm()
        scale = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        self.step_count += 1
        for g in self.groups:
            grad = self._grad(g)
            if grad is None:
                continue
            grad = grad * scale
            p = g["param"]
            if g["mode"] == "sparse":
                w = g["master"]
                update, decay = self._direction(g, grad, w, lr)
                w.mul_(decay).add_(update, alpha=-lr)
                p.view(-1).index_copy_(0, g["idx"].long(), w.to(p.dtype))
                continue
            w = g["master"] if g["master"] is not None else p.data.float()
            update, decay = self._direction(g, grad, w, lr)
            new = w * decay - lr * update
            if g["mode"] == "dense":
                new = torch.where(g["mask"], new, w)
            if g["master"] is not None:
                g["master"].copy_(new)
                p.copy_(torch.where(g["mask"], new.to(p.dtype), p) if g["mode"] == "dense" else new.to(p.dtype))
            else:
                p.copy_(torch.where(g["mask"], new, p) if g["mode"] == "dense" else new)
        return norm

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        out = {"step_count": self.step_count}
        for g in self.groups:
            for key in (*self.moments, "master"):
                if g.get(key) is not None:
                    out[f"{g['name']}::{key}"] = g[key]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        for g in self.groups:
            for key in (*self.moments, "master"):
                k = f"{g['name']}::{key}"
                if k in state:
                    g[key].copy_(state[k])


class MaskedSGD(MaskedAdamW):
    """SGD with heavy-ball momentum on the selected entries, as `torch.optim.SGD` computes it
    (weight decay added to the gradient, no dampening): buf = μ·buf + (g + λ·w), w ← w − lr·buf.
    One moment per selected entry, so its state is half of MaskedAdamW's."""

    moments = ("m",)

    def __init__(
        self,
        named_params,
        masks=None,
        *,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        sparse_below: float = 0.1,
    ):
        self.momentum = momentum
        super().__init__(named_params, masks, lr=lr, weight_decay=weight_decay, sparse_below=sparse_below)

    def _direction(self, g: dict, grad: Tensor, w: Tensor, lr: float) -> tuple[Tensor, float]:
        if self.weight_decay:
            grad = grad.add(w, alpha=self.weight_decay)
        g["m"].mul_(self.momentum).add_(grad)
        return g["m"], 1.0


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(
    kind: str,
    named_params,
    masks=None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    sparse_below: float = 0.1,
) -> MaskedAdamW:
    """The masked optimizer called `kind` ("adamw" or "sgd"; `momentum` is SGD's)."""
    if kind == "sgd":
        return MaskedSGD(
            named_params, masks, lr=lr, momentum=momentum, weight_decay=weight_decay, sparse_below=sparse_below
        )
    return MaskedAdamW(named_params, masks, lr=lr, weight_decay=weight_decay, sparse_below=sparse_below)
