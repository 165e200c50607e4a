import csv

from captioner.training.loggers import ResumableCSVLogger


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resuming_into_the_same_dir_keeps_history_before_the_checkpoint(tmp_path):
    first = ResumableCSVLogger(save_dir=tmp_path, name="", version="")
    for step in range(6):
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.save()
    # The run resumes from a checkpoint at step 4: rows from step 4 on are recomputed, earlier ones kept.
    second = ResumableCSVLogger(save_dir=tmp_path, name="", version="")
    second.truncate_from(4)
    second.log_metrics({"train/loss": 1.5, "val/loss": 2.0}, step=4)
    second.save()
    got = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in got] == [0, 1, 2, 3, 4]
    assert [float(r["train/loss"]) for r in got] == [10.0, 9.0, 8.0, 7.0, 1.5]
    assert got[-1]["val/loss"] == "2.0" and got[0]["val/loss"] == ""
