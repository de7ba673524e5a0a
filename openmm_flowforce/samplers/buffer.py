"""Prioritised replay buffer of AIS samples for FAB.

Midgley et al., "Flow Annealed Importance Sampling Bootstrap", ICLR 2023,
arXiv 2208.01893, Sec. 3 ("prioritized replay buffer") and Algorithm 2.

The buffer stores AIS samples x targeting p²/q_θ' together with their log AIS weights
``log w`` and ``log q_θ'(x)``, θ' the flow parameters when the weight was last valid.
Points are drawn with probability ∝ w (without replacement within a draw: Gumbel top-k
on the log weights). When a point is reused under new parameters θ its weight for the
new AIS target p²/q_θ is ``w·q_θ'(x)/q_θ(x)`` (the target changes, the sample does not),
which :meth:`PrioritisedBuffer.reweight` applies and records ``log q_θ(x)`` as the new
reference. The buffer is a ring: the oldest points are overwritten first.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import FlowforceError

Tensor = torch.Tensor


class PrioritisedBuffer:
    """A ring buffer of ``(x, log w, log q_old)`` sampled by weight.

    Args:
        dim: width of x.
        capacity: number of points kept.
        dtype: floating dtype of the stored tensors.
    """

    def __init__(self, dim: int, capacity: int, dtype: torch.dtype = torch.float64):
        if capacity < 1:
            raise FlowforceError(f"buffer capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.x = torch.zeros(self.capacity, dim, dtype=dtype)
        self.log_w = torch.zeros(self.capacity, dtype=dtype)
        self.log_q_old = torch.zeros(self.capacity, dtype=dtype)
        self.size = 0
        self.next = 0

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def add(self, x: Tensor, log_w: Tensor, log_q: Tensor) -> None:
        """Store a batch; non-finite log weights are stored as −inf (never drawn)."""
        n = x.shape[0]
        if n > self.capacity:
            x, log_w, log_q, n = x[-self.capacity:], log_w[-self.capacity:], log_q[-self.capacity:], self.capacity
        idx = (torch.arange(n) + self.next) % self.capacity
        ok = torch.isfinite(log_w) & torch.isfinite(log_q) & torch.isfinite(x).all(-1)
        self.x[idx] = x.detach().to(self.x.dtype)
        self.log_w[idx] = torch.where(ok, log_w.detach(), torch.full_like(log_w, -torch.inf)).to(self.log_w.dtype)
        self.log_q_old[idx] = torch.where(ok, log_q.detach(), torch.zeros_like(log_q)).to(self.log_q_old.dtype)
        self.next = int((self.next + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` distinct indices drawn ∝ w (Gumbel top-k): returns ``(indices, x, log_q_old)``.

        Raises:
            ValueError: if fewer than ``n`` points with non-zero weight are stored.
        """
        log_w = self.log_w[:self.size]
        n_valid = int(torch.isfinite(log_w).sum())
        if n_valid < n:
            raise FlowforceError(f"the buffer holds {n_valid} points with non-zero weight, fewer than the {n} "
                                 "requested; raise min_buffer or lower the batch size")
        gumbel = -torch.log(-torch.log(torch.rand_like(log_w).clamp_min(torch.finfo(log_w.dtype).tiny)))
        idx = torch.topk(log_w + gumbel, n).indices
        return idx, self.x[idx], self.log_q_old[idx]

    @torch.no_grad()
    def reweight(self, idx: Tensor, log_q_new: Tensor) -> None:
        """Weights for the AIS target under the current flow: ``log w += log q_old − log q_new``."""
        log_q_new = log_q_new.detach().to(self.log_w.dtype)
        ok = torch.isfinite(log_q_new)
        idx, log_q_new = idx[ok], log_q_new[ok]
        self.log_w[idx] += self.log_q_old[idx] - log_q_new
        self.log_q_old[idx] = log_q_new

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x.clone(), "log_w": self.log_w.clone(), "log_q_old": self.log_q_old.clone(),
                "size": self.size, "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["x"].shape != self.x.shape:
            raise FlowforceError(f"buffer in the checkpoint has shape {tuple(state['x'].shape)}, this run expects "
                                 f"{tuple(self.x.shape)} (buffer_size or the target changed)")
        self.x.copy_(state["x"])
        self.log_w.copy_(state["log_w"])
        self.log_q_old.copy_(state["log_q_old"])
        self.size, self.next = int(state["size"]), int(state["next"])
