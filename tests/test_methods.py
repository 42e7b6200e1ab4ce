"""library.methods: the one registry of mode names (torch-free), and the scripts' choices drawn from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from library import methods
from library.errors import LoraToolsError
from tests.helpers import ROOT

SINGULAR = ("tsv", "iso_c", "iso_cts", "knots", "np_lora")  # library.singular_methods


def choices_of(parser, flag="--mode"):
    return next(a.choices for a in parser._actions if flag in a.option_strings)


def test_registry_imports_without_torch():
    code = "import sys, library.methods; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_script_takes_its_modes_from_the_registry():
    import flux_merge_lora
    import merge_lora
    import svd_merge_lora

    assert tuple(choices_of(merge_lora.setup_parser())) == (
        "concat", "add", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "breadcrumbs")
    assert tuple(choices_of(svd_merge_lora.setup_parser())) == tuple(sorted(
        ["add", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "breadcrumbs", "svd", "add_svd",
         "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "della_svd", "breadcrumbs_svd",
         *SINGULAR]))
    assert tuple(choices_of(flux_merge_lora.setup_parser())) == (
        "concat", "add", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "breadcrumbs",
        "svd", "add_svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "della_svd",
        "breadcrumbs_svd", *SINGULAR)
    for parser in (merge_lora.setup_parser(), svd_merge_lora.setup_parser(), flux_merge_lora.setup_parser()):
        assert tuple(choices_of(parser, "--majority_sign_method")) == ("total", "frequency")


def test_spaces_aliases_and_randomness():
    assert methods.method("concat").spaces == ("factor",)
    assert methods.method("ties_svd") is methods.method("ties")
    assert methods.method("svd").name == "add" and methods.method("task_arithmetic").name == "add"
    assert [m.name for m in methods.METHODS if m.random] == ["dare_linear", "dare_ties", "della", "knots"]
    assert [methods.space_of(m) for m in SINGULAR] == ["delta"] * 5  # delta-only: flux offers their plain names
    assert methods.space_of("dare_ties_svd") == "delta" and methods.space_of("dare_ties") == "factor"
    with pytest.raises(LoraToolsError, match="unknown merge mode 'bogus'"):
        methods.method("bogus")
    assert "slerp" not in methods.mode_choices("factor") + methods.mode_choices("delta")  # checkpoints only


def test_tensor_functions_cover_every_delta_method():
    from library.merge_methods import METHODS, get_method

    for spec in methods.METHODS:
        if "delta" in spec.spaces:
            bound = get_method(spec.name)
            assert (bound.random, bound.params) == (spec.random, spec.params)
            assert all(get_method(alias) is bound for alias in (*spec.delta_aliases, *spec.aliases))
    assert "concat" not in METHODS  # concat stacks factors: library.lora_combine, no tensor function


class BW:
    def __init__(self, random):
        self.random = random


@pytest.mark.parametrize("kwargs, recorded", [
    ({"mode": "concat"}, None),
    ({"mode": "ties"}, None),
    ({"mode": "dare_linear"}, 5),
    ({"mode": "dare_ties_svd"}, 5),
    ({"mode": "add", "shuffle": True}, 5),
    ({"mode": "add", "block_weights": [None, BW(False)]}, None),
    ({"mode": "add", "block_weights": [None, BW(True)]}, 5),
    ({"mode": "add", "randomized_svd": True}, 5),
])
def test_recorded_seed_only_when_something_was_drawn(kwargs, recorded):
    assert methods.recorded_seed(5, **kwargs) == recorded


def test_block_weights_know_when_they_are_random():
    from library.block_weights import parse_block_weights

    assert parse_block_weights("1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1").random
    assert parse_block_weights("1,U,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1").random
    assert not parse_block_weights("ALL").random and not parse_block_weights("INS").random
