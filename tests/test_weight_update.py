"""add_delta: exact in fp32, clamped and measured in fp16/fp8."""

import torch

from library.weight_update import add_delta


def test_fp32_exact():
    w, d = torch.randn(8, 8), torch.randn(8, 8) * 0.1
    out, stats = add_delta(w, d)
    assert torch.equal(out, w + d) and stats.relative_error < 1e-6 and stats.clamped == 0


def test_fp8_clamped_finite_and_error_reported():
    w = (torch.randn(64, 64) * 100).to(torch.float8_e4m3fn)
    d = torch.randn(64, 64) * 0.5
    d[0, 0] = 1e4  # forces a clamp at 448
    out, stats = add_delta(w, d)
    assert out.dtype == torch.float8_e4m3fn
    assert torch.isfinite(out.float()).all() and out.float().abs().max() <= 448
    assert stats.clamped >= 1
    expected = float(((out.float() - w.float()) - d).norm() / d.norm())
    assert abs(stats.relative_error - expected) < 1e-6 and stats.relative_error > 0


def test_fp16_save_precision_differs_from_input():
    w, d = torch.randn(4, 4, dtype=torch.float32), torch.full((4, 4), 70000.0)
    out, stats = add_delta(w, d, out_dtype=torch.float16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and stats.clamped == 16
