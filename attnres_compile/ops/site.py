"""The parameters of one depth-attention site, as a module the converted model owns."""

from __future__ import annotations

import torch
from torch import nn


class DepthAttentionSite(nn.Module):
    """Pseudo-query `query` [D] (zero-initialised) and key-norm gain `norm_weight` [D] (ones).

    Not an nn.Linear on purpose: a model's global init loop (`model.apply(_init_weights)`)
    matches Linear/Embedding and must not overwrite the zero query (PAPER.md, pitfall 2).
    """

    def __init__(self, dim: int, *, num_sources: int, eps: float, scale: float,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.dim = dim
        self.num_sources = num_sources
        self.eps = float(eps)
        self.scale = float(scale)
        self.query = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        self.norm_weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        # Optional gated correction h = a + gate * (site - a) over the plain stream a (the sum of
        # the sources): None unless `add_gate()` is called. Only the retrofit study's gated arm
        # uses it (examples/retrofit.py; it did not beat the plain exact retrofit), so it is not
        # part of a plan (from_pretrained, apply_plan and vLLM do not rebuild one) and is tested
        # in eager training and state_dict round trips only.
        self.register_parameter("gate", None)

    def add_gate(self, value: float = 0.0) -> nn.Parameter:
        """Add the scalar gate (0 keeps the site's input equal to the plain stream, whatever the query)."""
        self.gate = nn.Parameter(torch.full((), float(value), dtype=self.query.dtype, device=self.query.device))
        return self.gate

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.query.zero_()
        self.norm_weight.fill_(1.0)
        if getattr(self, "gate", None) is not None:
            self.gate.zero_()

    def forward(self, sources: list[torch.Tensor]) -> torch.Tensor:
        """sources: M tensors [..., D] -> [..., D]."""
        from .depth_attention import depth_attention

        return depth_attention(sources, self.query, self.norm_weight, eps=self.eps, scale=self.scale)

    def extra_repr(self) -> str:
        gated = ", gated" if getattr(self, "gate", None) is not None else ""
        return f"dim={self.dim}, num_sources={self.num_sources}, eps={self.eps:g}, scale={self.scale:g}{gated}"
