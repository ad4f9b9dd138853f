"""nanoddpo/plot.py's command line: a curve per run, and bad input (a run without epochs, a broken metrics line, an
--out PIL cannot write) in one clear line, exit code 1, instead of a traceback.

    python -m pytest -q tests/test_6_plot.py
"""
import json
from pathlib import Path

import pytest
from PIL import Image

PLOT = str(Path(__file__).resolve().parent.parent / "nanoddpo" / "plot.py")


@pytest.fixture
def runs(tmp_path):
    """runs/good with two epochs; runs/empty, whose metrics.jsonl holds none; runs/broken, cut mid-line."""
    good = [json.dumps(dict(epoch=i, samples=8, reward_mean=r)) for i, r in enumerate([0.5, 0.7])]
    for name, text in [("good", "\n".join(good) + "\n"), ("empty", ""), ("broken", good[0] + '\n{"samples": 8, "rew')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
    (tmp_path / "nothing").mkdir()
    return tmp_path


def test_plot_writes_the_curves(runs, command_line):
    status, err = command_line(PLOT, [runs / "good", "--out", runs / "out" / "curves.png"])
    assert status == 0, err
    assert Image.open(runs / "out" / "curves.png").size == (720, 440)


@pytest.mark.parametrize("args, message", [
    (["empty"], "empty/metrics.jsonl holds no epoch: plot the run once it has finished one"),
    (["broken"], "broken/metrics.jsonl line 2 is not an epoch's metrics as train.py writes them"),
    (["nothing"], "no metrics.jsonl in"),
    (["good", "--out", "curves"], "--out curves: must end in .png, .jpg, .jpeg, .webp"),
    (["--tradeoff", "good/metrics.jsonl"], "--tradeoff good/metrics.jsonl: not what `sample.py --reward jpeg"),
    ([], "give run folders, or --tradeoff SCORES"),
])
def test_bad_input_is_one_clear_line(runs, args, message, command_line, monkeypatch):
    monkeypatch.chdir(runs)
    status, err = command_line(PLOT, args)
    assert status == 1 and err.startswith("plot: error: ") and message in err, err
    assert err.strip().count("\n") == 0
