"""nanoddpo/plot.py: a curve per run, each in its colour; the tradeoff plot's points where their paired scores put them;
and bad input on the command line (a run without epochs, a broken metrics line, an --out PIL cannot write) in one clear
line, exit code 1, instead of a traceback.

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


def test_plot_draws_one_curve_per_run(tmp_path):
    from nanoddpo.plot import COLOURS, plot, read_curve
    for name, curve in (("a", [1.0, 2.0, 3.0]), ("b", [3.0, 2.0, 1.0])):
        (tmp_path / name).mkdir()
        lines = [json.dumps(dict(epoch=i, samples=64, reward_mean=r)) for i, r in enumerate(curve)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert read_curve(tmp_path / "a") == ([64, 128, 192], [1.0, 2.0, 3.0])
    img = plot({n: read_curve(tmp_path / n) for n in "ab"})
    colours = {c for _, c in img.getcolors(1 << 20)}
    for hexcode in COLOURS[:2]:
        assert tuple(int(hexcode[i : i + 2], 16) for i in (1, 3, 5)) in colours


def test_tradeoff_puts_each_checkpoint_at_its_paired_gain_and_loss(tmp_path, command_line):
    from nanoddpo.plot import COLOURS
    scores = {"jpeg": {"base": [-1.2, -1.3], "runs/a/checkpoints/step_1": [-1.1, -1.2], "runs/b/checkpoints/step_1": [-1.2, -1.3]},
              "tinyworld": {"base": [1.0, 1.0], "runs/a/checkpoints/step_1": [1.0, 1.0], "runs/b/checkpoints/step_1": [0.5, 0.5]}}
    (tmp_path / "scores.json").write_text(json.dumps(dict(scores=scores)))
    status, err = command_line(PLOT, ["--tradeoff", tmp_path / "scores.json", "--out", tmp_path / "t.png"])
    assert status == 0, err
    img = Image.open(tmp_path / "t.png")
    rgb = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in COLOURS[:2]]
    # a gained 0.1 kB and lost nothing: bottom right; b gained nothing and lost 0.5: top left. The plot area is
    # x 70..540, y 30..395 px, with 10% margins around the data range x 0..0.1, y 0..0.5.
    assert img.getpixel((501, 365)) == rgb[0]
    assert img.getpixel((109, 60)) == rgb[1]


def test_tradeoff_points_are_paired_means_with_their_standard_errors(tmp_path):
    import statistics

    from nanoddpo.plot import read_tradeoff
    base_jpeg, jpeg = [-1.30, -1.20, -1.25, -1.40], [-1.22, -1.19, -1.15, -1.31]
    base_world, world = [1.0, 2 / 3, 1.0, 1 / 3], [2 / 3, 2 / 3, 1.0, 0.0]
    scores = {"jpeg": {"base": base_jpeg, "runs/a/checkpoints/step_5": jpeg},
              "tinyworld": {"base": base_world, "runs/a/checkpoints/step_5": world}}
    (tmp_path / "scores.json").write_text(json.dumps(dict(scores=scores)))
    gain = [c - b for b, c in zip(base_jpeg, jpeg)]  # smaller files: the jpeg reward is -kB
    lost = [b - c for b, c in zip(base_world, world)]
    se = lambda d: statistics.stdev(d) / len(d) ** 0.5  # noqa: E731  the sample SD (n - 1) over sqrt(n)
    expected = (statistics.mean(gain), statistics.mean(lost), se(gain), se(lost))
    assert list(read_tradeoff(tmp_path / "scores.json")) == ["a"]
    assert read_tradeoff(tmp_path / "scores.json")["a"] == pytest.approx(expected, rel=1e-12)
