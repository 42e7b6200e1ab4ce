"""`pip install .` gives importable packages, the root scripts as modules, and one console command per script.

The install runs offline (--no-deps, --no-build-isolation with the setuptools already here) from a copy of
the tracked files into a --target folder, so the checkout gets no build/ or egg-info."""

import os
import shutil
import subprocess
import sys

import pytest
import toml

from library import __version__
from library.entry_points import SCRIPTS
from tests.helpers import ROOT


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        return toml.load(f)


def test_every_script_has_a_command_and_a_module_entry():
    project = _pyproject()
    commands = project["project"]["scripts"]
    assert sorted(commands) == sorted(f"loratools-{s.replace('_', '-')}" for s in SCRIPTS)
    assert all(target == f"library.entry_points:{s}" for s, target in
               ((t.split(":")[1], t) for t in commands.values()))
    assert sorted(project["tool"]["setuptools"]["py-modules"]) == sorted(SCRIPTS)
    present = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    # every root script (but the tools' own conftest-like files) is packaged
    assert present - set(SCRIPTS) == set(), f"root scripts without a command: {present - set(SCRIPTS)}"


def test_scripts_not_yet_in_this_checkout_are_listed_by_name():
    missing = [s for s in SCRIPTS if not os.path.exists(os.path.join(ROOT, f"{s}.py"))]
    if missing:
        pytest.skip(f"commands whose script is not in this checkout yet: {', '.join(missing)}")


def test_version_flag_on_every_script(capsys):
    import importlib

    from library.cli import parse_args

    for name in SCRIPTS:
        if not os.path.exists(os.path.join(ROOT, f"{name}.py")) or name == "quickstart":
            continue
        module = importlib.import_module(name)
        with pytest.raises(SystemExit) as info:
            parse_args(module.setup_parser(), ["--version"])
        assert info.value.code == 0
        assert capsys.readouterr().out.strip().endswith(f"(loratools) {__version__}"), name


def _git_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the files to package")
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def test_pip_install_target_runs_a_command_offline(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    for rel in _git_files():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), source / rel)
    target = tmp_path / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--target", str(target), str(source)], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = set(os.listdir(target))
    assert {"library", "networks", "merge_lora.py", "lora_info.py"} <= installed
    assert os.path.exists(target / "library" / "formats" / "data" / "sdxl.json")  # data files travel
    command = target / "bin" / "loratools-lora-info"
    assert command.exists()
    # Run the installed command away from the checkout, so only the installed copy can be imported.
    run_env = {**os.environ, "PYTHONPATH": str(target)}
    shown = subprocess.run([sys.executable, str(command), "--version"], capture_output=True, text=True,
                           env=run_env, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"lora_info.py (loratools) {__version__}"
    bad = subprocess.run([sys.executable, str(command), str(tmp_path / "absent.safetensors")],
                         capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr  # run_cli's one-line error
