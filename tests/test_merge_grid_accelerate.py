"""`accelerate launch --multi_gpu --num_processes 2 merge_grid.py …` on a machine without CUDA (accelerate's
`--cpu` alone starts one process; several CPU processes need its mpirun route) splits the cells over two processes (accelerate's
PartialState.split_between_processes) and gathers one CSV on the main process: the same CSV, byte for byte,
as one plain process. Small on purpose: it spawns three interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, kohya_metadata, make_lora, sdxl_modules, write_lora

TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_"


@pytest.mark.skipif(torch.cuda.is_available(), reason="two CPU processes: this box has CUDA, where they would be GPU ones")
def test_two_accelerate_processes_give_the_csv_of_one(tmp_path):
    modules = [m for m in sdxl_modules("none", te2=False) if m.name.startswith(TE1)][:3]
    paths = [write_lora(str(tmp_path / f"{n}.safetensors"), make_lora(modules, r, seed=s, dtype=torch.float32),
                        kohya_metadata("sdxl", r)) for n, r, s in (("a", 8, 1), ("b", 4, 2))]
    argv = ["merge_grid.py", "--models", *paths, "--x", "ratio_a=0.5,1", "--y", "mode=add,ties", "--new_rank", "4",
            "--density", "0.5", "--metrics_only", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same arithmetic in every process
    one = subprocess.run([sys.executable, *argv, "--save_to", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launch, *argv, "--save_to", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    csv_one, csv_two = ((tmp_path / d / "grid.csv").read_text() for d in ("one", "two"))
    assert csv_one == csv_two and csv_one.count("\n") == 5 and ",ok," in csv_one
    made_by = set()
    for name in os.listdir(tmp_path / "two" / "cells"):
        record = json.loads((tmp_path / "two" / "cells" / name).read_text())
        made_by.add(tuple(record["process"]))
    assert made_by == {(0, 2), (1, 2)}  # each process merged its share of the cells
    assert two.stdout.count("wrote ") == 1  # one summary, from the main process
    # A refusal on any process stops every process (none is left waiting at the gather): a rerun into the
    # same folder without --resume or --overwrite.
    again = subprocess.run([*launch, *argv, "--save_to", str(tmp_path / "two")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "output exists; pass --overwrite to replace it" in again.stderr
