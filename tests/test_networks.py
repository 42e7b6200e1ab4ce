"""Every adapter's delta against a float64 formula written out here, and against LyCORIS' forward pass."""

import logging

import pytest
import torch

from library.errors import LoraToolsError
from networks import FullDiffAdapter, LoHaAdapter, LoKrAdapter, LoRAAdapter, adapter_from_tensors

torch.manual_seed(0)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_lora_linear_scale_and_absent_alpha():
    down, up = torch.randn(4, 20), torch.randn(12, 4)
    for alpha, scale in ((2.0, 0.5), (None, 1.0), (0.0, 1.0), (8.0, 2.0)):
        t = {"lora_down.weight": down, "lora_up.weight": up}
        if alpha is not None:
            t["alpha"] = torch.tensor(alpha)
        a = adapter_from_tensors(t)
        assert isinstance(a, LoRAAdapter) and a.scale == scale and a.rank == 4
        expected = scale * (up.double() @ down.double())
        assert rel(a.delta(), expected) < 1e-6
        fu, fd = a.factors()
        assert rel(fu @ fd, expected) < 1e-6


def test_locon_conv3x3_and_1x1():
    down, up = torch.randn(3, 8, 3, 3), torch.randn(16, 3, 1, 1)
    a = adapter_from_tensors({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.5)})
    expected = torch.einsum("or,rihw->oihw", up[:, :, 0, 0].double(), down.double()) * 0.5
    assert a.delta().shape == (16, 8, 3, 3) and rel(a.delta(), expected) < 1e-6
    d1, u1 = torch.randn(3, 8, 1, 1), torch.randn(16, 3, 1, 1)
    a1 = adapter_from_tensors({"lora_down.weight": d1, "lora_up.weight": u1})
    assert a1.delta().shape == (16, 8, 1, 1)
    assert rel(a1.delta()[:, :, 0, 0], u1[:, :, 0, 0].double() @ d1[:, :, 0, 0].double()) < 1e-6


