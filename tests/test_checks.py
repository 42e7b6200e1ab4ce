"""The non-finite tensor policy (library/checks.py): refuse by name, or warn; and checks needs no CLI or torch import."""

import subprocess
import sys

import pytest
import torch

from library.checks import NonFiniteTracker, refusing_nonfinite
from library.errors import LoraToolsError


def tracked(refuse=None, warn=None):
    kwargs = {} if warn is None else {"warn": warn}
    tracker = NonFiniteTracker("in.safetensors", refuse=refuse, **kwargs)
    bad = torch.ones(3)
    bad[1] = float("nan")
    for i in range(7):
        tracker.check(f"k{i}.lora_up.weight", bad if i != 3 else torch.ones(2))
    tracker.check("k9.lora_down.weight", torch.tensor([float("-inf")]))
    tracker.check("k10.index", torch.tensor([1, 2]))  # integers cannot be non-finite
    return tracker


def test_refuse_names_file_count_and_first_five_tensors_in_one_line():
    with pytest.raises(LoraToolsError) as info:
        tracked(refuse=True).finish()
    expected = ("in.safetensors: 7 tensor(s) contain NaN or inf: k0.lora_up.weight, k1.lora_up.weight, "
                "k2.lora_up.weight, k4.lora_up.weight, k5.lora_up.weight and 2 more; a low-rank decomposition of "
                "such a layer is undefined (repair or drop these modules)")
    assert str(info.value) == expected and info.value.file == "in.safetensors"


def test_warn_policy_names_all_and_returns():
    lines = []
    tracked(refuse=False, warn=lines.append).warn()
    assert lines == ["in.safetensors: 7 tensor(s) contain NaN or inf, which carry into the result: k0.lora_up.weight, "
                     "k1.lora_up.weight, k2.lora_up.weight, k4.lora_up.weight, k5.lora_up.weight, k6.lora_up.weight, "
                     "k9.lora_down.weight"]


def test_clean_tensors_give_nothing():
    lines = []
    tracker = NonFiniteTracker("x", refuse=True, warn=lines.append)
    assert tracker.check("a", torch.zeros(4)) and tracker.check("b", torch.zeros(2, dtype=torch.float16))
    tracker.finish()
    assert lines == [] and tracker.keys == []


def test_refusing_block_sets_the_default_policy_only_inside():
    with refusing_nonfinite():
        inside = tracked()
        explicit = tracked(refuse=False, warn=lambda _: None)
    outside = tracked(warn=lambda _: None)
    with pytest.raises(LoraToolsError, match="7 tensor"):
        inside.warn()  # the name today's readers call applies the policy too
    explicit.warn()
    outside.warn()


def test_checks_imports_neither_cli_nor_torch():
    code = "import sys, library.checks; print('library.cli' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_is_finite_reads_fp8_tensors():
    import torch

    from library.checks import is_finite

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        clean = torch.tensor([0.5, -2.0, 448.0 if dtype == torch.float8_e4m3fn else 57344.0]).to(dtype)
        assert is_finite(clean)
        assert not is_finite(torch.tensor([1.0, float("nan")]).to(dtype))
    assert not is_finite(torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2))


def test_is_finite_tells_overflowing_sums_of_finite_values_from_nan_and_inf():
    import torch

    from library.checks import is_finite

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        big = torch.finfo(dtype).max
        # finite values whose float32 (or float64) sum overflows: still finite
        assert is_finite(torch.full((4,), big, dtype=dtype))
        assert is_finite(torch.tensor([big, -big, big], dtype=dtype))
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.zeros(1000, dtype=dtype)
            t[537] = bad
            assert not is_finite(t), (dtype, bad)
        assert not is_finite(torch.tensor([float("inf"), float("-inf")], dtype=dtype))  # sums to NaN
    assert is_finite(torch.empty(0)) and is_finite(torch.arange(3))
