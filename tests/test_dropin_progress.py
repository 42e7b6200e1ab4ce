"""library.cli.progress: plain periodic lines (no carriage returns) when stderr is a log file or a pipe, a tqdm
bar in a terminal and in a notebook."""

import io
import sys

from library import cli


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_not_a_terminal_gives_plain_lines(monkeypatch):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    items = list(cli.progress(range(5), desc="resize", interval=0))
    assert items == [0, 1, 2, 3, 4]
    text = err.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "resize: 1/5 (20%), 0 s"
    assert lines[-1] == "resize: 5/5 (100%), 0 s (done)"
    assert len(lines) == 5  # one per update below the total (interval 0), then the closing line


def test_update_and_close_as_the_scripts_use_it(monkeypatch):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    bar = cli.progress(range(10), desc="svd merge", total=10)  # default interval: nothing before the end
    for _ in range(10):
        bar.update(1)
    bar.close()
    bar.close()  # idempotent, as tqdm's
    assert err.getvalue() == ""  # shorter than one interval: a log gets no line at all


def test_interval_from_the_environment(monkeypatch):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("LORATOOLS_PROGRESS_INTERVAL", "0")
    list(cli.progress([1, 2, 3], desc="merge"))
    assert err.getvalue().count("\n") == 3


def test_terminal_and_notebook_get_tqdm(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    bar = cli.progress(range(3), desc="merge")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    monkeypatch.setattr(cli, "in_notebook", lambda: True)
    bar = cli.progress(range(3), desc="merge")
    assert isinstance(bar, tqdm)  # tqdm.auto: the notebook widget where ipywidgets is installed
    bar.close()


def test_disabled_prints_nothing(monkeypatch):
    err = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    assert list(cli.progress(range(3), desc="x", enabled=False)) == [0, 1, 2]
    assert err.getvalue() == ""


def test_in_notebook_is_false_in_a_plain_interpreter():
    assert cli.in_notebook() is False