def test_locon_tucker():
    down, mid, up = torch.randn(4, 8, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(10, 4, 1, 1)
    a = adapter_from_tensors({"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up,
                              "alpha": torch.tensor(2.0)})
    expected = 0.5 * torch.einsum("om,mnhw,ni->oihw", up[:, :, 0, 0].double(), mid.double(), down[:, :, 0, 0].double())
    assert rel(a.delta(), expected) < 1e-6
    fu, fd = a.factors()
    assert fu.shape == (10, 4) and rel((fu @ fd).reshape(10, 8, 3, 3), expected) < 1e-6


def test_loha_linear_and_tucker():
    w = {k: torch.randn(*s) for k, s in (("hada_w1_a", (12, 4)), ("hada_w1_b", (4, 20)),
                                         ("hada_w2_a", (12, 4)), ("hada_w2_b", (4, 20)))}
    a = adapter_from_tensors({**w, "alpha": torch.tensor(2.0)})
    assert isinstance(a, LoHaAdapter) and a.scale == 0.5
    expected = 0.5 * (w["hada_w1_a"].double() @ w["hada_w1_b"].double()) * (w["hada_w2_a"].double() @ w["hada_w2_b"].double())
    assert rel(a.delta(), expected) < 1e-6
    t = {"hada_w1_a": torch.randn(4, 12), "hada_w1_b": torch.randn(4, 8), "hada_t1": torch.randn(4, 4, 3, 3),
         "hada_w2_a": torch.randn(4, 12), "hada_w2_b": torch.randn(4, 8), "hada_t2": torch.randn(4, 4, 3, 3)}
    a = adapter_from_tensors({**t, "alpha": torch.tensor(4.0)})
    m1 = torch.einsum("ijhw,jq,ip->pqhw", t["hada_t1"].double(), t["hada_w1_b"].double(), t["hada_w1_a"].double())
    m2 = torch.einsum("ijhw,jq,ip->pqhw", t["hada_t2"].double(), t["hada_w2_b"].double(), t["hada_w2_a"].double())
    assert rel(a.delta(), m1 * m2) < 1e-6


def test_lokr_every_factor_combination():
    w1, w1a, w1b = torch.randn(4, 5), torch.randn(4, 2), torch.randn(2, 5)
    w2, w2a, w2b = torch.randn(6, 8), torch.randn(6, 3), torch.randn(3, 8)
    alpha = torch.tensor(1.5)
    full_w1, dec_w1 = w1.double(), w1a.double() @ w1b.double()
    full_w2, dec_w2 = w2.double(), w2a.double() @ w2b.double()
    cases = [({"lokr_w1": w1, "lokr_w2": w2}, torch.kron(full_w1, full_w2), 1.0),
             ({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, torch.kron(full_w1, dec_w2), 0.5),
             ({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2": w2}, torch.kron(dec_w1, full_w2), 0.75),
             ({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, torch.kron(dec_w1, dec_w2), 0.5)]
    for tensors, kron, scale in cases:
        a = adapter_from_tensors({**tensors, "alpha": alpha})
        assert isinstance(a, LoKrAdapter) and a.scale == pytest.approx(scale)
        assert a.delta().shape == (24, 40) and rel(a.delta(), scale * kron) < 1e-6


def test_lokr_conv_full_and_decomposed_w2():
    w1, w2 = torch.randn(2, 2), torch.randn(4, 3, 3, 3)
    a = adapter_from_tensors({"lokr_w1": w1, "lokr_w2": w2})
    expected = torch.kron(w1.double()[:, :, None, None], w2.double())
    assert a.delta((8, 6, 3, 3)).shape == (8, 6, 3, 3) and rel(a.delta((8, 6, 3, 3)), expected) < 1e-6
    w2a, w2b = torch.randn(4, 2), torch.randn(2, 27)
    a = adapter_from_tensors({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    w2d = (w2a.double() @ w2b.double()).reshape(4, 3, 3, 3)
    assert rel(a.delta((8, 6, 3, 3)), 0.5 * torch.kron(w1.double()[:, :, None, None], w2d)) < 1e-6


def test_full_diff_and_bias():
    diff, bias = torch.randn(5, 7), torch.randn(5)
    a = adapter_from_tensors({"diff": diff, "diff_b": bias})
    assert isinstance(a, FullDiffAdapter) and torch.equal(a.delta(), diff) and torch.equal(a.bias_delta, bias)
    only_bias = adapter_from_tensors({"diff_b": bias})
    assert torch.equal(only_bias.delta_with_base(torch.zeros(5, 7)), torch.zeros(5, 7))


@pytest.mark.parametrize("axis", ["in", "out"])
def test_dora_both_axes(axis):
    W = torch.randn(12, 20, dtype=torch.float64)
    down, up = torch.randn(4, 20), torch.randn(12, 4)
    mag_shape = (1, 20) if axis == "in" else (12, 1)
    mag = torch.rand(*mag_shape) + 0.5
    a = adapter_from_tensors({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0),
                              "dora_scale": mag})
    assert a.dora.axis == axis
    merged = W + 0.5 * up.double() @ down.double()
    norm = merged.norm(dim=0, keepdim=True) if axis == "in" else merged.norm(dim=1, keepdim=True)
    dora_w = mag.double() * merged / norm
    for s in (1.0, 0.3):
        assert rel(a.delta_with_base(W.float(), s), s * (dora_w - W)) < 1e-5


def test_dora_peft_vector_is_output_axis():
    a = adapter_from_tensors({"lora_down.weight": torch.randn(2, 6), "lora_up.weight": torch.randn(4, 2),
                              "dora_scale": torch.rand(4)})
    assert a.dora.axis == "out"


def test_bad_modules_raise_user_errors():
    with pytest.raises(LoraToolsError, match="lora_up"):
        adapter_from_tensors({"lora_down.weight": torch.randn(4, 8)}, "m")
    with pytest.raises(LoraToolsError, match="rank"):
        adapter_from_tensors({"lora_down.weight": torch.randn(4, 8), "lora_up.weight": torch.randn(6, 3)}, "m")
    with pytest.raises(LoraToolsError, match="unknown"):
        adapter_from_tensors({"weird": torch.randn(1)}, "m")
    with pytest.raises(LoraToolsError, match="mixes"):
        adapter_from_tensors({"lora_down.weight": torch.randn(4, 8), "lora_up.weight": torch.randn(6, 4),
                              "hada_w1_a": torch.randn(1)}, "m")


# --- LyCORIS' own modules as an outside oracle: compare with their forward pass (their merge helpers
# apply (α/r)² to LoHa/LoKr, formats.md §5.9, so only the forward is trustworthy).
lycoris = pytest.importorskip("lycoris")


def _forward_delta(module, org, x):
    with torch.no_grad():
        return module.forward(x) - org(x)


def _randomize(module):
    sd = {k: (torch.randn_like(v) * 0.3 if k != "alpha" else v) for k, v in module.state_dict().items()}
    module.load_state_dict(sd)
    return {k: v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("kind,layer", [("loha", "linear"), ("loha", "conv_tucker"), ("lokr", "linear"),
                                        ("lokr", "conv"), ("locon", "linear"), ("locon", "conv"),
                                        ("locon", "conv_tucker")])
def test_against_lycoris_forward(kind, layer):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(1)
    if layer == "linear":
        org, x = torch.nn.Linear(64, 48, bias=False), torch.randn(3, 64)
    else:
        org, x = torch.nn.Conv2d(16, 24, 3, padding=1, bias=False), torch.randn(2, 16, 6, 6)
    tucker = layer == "conv_tucker"
    cls = {"loha": LohaModule, "lokr": LokrModule, "locon": LoConModule}[kind]
    extra = {"decompose_both": True, "factor": 4} if kind == "lokr" else {}
    module = cls("m", org, multiplier=1.0, lora_dim=4, alpha=2, use_tucker=tucker, **extra)
    tensors = _randomize(module)
    ours = adapter_from_tensors(tensors, "m").delta(tuple(org.weight.shape))
    if layer == "linear":
        expected = x @ ours.T
    else:
        expected = torch.nn.functional.conv2d(x, ours, padding=1)
    assert rel(expected, _forward_delta(module, org, x)) < 1e-4


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_against_lycoris(wd_on_out):
    from lycoris.modules.locon import LoConModule

    torch.manual_seed(2)
    org = torch.nn.Linear(32, 24, bias=False)
    module = LoConModule("m", org, multiplier=1.0, lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=wd_on_out)
    tensors = _randomize(module)
    tensors["dora_scale"] = tensors["dora_scale"].abs() + 0.1
    module.load_state_dict(tensors)
    a = adapter_from_tensors(tensors, "m")
    assert a.dora.axis == ("out" if wd_on_out else "in")
    x = torch.randn(5, 32)
    ours = org.weight.detach() + a.delta_with_base(org.weight.detach())
    assert rel(x @ ours.T, module.forward(x).detach()) < 1e-4


def test_loha_and_lokr_exact_low_rank_forms():
    g = torch.Generator().manual_seed(11)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    loha = {"hada_w1_a": r(6, 2), "hada_w1_b": r(2, 5), "hada_w2_a": r(6, 3), "hada_w2_b": r(3, 5)}
    a = adapter_from_tensors(loha)
    up, down = a.exact_factors()
    want = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    assert a.exact_rank == 6 and up.shape == (6, 6) and torch.allclose(up @ down, want, rtol=0, atol=1e-12)
    lokr = {"lokr_w1": r(2, 3), "lokr_w2": r(4, 5)}  # both full: ranks min(2, 3) · min(4, 5)
    k = adapter_from_tensors(lokr)
    up, down = k.exact_factors()
    assert k.exact_rank == 8 and up.shape == (8, 8) and down.shape == (8, 15)
    assert torch.allclose(up @ down, torch.kron(lokr["lokr_w1"], lokr["lokr_w2"]), rtol=0, atol=1e-12)


def test_lokr_tucker_rank_one_exact_factors():
    """Rank-1 Tucker w2 on a 3×3 conv: its transposed factor has a size-1 side, which torch.kron cannot view."""
    g = torch.Generator().manual_seed(12)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    lokr = {"lokr_w1": r(4, 4), "lokr_w2_a": r(1, 5), "lokr_w2_b": r(1, 6), "lokr_t2": r(1, 1, 3, 3)}
    k = adapter_from_tensors(lokr)
    up, down = k.exact_factors()
    w2 = torch.einsum("ijkl,io,jq->oqkl", lokr["lokr_t2"], lokr["lokr_w2_a"], lokr["lokr_w2_b"])
    want = torch.kron(lokr["lokr_w1"], w2.reshape(5, -1))
    assert torch.allclose(up @ down, want, rtol=0, atol=1e-12)
