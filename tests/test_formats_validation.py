"""Every module is checked when it is read (issue 11 "Invalid outputs"), and nothing we write fails that check.

Bad modules use real SD1 kohya names; each error must be a LoraToolsError naming the file and the key.
The round trip draws adapters of every type, writes them in every format and reads them back: the
result is either our clean refusal (a LoHa/LoKr whose exact LoRA form would outgrow a PEFT format) or
a file that reads and gives the same delta as the input, computed here from the stored tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from library.errors import LoraToolsError
from library.formats import lora_from_tensors, lora_tensors
from networks import adapter_from_tensors

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # [320, 320]
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # [320, 320, 3, 3]
FILE = "bad.safetensors"


def read(tensors, metadata=None):
    return lora_from_tensors(tensors, metadata, family="sd1", path=FILE)


def lora(rank=4, name=ATTN, **extra):
    return {f"{name}.lora_down.weight": torch.randn(rank, 320), f"{name}.lora_up.weight": torch.randn(320, rank),
            **{f"{name}.{k}": v for k, v in extra.items()}}


def refused(tensors, key, words, metadata=None):
    with pytest.raises(LoraToolsError) as info:
        read(tensors, metadata)
    assert info.value.file == FILE and info.value.key == key, (info.value.file, info.value.key)
    assert words in info.value.message, info.value.message
    assert "\n" not in str(info.value)


def test_ranks_that_disagree_are_refused():
    t = lora()
    t[f"{ATTN}.lora_up.weight"] = torch.randn(320, 3)
    refused(t, f"{ATTN}.lora_up.weight", "has rank 3 (shape (320, 3)) but lora_down.weight has rank 4")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_and_bool_factors_are_refused(dtype):
    t = lora()
    t[f"{ATTN}.lora_down.weight"] = torch.ones(4, 320, dtype=dtype)
    refused(t, f"{ATTN}.lora_down.weight", "must be floating point")


def test_rank_zero_module_is_refused():
    refused(lora(rank=0), f"{ATTN}.lora_down.weight", "a rank-0 module")


@pytest.mark.parametrize(("alpha", "words"), [(torch.tensor([4.0, 4.0]), "has 2 elements"),
                                              (torch.tensor(float("nan")), "must be finite"),
                                              (torch.tensor(float("inf")), "must be finite"),
                                              (torch.tensor(True), "alpha is a real number")])
def test_alpha_must_be_one_finite_number(alpha, words):
    refused(lora(alpha=alpha), f"{ATTN}.alpha", words)


def test_loha_and_lokr_shapes_must_agree():
    n = ATTN
    loha = {f"{n}.hada_w1_a": torch.randn(320, 4), f"{n}.hada_w1_b": torch.randn(4, 320),
            f"{n}.hada_w2_a": torch.randn(320, 4), f"{n}.hada_w2_b": torch.randn(3, 320)}
    refused(loha, f"{n}.hada_w2_a", "has rank 4 (shape (320, 4)) but hada_w2_b has rank 3")
    tucker = {f"{CONV}.hada_w1_a": torch.randn(4, 320), f"{CONV}.hada_w1_b": torch.randn(4, 320),
              f"{CONV}.hada_t1": torch.randn(4, 4, 3, 3), f"{CONV}.hada_w2_a": torch.randn(4, 320),
              f"{CONV}.hada_w2_b": torch.randn(4, 320)}
    refused(tucker, f"{CONV}.hada_t1", "without its pair")
    both = {f"{n}.lokr_w1": torch.randn(4, 4), f"{n}.lokr_w1_a": torch.randn(4, 1), f"{n}.lokr_w1_b": torch.randn(1, 4),
            f"{n}.lokr_w2": torch.randn(80, 80)}
    refused(both, f"{n}.lokr_w1", "either full or decomposed")
    lokr = {f"{n}.lokr_w1": torch.randn(4, 4), f"{n}.lokr_w2_a": torch.randn(80, 2), f"{n}.lokr_w2_b": torch.randn(3, 80)}
    refused(lokr, f"{n}.lokr_w2_a", "has rank 2 (shape (80, 2)) but lokr_w2_b has rank 3")


PEFT_NAME = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def peft_file():
    return {f"{PEFT_NAME}.lora_A.weight": torch.randn(4, 320), f"{PEFT_NAME}.lora_B.weight": torch.randn(320, 4)}


@pytest.mark.parametrize(("config", "words"), [
    ({"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": ["down_blocks.0"]}, "alpha_pattern is a JSON list"),
    ({"unet.rank_pattern": "4"}, "rank_pattern is a JSON str"),
    ({"unet.alpha_pattern": {"to_q": "big"}}, "alpha_pattern['to_q'] is \"big\""),
    ({"unet.lora_alpha": [1]}, "unet.lora_alpha is [1]; expected a finite number"),
    ({"unet.lora_alpha": True}, "expected a finite number"),
])
def test_peft_config_fields_of_the_wrong_type_are_refused(config, words):
    refused(peft_file(), "lora_adapter_metadata", words, {"lora_adapter_metadata": json.dumps(config)})


def test_unreadable_peft_config_is_refused():
    for raw, words in (("{not json", "not valid JSON"), ("[1, 2]", "is a JSON list, not an object"),
                       ("[" * 100000 + "]" * 100000, "not valid JSON")):
        refused(peft_file(), "lora_adapter_metadata", words, {"lora_adapter_metadata": raw})


# ---------------------------------------------------------------------------------------------------------
# Round trip: nothing we write fails our own read.

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def modules(draw):
    """(kohya tensors of one module on an SD1 attention or conv weight, its ΔW in float64 computed here)."""
    kind = draw(st.sampled_from(["lora", "locon", "tucker", "dora", "loha", "loha_tucker", "lokr", "lokr_full",
                                 "lokr_conv", "lokr_tucker", "full"]))
    dtype = draw(st.sampled_from(DTYPES))
    r = draw(st.integers(1, 3))
    alpha = draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 3.0, 8.0])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.1).to(dtype)

    def d(t):
        return t.double()

    conv = kind in ("locon", "tucker", "loha_tucker", "lokr_conv", "lokr_tucker")
    name = CONV if conv else ATTN
    shape = (320, 320, 3, 3) if conv else (320, 320)
    t: dict[str, torch.Tensor] = {}
    if kind in ("lora", "dora", "locon"):
        t["lora_down.weight"] = rnd(r, 320, 3, 3) if conv else rnd(r, 320)
        t["lora_up.weight"] = rnd(320, r, 1, 1) if conv else rnd(320, r)
        delta = d(t["lora_up.weight"]).reshape(320, r) @ d(t["lora_down.weight"]).reshape(r, -1)
        rank = r
    elif kind == "tucker":
        t["lora_down.weight"], t["lora_mid.weight"], t["lora_up.weight"] = rnd(r, 320, 1, 1), rnd(r, r, 3, 3), \
            rnd(320, r, 1, 1)
        core = torch.einsum("mnhw,ni->mihw", d(t["lora_mid.weight"]), d(t["lora_down.weight"]).reshape(r, 320))
        delta = d(t["lora_up.weight"]).reshape(320, r) @ core.reshape(r, -1)
        rank = r
    elif kind == "loha":
        for i in "12":
            t[f"hada_w{i}_a"], t[f"hada_w{i}_b"] = rnd(320, r), rnd(r, 320)
        delta = (d(t["hada_w1_a"]) @ d(t["hada_w1_b"])) * (d(t["hada_w2_a"]) @ d(t["hada_w2_b"]))
        rank = r
    elif kind == "loha_tucker":
        ms = []
        for i in "12":
            t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t[f"hada_t{i}"] = rnd(r, 320), rnd(r, 320), rnd(r, r, 3, 3)
            ms.append(torch.einsum("ijhw,jq,ip->pqhw", d(t[f"hada_t{i}"]), d(t[f"hada_w{i}_b"]), d(t[f"hada_w{i}_a"])))
        delta = (ms[0] * ms[1]).reshape(320, -1)
        rank = r
    elif kind in ("lokr", "lokr_full", "lokr_conv", "lokr_tucker"):
        t["lokr_w1"] = rnd(4, 4)
        if kind == "lokr":
            t["lokr_w2_a"], t["lokr_w2_b"] = rnd(80, r), rnd(r, 80)
            w2, rank = d(t["lokr_w2_a"]) @ d(t["lokr_w2_b"]), r
        elif kind == "lokr_full":
            t["lokr_w2"] = rnd(80, 80)
            w2, rank = d(t["lokr_w2"]), None
        elif kind == "lokr_conv":
            t["lokr_w2_a"], t["lokr_w2_b"] = rnd(80, r), rnd(r, 80 * 9)
            w2, rank = d(t["lokr_w2_a"]) @ d(t["lokr_w2_b"]), r
        else:
            t["lokr_w2_a"], t["lokr_w2_b"], t["lokr_t2"] = rnd(r, 80), rnd(r, 80), rnd(r, r, 3, 3)
            w2 = torch.einsum("ijhw,jq,ip->pqhw", d(t["lokr_t2"]), d(t["lokr_w2_b"]), d(t["lokr_w2_a"])).reshape(80, -1)
            rank = r
        delta = torch.kron(d(t["lokr_w1"]), w2.contiguous())
    else:
        t["diff"] = rnd(*shape)
        delta, rank = d(t["diff"]).reshape(320, -1), None
    if alpha is not None and kind != "full":
        t["alpha"] = torch.tensor(alpha)
    scale = 1.0 if rank is None or alpha is None else alpha / rank
    if kind == "dora":
        t["dora_scale"] = rnd(320, 1).abs() + 1
    return {f"{name}.{k}": v for k, v in t.items()}, (delta * scale).reshape(shape), kind


def deltas(lora) -> dict[str, torch.Tensor]:
    return {m.target.key: adapter_from_tensors(m.tensors, dora_axis=m.dora_axis).delta(m.target.shape).double()
            for m in lora.modules}


@settings(max_examples=60, deadline=None, database=None)
@given(modules(), st.sampled_from(["kohya", "diffusers", "ai-toolkit", "comfy"]))
def test_everything_we_write_reads_back_with_the_same_delta(module, fmt):
    tensors, expected, kind = module
    source = read(tensors)
    try:
        out, meta = lora_tensors(source.modules, "sd1", fmt)
    except LoraToolsError as exc:
        # the only refusal: a LyCORIS module whose exact LoRA form is larger than the weight, in a PEFT format
        assert fmt == "diffusers" and kind == "lokr_full", (fmt, kind, exc.message)
        assert "formats that hold LoKr modules: kohya, ai-toolkit, comfy" in exc.message
        return
    back = lora_from_tensors(out, meta, family="sd1", path="ours.safetensors")  # validates every module
    (key, got), = deltas(back).items()
    scale = expected.abs().max().item()
    # the expected delta is exact (float64 from the stored values); ours is computed in float32
    assert (got - expected).abs().max().item() <= 1e-5 * scale, (key, kind, fmt)
    if kind.startswith(("loha", "lokr")) and fmt == "diffusers":
        assert not any(".hada_" in k or ".lokr_" in k for k in out)


# ---------------------------------------------------------------------------------------------------------
# convert_lora end to end: both outcomes of --to diffusers on a LoKr, and a bad input refused.


def convert(argv, capsys):
    import convert_lora

    try:
        code = convert_lora.run_cli(convert_lora.setup_parser, convert_lora.main, [str(a) for a in argv] + ["--family", "sd1"])
    except SystemExit as exc:  # user errors exit 2 with one line on stderr
        code = exc.code
    return code, capsys.readouterr()


def test_convert_lokr_to_diffusers_exactly_or_refuse(tmp_path, capsys):
    from library.safetensors_io import load_tensors, save_tensors

    g = torch.Generator().manual_seed(5)
    w1, w2a, w2b = torch.randn(4, 4, generator=g), torch.randn(80, 2, generator=g), torch.randn(2, 80, generator=g)
    src, dst = tmp_path / "lokr.safetensors", tmp_path / "peft.safetensors"
    save_tensors(src, {f"{ATTN}.lokr_w1": w1, f"{ATTN}.lokr_w2_a": w2a, f"{ATTN}.lokr_w2_b": w2b,
                       f"{ATTN}.alpha": torch.tensor(1.0)}, {})
    code, out = convert([src, dst, "--to", "diffusers"], capsys)
    assert code == 0, out.err
    tensors, meta = load_tensors(dst)
    assert not any("lokr" in k for k in tensors) and len(tensors) == 2
    back = read_lora_file(dst)
    (module,) = back.modules
    a = adapter_from_tensors(module.tensors)
    expected = torch.kron(w1.double(), w2a.double() @ w2b.double()) * (1.0 / 2)  # scale α / rank(w2)
    assert a.rank == 8 and torch.allclose(a.delta().double(), expected, rtol=0, atol=1e-5)
    # both factors full: rank 4·80 = 320 on a 320×320 weight -> one line, exit 2, nothing written
    full, dst2 = tmp_path / "full.safetensors", tmp_path / "no.safetensors"
    save_tensors(full, {f"{ATTN}.lokr_w1": w1, f"{ATTN}.lokr_w2": torch.randn(80, 80, generator=g)}, {})
    code, out = convert([full, dst2, "--to", "diffusers"], capsys)
    assert code == 2 and not dst2.exists()
    line = out.err.strip()
    assert "\n" not in line and ATTN in line and "has no LoKr" in line
    assert "formats that hold LoKr modules: kohya, ai-toolkit, comfy" in line
    assert convert([full, dst2, "--to", "kohya"], capsys)[0] == 0


def test_convert_refuses_ranks_that_disagree(tmp_path, capsys):
    from library.safetensors_io import save_tensors

    src, dst = tmp_path / "bad.safetensors", tmp_path / "out.safetensors"
    t = lora()
    t[f"{ATTN}.lora_up.weight"] = torch.randn(320, 3)
    save_tensors(src, t, {})
    code, out = convert([src, dst, "--to", "diffusers"], capsys)
    assert code == 2 and not dst.exists()
    assert str(src) in out.err and f"{ATTN}.lora_up.weight" in out.err and "has rank 3" in out.err


def read_lora_file(path):
    from library.formats import read_lora

    return read_lora(path, family="sd1")
