import csv

from captioner.training.loggers import ResumableCSVLogger


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resuming_into_the_same_dir_keeps_history_before_the_checkpoint(tmp_path, recwarn):
    (tmp_path / "checkpoints").mkdir()  # a run dir is never empty: Lightning's writer warns of deleting it
    first = ResumableCSVLogger(save_dir=tmp_path, name="", version="")
    for step in range(6):
        first.log_metrics({"train/loss": 10.0 - step, **({"early": 1.0} if step < 2 else {})}, step=step)
    first.save()
    # The run resumes from a checkpoint at step 4: rows from step 4 on are recomputed, earlier ones kept.
    second = ResumableCSVLogger(save_dir=tmp_path, name="", version="")
    second.truncate_from(4)
    assert [int(r["step"]) for r in rows(tmp_path / "metrics.csv")] == [0, 1, 2, 3]  # before the fit starts
    second.log_metrics({"train/loss": 1.5, "val/loss": 2.0}, step=4)
    second.save()
    got = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in got] == [0, 1, 2, 3, 4]
    assert [float(r["train/loss"]) for r in got] == [10.0, 9.0, 8.0, 7.0, 1.5]
    assert got[-1]["val/loss"] == "2.0" and got[0]["val/loss"] == ""
    assert [r["early"] for r in got] == [
        "1.0",
        "1.0",
        "",
        "",
        "",
    ]  # a key of the first run only keeps its column
    assert not [w for w in recwarn if "deleted" in str(w.message)]


def test_a_resume_that_logs_nothing_yet_leaves_the_history_as_it_was(tmp_path):
    first = ResumableCSVLogger(save_dir=tmp_path, name="", version="")
    for step in range(3):
        first.log_metrics({"train/loss": 1.0 / (step + 1), "val/loss": 2.0 + step}, step=step)
    first.save()
    before = (tmp_path / "metrics.csv").read_text()
    second = ResumableCSVLogger(save_dir=tmp_path, name="", version="")
    second.log_hyperparams({"seed": 1})  # starts the writer, as a fit does
    second.save()
    assert (tmp_path / "metrics.csv").read_text() == before


def test_one_wandb_run_per_run_dir_across_resumes(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from captioner.training.loggers import RunWandbLogger, wandb_logged_in, wandb_run_id

    first = tmp_path / "first"
    run_id = wandb_run_id(first)
    assert (first / "wandb" / "run_id").read_text().strip() == run_id
    assert wandb_run_id(first) == run_id  # resumed in the same run dir
    ckpt = first / "checkpoints" / "last.ckpt"
    assert wandb_run_id(tmp_path / "second", resume_from=ckpt) == run_id  # ckpt_path= into a new run dir
    assert (tmp_path / "second" / "wandb" / "run_id").read_text().strip() == run_id
    assert wandb_run_id(tmp_path / "third") != run_id  # a fresh run is a new wandb run

    passed = {}
    monkeypatch.setattr(WandbLogger, "__init__", lambda self, **kwargs: passed.update(kwargs))
    RunWandbLogger(save_dir=str(tmp_path / "second"), resume_from=str(ckpt), offline=True, project="p")
    assert (passed["id"], passed["resume"], passed["offline"]) == (run_id, "allow", True)

    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "")
    assert not wandb_logged_in()  # no key anywhere: offline
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_logged_in()  # `wandb login` wrote the key: online
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_logged_in()


def test_best_values_keep_the_lowest_loss_and_highest_scores():
    from captioner.training.loggers import best_values

    summary = {}
    for metrics in (
        {"val/loss": 2.0, "val/cider": 0.5, "train/loss": 9.0},
        {"val/loss": 2.5, "val/cider": 0.7},
    ):
        summary.update(best_values(summary, metrics))
    assert summary == {"best/val/loss": 2.0, "best/val/cider": 0.7}
    assert best_values(summary, {"val/loss": float("nan")}) == {}
