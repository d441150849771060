"""benchmarks/curves.py: plots run histories, and says clearly what is wrong with bad input."""

from __future__ import annotations

import pytest

from benchmarks import curves

HEADER = "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,images_per_second\n"


def test_draws_several_runs_into_one_png(tmp_path, capsys):
    for name, final in (("a", 0.8), ("b", 0.9)):
        rows = [
            f"{e},1.0,{final - 0.1 / e},1.0,{final - 0.2 / e},{0.1 / e},200\n" for e in (1, 2, 3)
        ]
        (tmp_path / f"{name}.csv").write_text(HEADER + "".join(rows))
    out = tmp_path / "plots" / "curve.png"
    curves.main([str(out), f"first={tmp_path / 'a.csv'}", f"second={tmp_path / 'b.csv'}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    history = curves.read_history(tmp_path / "b.csv")
    assert history["epoch"] == [1, 2, 3] and history["val_accuracy"][-1] == pytest.approx(
        0.9 - 0.2 / 3
    )


@pytest.mark.parametrize(
    "rows",
    [
        # data.val_size 0: the train stage writes nan into the val_* columns,
        HEADER + "1,1.0,0.5,nan,nan,0.1,200\n2,0.9,0.6,nan,nan,0.01,200\n",
        # and wrote no val_* columns before (benchmarks/fast-recipe/ C-H).
        "epoch,loss,accuracy,learning_rate,images_per_second\n1,1.0,0.5,0.1,200\n2,0.9,0.6,0.01,200\n",
    ],
)
def test_a_run_without_validation_draws_its_train_curve(tmp_path, rows):
    (tmp_path / "all.csv").write_text(rows)
    out = tmp_path / "curve.png"
    curves.main([str(out), f"all={tmp_path / 'all.csv'}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = curves.read_history(tmp_path / "all.csv")
    assert "val_accuracy" not in history and history["accuracy"] == [0.5, 0.6]


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="missing columns learning_rate"):
        (tmp_path / "h.csv").write_text("epoch,accuracy\n1,0.5\n")
        curves.read_history(tmp_path / "h.csv")
    with pytest.raises(SystemExit, match="cannot read"):
        curves.read_history(tmp_path / "absent.csv")
    with pytest.raises(SystemExit) as refused:  # argparse: LABEL=path expected
        curves.main([str(tmp_path / "x.png"), "no-label.csv"])
    assert refused.value.code == 2  # argparse's usage error, not read_history's "cannot read"


def test_every_run_gets_its_own_curve_and_rates_of_any_size_show(monkeypatch, tmp_path):
    """zip with tab10's 10 colours dropped an 11th run; on a linear axis Adam's 1e-3 lay
    flat on zero beside SGD's 0.1."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: (figures.append(figure), close(figure)))
    runs = {
        f"run{k}": {"epoch": [1, 2], "accuracy": [0.5, 0.6], "learning_rate": [rate, rate / 10]}
        for k, rate in enumerate([0.1] * 10 + [0.001])
    }
    curves.draw(runs, tmp_path / "curve.png")
    (figure,) = figures
    top, bottom = figure.axes
    assert [line.get_label() for line in bottom.get_lines()] == list(runs)
    assert len({line.get_color() for line in bottom.get_lines()}) == 11  # each its own
    assert bottom.get_yscale() == "log"
