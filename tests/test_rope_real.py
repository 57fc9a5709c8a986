"""RoPE in real arithmetic (models.dit.apply_rope), so that inductor compiles the DiT without a
complex-number fallback: equal to the complex multiply it replaces, and compiled cleanly."""

from __future__ import annotations

import pytest
import torch

from dinosae.models import dit as D


def complex_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """The rotation as one complex multiply (the code before): the independent reference."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.view_as_complex(rope.float())).flatten(-2).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rope_equals_the_complex_multiply(dtype):
    g = torch.Generator().manual_seed(0)
    rope = torch.stack(D.rope_tables((4, 4), 32), dim=-1)
    x = torch.randn(2, 3, 2, 16, 32, generator=g).to(dtype)  # (qk, B, heads, T, head_dim)
    got, want = D.apply_rope(x, rope), complex_rope(x, rope)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 0.0  # bf16: the same value after rounding
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # a rotation: norms of the pairs kept
    pairs = x.float().unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(got.float().unflatten(-1, (-1, 2)).norm(dim=-1), pairs,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


@pytest.mark.integration
def test_the_dit_compiles_without_graph_breaks_or_complex_fallback(caplog):
    import logging

    torch.manual_seed(0)
    model = D.build_dit("tiny", 4, 16, 3, (2, 2)).eval()
    x, t, y = torch.randn(2, 4, 16), torch.rand(2), torch.tensor([0, 1])
    explained = torch._dynamo.explain(model)(x, t, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    with caplog.at_level(logging.WARNING):
        out = torch.compile(model)(x, t, y)
    torch.testing.assert_close(out, model(x, t, y), rtol=1e-4, atol=1e-5)
    assert not [m for m in caplog.messages if "complex" in m.lower()]
