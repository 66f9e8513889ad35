"""RunDir: the one owner of a run folder's layout (the file names below are the on-disk
contract that existing run folders keep)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from featsim.rundir import RunDir, model_metadata
from featsim.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_writers_keep_the_on_disk_layout(tmp_path):
    run = RunDir(tmp_path / "a" / "seed_0").create()
    config = TrainConfig("resnet18", strategy="finetune", seed=3)
    run.write_config(config)
    rows = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25,
                                               "stop_reason": "done"}]
    run.write_history(rows)
    run.write_metrics({"test_accuracy": 0.75, "test_roc_auc": math.nan})
    run.write_record({"label": "finetune", "data": {"train": {"spec": "x:train"}}})
    names = sorted(p.name for p in run.path.iterdir())
    assert names == ["analysis_run.json", "config.json", "history.csv", "history.json",
                     "metrics.json"]
    assert TrainConfig.from_dict(json.loads((run.path / "config.json").read_text())) == config
    assert json.loads((run.path / "history.json").read_text()) == rows
    assert (run.path / "history.csv").read_text().splitlines()[0] == (
        "epoch,train_loss,stop_reason")
    # metrics.json keeps its NaN token (undefined AUC), as the trainer always wrote it
    assert "NaN" in (run.path / "metrics.json").read_text()
    assert math.isnan(run.read_metrics()["test_roc_auc"])
    assert run.read_config()["seed"] == 3
    assert run.read_record()["label"] == "finetune"
    assert not list(run.path.glob("*.tmp"))


def test_history_falls_back_to_the_csv_copy_with_numbers_parsed(tmp_path):
    source = RunDir(tmp_path / "full").create()
    source.write_config(TrainConfig("resnet18"))
    source.write_metrics({"test_accuracy": 0.5})
    source.write_history([{"epoch": 1, "train_loss": 0.5, "val_loss": 0.75},
                          {"epoch": 2, "train_loss": 0.125}])
    copy = source.copy_records(tmp_path / "copy")
    assert sorted(p.name for p in copy.path.iterdir()) == [
        "config.json", "history.csv", "metrics.json"]
    history = copy.read_history()
    assert history[0] == {"epoch": 1, "train_loss": 0.5, "val_loss": 0.75}
    assert isinstance(history[0]["epoch"], int)
    assert history[1]["train_loss"] == 0.125 and math.isnan(history[1]["val_loss"])
    with pytest.raises(FileNotFoundError, match=r"no history\.json or history\.csv in .*empty"):
        RunDir(tmp_path / "empty").read_history()
    with pytest.raises(FileNotFoundError, match=r"no metrics\.json in .*empty"):
        RunDir(tmp_path / "empty").read_metrics()
    assert RunDir(tmp_path / "empty").read_record() == {}


def test_find_lists_finished_runs_and_histories(tmp_path):
    for seed, finished in ((1, True), (0, True), (2, False)):
        run = RunDir(tmp_path / "root" / "g" / f"seed_{seed}").create()
        run.model_file.write_bytes(b"x")
        if finished:
            run.write_metrics({"test_accuracy": 1.0})
    RunDir(tmp_path / "root" / "curves").create().write_history([{"epoch": 1}])
    assert [r.path.name for r in RunDir.find(tmp_path / "root")] == ["seed_0", "seed_1"]
    assert [r.path.name for r in RunDir.find(tmp_path / "root", finished=False)] == [
        "seed_0", "seed_1", "seed_2"]
    assert [r.path.name for r in RunDir.find_histories(tmp_path / "root")] == ["curves"]
    assert RunDir.find(tmp_path / "missing") == [] and RunDir.find(None) == []
    assert RunDir(tmp_path / "root" / "g" / "seed_2").has_model
    assert not RunDir(tmp_path / "root" / "g" / "seed_2").is_finished


def test_training_source_prefers_the_analysis_record(tmp_path):
    run = RunDir(tmp_path).create()
    assert run.training_source() is None
    run.write_metrics({"config": {"train": "from_metrics:train"}})
    assert run.training_source() == "from_metrics:train"
    run.write_record({"data": {"train": {"spec": "from_record:train"}}})
    assert run.training_source() == "from_record:train"


def test_checkpoint_round_trip(tmp_path):
    run = RunDir(tmp_path).create()
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(4)}
    history = [{"epoch": 1, "train_loss": 0.5}]
    run.save_checkpoint(state, 1, history, {"epoch": 1, "val_loss": 0.5})
    template = {"w": np.zeros((2, 3), np.float32), "step": np.int32(0)}
    restored, epoch, got_history, best = run.load_checkpoint(template)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert (epoch, got_history, best) == (1, history, {"epoch": 1, "val_loss": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.msgpack"]


def test_model_round_trip_and_metadata_written_once(tmp_path):
    import jax

    from featsim.backbones import get_backbone

    config = TrainConfig("mobilenet_v1_025", strategy="finetune")
    built = get_backbone(config.backbone, num_classes=2)
    variables = jax.tree.map(np.asarray, built.init(jax.random.key(0)))
    run = RunDir(tmp_path).create()
    run.save_model(variables, model_metadata(config, 2, bn_stats="frozen"))
    _, metadata = run.load_variables(with_metadata=True)
    assert metadata["backbone"] == "mobilenet_v1_025" and metadata["num_classes"] == "2"
    assert metadata["strategy"] == "finetune" and metadata["batch_stats"] == "frozen"
    assert TrainConfig.from_dict(json.loads(metadata["config"])) == config
    model = run.load_model(backbone="mobilenet_v1_025")
    assert model.weights_file == run.model_file
    np.testing.assert_array_equal(
        jax.tree.leaves(model.variables)[0], jax.tree.leaves(variables)[0])
    with pytest.raises(ValueError, match="holds a fine-tuned 'mobilenet_v1_025'"):
        run.load_model(backbone="resnet18")
    with pytest.raises(FileNotFoundError, match=r"no best_model\.msgpack in"):
        run.load_variables(best=True)


_LITERAL = re.compile(r"""["'](model|best_model|checkpoint|autoencoder)\.msgpack["']|"""
                      r"""["'](metrics|config|history|summary|analysis_run)\.json["']|"""
                      r"""["']history\.csv["']""")


def test_only_rundir_names_the_run_files():
    """Every writer and reader goes through RunDir: no other module (nor a notebook's code)
    spells a run file's name as a string literal."""
    offenders = []
    files = [*(ROOT / "featsim").rglob("*.py"), *(ROOT / "analysis").glob("*.py")]
    for path in files:
        if path.name == "rundir.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _LITERAL.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code" and _LITERAL.search("".join(cell["source"])):
                offenders.append(f"{path.relative_to(ROOT)}: a code cell names a run file")
    assert not offenders, "\n".join(offenders)
