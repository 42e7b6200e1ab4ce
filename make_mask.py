"""Make, combine, edit and report parameter masks: which parameters of a model a merge may change.

    python make_mask.py magnitude --model a.safetensors --base b.safetensors --threshold 0.9 --save_to keep.safetensors
    python make_mask.py random --model a.safetensors --rate 0.3 --seed 7 --save_to r.safetensors
    python make_mask.py quad --model a.safetensors --seed 1 --save_to q.safetensors        (→ q.1 … q.4.safetensors)
    python make_mask.py union --masks r.safetensors keep.safetensors --save_to u.safetensors
    python make_mask.py simple --model a.safetensors --value off --edit '*.attn2.*=on' --save_to attn2.safetensors
    python make_mask.py report --masks u.safetensors --plot u.png        (or --model a --base b: per-layer norms)

A mask file is a safetensors file keyed like the model, one bit per parameter (library/mask_file.py);
True = selected = "the merge may change it" (merge_models.py --mask). A key the mask lacks is not selected.
Methods (ComfyUI-DareMerge's maskers, with their bugs fixed):
  simple      all on or all off (--value)
  magnitude   from |model − base|: per chunk of 10⁷ elements the --threshold quantile; the layer threshold is
              the median of the chunk quantiles (--threshold_type median) or their --threshold quantile
              (quantile); --below selects d < t, so a merge leaves the model's most-trained weights alone
              (DareMerge's intended use), --above selects d ≥ t
  random      each parameter with probability --rate, seeded by (--seed, key): order-independent
  quad        four disjoint random masks covering every parameter, as four files NAME.1 … NAME.4
  union, intersection, difference (first minus the others), xor    of two or more --masks
  edit        one --masks file changed by --edit rules
  report      share of selected parameters (--masks) or per-layer norms of --model (‖A‖, ‖A − base‖)
--edit PATTERN=on|off|random:RATE|gaussian:MEAN:STD:THRESHOLD (repeatable, any method but report; later rules
win) replaces the mask of the keys matching the glob PATTERN (PATTERN also matches every key under PATTERN.):
on/off, a Bernoulli(RATE) draw, or MEAN + STD·N(0,1) > THRESHOLD. With quad the rules pick which parameters
take part in the split (off: in no part; on/drawn: in its one part), so the four parts stay disjoint.
--report FILE.json: per-layer, per-block and total counts; --plot FILE.png needs matplotlib
(pip install -r requirements-extras.txt). Inputs: single-file or sharded checkpoints, .ckpt (weights only).
"""

from __future__ import annotations

import argparse
import sys

# Only torch-free modules at the top, so that --help costs no torch import; the work imports inside main().
from library.cli import add_common_args, finite_float, run_cli

METHODS = ("simple", "magnitude", "random", "quad", "union", "intersection", "difference", "xor", "edit", "report")


def fraction(text: str) -> float:
    """A share in [0, 1] (0 and 1 included: all or nothing)."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"value {text!r} must be in [0, 1]")
    return value


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=METHODS, help="what to make (see above)")
    parser.add_argument("--model", default=None, help="checkpoint whose keys and shapes the mask takes (model A)")
    parser.add_argument("--base", default=None, help="magnitude/report: the base model C the difference is taken to")
    parser.add_argument("--masks", nargs="+", default=None, help="mask files for set operations, edit and report")
    parser.add_argument("--save_to", default=None, help="output mask .safetensors (quad: NAME.1 … NAME.4.safetensors)")
    parser.add_argument("--value", choices=("on", "off"), default="on", help="simple: every parameter on or off")
    parser.add_argument("--threshold", type=fraction, default=0.5, help="magnitude: quantile in [0, 1] (default 0.5)")
    parser.add_argument("--threshold_type", choices=("median", "quantile"), default="median",
                        help="magnitude: how chunk quantiles make the layer threshold (default median)")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--below", dest="select", action="store_const", const="below",
                      help="magnitude: select |A − base| < threshold (default)")
    side.add_argument("--above", dest="select", action="store_const", const="above",
                      help="magnitude: select |A − base| ≥ threshold")
    parser.set_defaults(select="below")
    parser.add_argument("--rate", type=fraction, default=0.5, help="random: share of parameters selected (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random, quad and random/gaussian edits (default 0)")
    parser.add_argument("--edit", action="append", default=None, metavar="PATTERN=OP",
                        help="on|off|random:RATE|gaussian:MEAN:STD:THRESHOLD for keys matching PATTERN (repeatable)")
    parser.add_argument("--report", default=None, help="write the per-layer/per-block/total report to this JSON file")
    parser.add_argument("--plot", default=None, help="write a PNG plot of the report (needs matplotlib)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    parser.add_argument("--dry_run", action="store_true", help="check inputs and outputs, print the plan, write nothing")
    add_common_args(parser, writes=False, device=False, precision=False)
    return parser


def main(args: argparse.Namespace) -> dict:
    from library.mask_build import run  # torch: imported when work starts, not for --help

    return run(args)


if __name__ == "__main__":
    sys.exit(run_cli(setup_parser, main))
