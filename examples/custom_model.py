"""A custom (non-Hugging Face) model for peftc: any nn.Module that torch.export can trace.

peftc finds it from a MODEL reference `examples/custom_model.py:build` (a callable returning the module).
Tracing needs example inputs: `example_inputs()` beside the callable returns them by forward() argument
name (or pass `--example-input tokens=2x16:int64` on the command line). Batch and sequence axes are
traced as dynamic, so the compiled graph takes any batch size and length.

    peftc inspect examples/custom_model.py:build
    peftc check   examples/custom.peft examples/custom_model.py:build
"""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(torch.nn.functional.gelu(self.proj_in(self.norm(x))))


class TokenClassifier(nn.Module):
    """Token ids -> embedding -> residual MLP blocks -> mean pool -> class logits."""

    def __init__(self, vocab: int = 1000, dim: int = 64, hidden: int = 128, depth: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def build() -> nn.Module:
    torch.manual_seed(0)
    return TokenClassifier().eval()


def example_inputs() -> dict[str, torch.Tensor]:
    return {"tokens": torch.randint(0, 1000, (2, 16))}
