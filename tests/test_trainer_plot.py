"""The run plot (BAS then FGC in one PNG), and the one-line messages of missing optional extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer.cli import train
from trainer.plot import PLOT_FILE, run_history

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16",
        "--max-steps", "2", "--no-progress", "--log-level", "WARNING"]
FGC_TINY = ["--phase", "fgc", "--nn-num", "4", "--nn-epoch", "1", "--contrast-blocks", "7,8"]


def ok(*args: str) -> None:
    result = CliRunner().invoke(train, [*TINY, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_an_fgc_run_plots_bas_then_fgc(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    ok("--epochs", "2", "--out-dir", str(tmp_path / "bas"))
    ok(*FGC_TINY, "--epochs", "4", "--init-from", str(tmp_path / "bas" / "checkpoint.pt"),
       "--out-dir", str(tmp_path / "fgc"))
    history = run_history(tmp_path / "fgc")
    assert [(r["epoch"], r["phase"]) for r in history] == [(0, "bas"), (1, "bas"), (2, "fgc"), (3, "fgc")]
    for run in ("bas", "fgc"):
        image = imread(tmp_path / run / PLOT_FILE)  # a PNG that decodes
        assert image.shape[:2] == (550, 700)
    ok("--resume", str(tmp_path / "fgc" / "checkpoint.pt"), "--epochs", "5")
    assert [r["epoch"] for r in run_history(tmp_path / "fgc")] == [0, 1, 2, 3, 4]  # the link survives a resume


def _without(module: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python where ``module`` cannot be imported (as if not installed)."""
    prelude = f"import sys; sys.modules[{module!r}] = None; "
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=300, check=False)


def test_without_matplotlib_the_run_says_so_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _without("matplotlib", "from trainer.cli import main; sys.argv = ['fgc-train', "
                    + ", ".join(repr(a) for a in [*TINY, "--log-level", "INFO", "--epochs", "1", "--out-dir", str(out)])
                    + "]; main()")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "not installed" in line]
    assert len(lines) == 1 and "matplotlib" in lines[0] and "fgc-bank[plot]" in lines[0], done.stderr
    assert (out / "checkpoint.pt").exists() and not (out / PLOT_FILE).exists()


def test_without_scikit_learn_digits_says_which_extra(tmp_path: Path) -> None:
    done = _without("sklearn", "from trainer.cli import main; sys.argv = ['fgc-train', '--dataset', 'digits', "
                    f"'--out-dir', {str(tmp_path / 'o')!r}]; main()")
    assert done.returncode == 2 and "fgc-bank[digits]" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
