import csv

from convforge.builder.training.monitor import overfitting, plot_curves, write_metrics_csv


def _h(train, val):
    return [
        {"epoch": i + 1, "train_loss": t, "val_loss": v, "train_acc": 0.5, "val_acc": 0.5}
        for i, (t, v) in enumerate(zip(train, val, strict=True))
    ]


def test_overfitting_needs_k_epochs_of_diverging_losses():
    assert overfitting(_h([1.0, 0.8, 0.6, 0.4], [1.0, 1.1, 1.2, 1.3]), window=3)
    assert not overfitting(_h([1.0, 0.8, 0.6, 0.4], [1.0, 1.1, 1.05, 1.3]), window=3)
    assert not overfitting(_h([1.0, 0.8, 0.9, 0.4], [1.0, 1.1, 1.2, 1.3]), window=3)
    assert not overfitting(_h([1.0, 0.8], [1.0, 1.1]), window=3)  # too few epochs yet


def test_metrics_csv_and_curves(tmp_path):
    history = _h([1.0, 0.5], [1.2, 0.9])
    write_metrics_csv(tmp_path / "m.csv", history)
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["val_loss"] == "0.9"
    assert rows[0]["ema_val_acc"] == ""
    plot_curves(tmp_path / "c.png", history, "title")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
