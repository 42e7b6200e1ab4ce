#!/usr/bin/env python
"""Generate library/formats/data/<family>.json from reference/shapes/*.tsv (run once; output is committed).

    python tools/gen_format_tables.py [--shapes ../shared/reference/shapes]

The family modules hold the naming rules; this script only runs them over the shape lists and checks
that the rules reproduce those lists exactly (see library/formats/native_build.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.formats.family import DATA_DIR, TableBuilder  # noqa: E402
from library.formats.registry import BUILDERS  # noqa: E402


def reader(folder: Path):
    def shapes(name: str) -> list[tuple[str, str, tuple[int, ...], bool]]:
        rows = []
        for line in (folder / f"{name}.tsv").read_text().splitlines():
            cols = line.split("\t")
            if not line.strip() or cols[0] == "bfl_path" or cols[0] == "kohya_name":
                continue
            if name == "flux1_bfl_kohya":  # bfl_path, kohya_name, shape, default target
                rows.append((cols[0], "Linear", tuple(int(x) for x in cols[2].split("x")), True))
            elif name == "sdxl_unet_kohya_sgm":  # kohya_name, diffusers path, type, shape, bias
                rows.append((cols[0], cols[2], tuple(int(x) for x in cols[3].split("x")), cols[4] == "True"))
            else:
                rows.append((cols[0], cols[1], tuple(int(x) for x in cols[2].split("x")), cols[3] == "True"))
        return rows
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default=str(Path(__file__).resolve().parents[2] / "shared/reference/shapes"))
    parser.add_argument("families", nargs="*")
    args = parser.parse_args()
    shapes = reader(Path(args.shapes))
    DATA_DIR.mkdir(exist_ok=True)
    for name, build in BUILDERS.items():
        if args.families and name not in args.families:
            continue
        builder = TableBuilder()
        build(builder, shapes)
        with open(DATA_DIR / f"{name}.json", "w", encoding="utf-8") as f:
            json.dump(builder.to_json(), f, separators=(",", ":"), sort_keys=True)
            f.write("\n")
        print(f"{name}: {len(builder.targets)} targets, " +
              ", ".join(f"{n} {len(p)}" for n, p in builder.slots.items()))


if __name__ == "__main__":
    main()
