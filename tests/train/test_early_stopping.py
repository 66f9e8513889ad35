"""Stop-when criteria (El Azhari's "validation accuracy >= 0.89 and validation loss < 0.3"):
parsing and errors, the config round-trip, and the loop stopping at exactly the first epoch
where every condition holds."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import numpy as np
import pytest
from PIL import Image

from featsim.backbones import registry as registry_module
from featsim.backbones.preprocessing import Preprocessing
from featsim.backbones.registry import register_backbone
from featsim.train import AugmentConfig, StopWhen, TrainConfig, train_and_evaluate
from featsim.train.callbacks import OPERATORS, STOP_METRICS
from featsim.train.datasets import Dataset

PAPER = (("val_accuracy", ">=", 0.89), ("val_loss", "<", 0.3))


class _TinyNet(nn.Module):
    """Conv + global pool + Dense: a backbone cheap enough for many epochs on CPU."""

    num_classes: int | None = 1
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), name="conv")(x))
        feats = {"stem": x, "pre_logits": x.mean(axis=(1, 2))}
        if not self.num_classes:
            return None, feats
        return nn.Dense(self.num_classes, name="head")(feats["pre_logits"]), feats


@pytest.fixture
def tiny_backbone(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register_backbone("stop_test_net", preprocessing=Preprocessing(
        input_size=16, resize_size=16, crop="none", scaling="[0,1]"))(_TinyNet)
    return "stop_test_net"


def _dataset(n, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int32)
    images = rng.integers(0, 150, (n, 16, 16, 3)).astype(np.uint8)
    images[labels == 1] += 90
    return Dataset(images=images, labels=labels, groups=None,
                   ids=tuple(str(i) for i in range(n)), class_names=("a", "b"), source="tiny")


def _config(backbone, **kw):
    defaults = dict(strategy="scratch", epochs=8, batch_size=8, learning_rate=3e-2,
                    normalization="backbone", augment=AugmentConfig(enabled=False),
                    val_fraction=0.25)
    return TrainConfig(backbone, **{**defaults, **kw})


def _run(config, workdir, **kw):
    return train_and_evaluate(config, workdir, train=_dataset(32), test=_dataset(8, seed=1),
                              progress=False, **kw)


def _history(workdir):
    return json.loads((workdir / "history.json").read_text())


# ------------------------------------------------------------------------ the value itself


def test_parse_and_holds():
    rule = StopWhen.parse(" val_accuracy >= 0.89 , val_loss<0.3")
    assert rule.conditions == PAPER and rule == StopWhen(PAPER)
    assert rule.metrics == ("val_accuracy", "val_loss")
    assert rule.holds({"val_accuracy": 0.89, "val_loss": 0.29})  # >= includes equality
    assert not rule.holds({"val_accuracy": 0.8899, "val_loss": 0.1})
    assert not rule.holds({"val_accuracy": 0.95, "val_loss": 0.3})  # < excludes equality
    assert not rule.holds({"val_accuracy": math.nan, "val_loss": 0.1})  # NaN never holds
    assert rule.describe({"val_accuracy": 0.9, "val_loss": 0.25}) == (
        "val_accuracy>=0.89 (0.9), val_loss<0.3 (0.25)")
    assert StopWhen.parse("val_loss<=1e-3").conditions == (("val_loss", "<=", 0.001),)
    assert set(OPERATORS) == {">=", ">", "<=", "<"}
    with pytest.raises(KeyError):
        rule.holds({"val_accuracy": 0.9})


@pytest.mark.parametrize("conditions, match", [
    ((("val_acc", ">=", 0.9),), "unknown stop metric 'val_acc'"),
    ((("test_accuracy", ">=", 0.9),), "test set is never used"),
    ((("accuracy", ">=", 0.9),), "unknown stop metric 'accuracy'"),
    ((("val_accuracy", "=>", 0.9),), "unknown stop operator '=>'"),
    ((("val_accuracy", "==", 0.9),), "unknown stop operator '=='"),
    ((("val_accuracy", ">=", float("nan")),), "finite number"),
    ((("val_accuracy", ">=", "0.9"),), "finite number"),
    ((("val_accuracy", ">="),), "got 2 items"),
    ((), "at least one condition"),
    ("val_loss<0.3", "StopWhen.parse"),
])
def test_invalid_conditions_raise(conditions, match):
    with pytest.raises(ValueError, match=match):
        StopWhen(conditions)


@pytest.mark.parametrize("text, match", [
    ("val_accuracy=0.9", "cannot parse"),
    ("val_accuracy>=high", "not a number"),
    ("val_accuracy>=0.9,", "cannot parse"),
    ("val_acc>=0.9", "unknown stop metric"),
])
def test_invalid_strings_raise(text, match):
    with pytest.raises(ValueError, match=match):
        StopWhen.parse(text)


def test_every_classification_metric_is_allowed():
    assert {"val_loss", "val_accuracy", "val_f1", "val_f1_micro", "val_roc_auc",
            "val_f1_macro"} <= set(STOP_METRICS)
    assert not any(m.startswith(("test_", "train_")) for m in STOP_METRICS)


# ------------------------------------------------------------------------ TrainConfig


@pytest.mark.parametrize("given", [PAPER, "val_accuracy>=0.89,val_loss<0.3", StopWhen(PAPER),
                                   [list(c) for c in PAPER]])
def test_config_normalises_and_round_trips(given):
    config = TrainConfig("resnet18", val_fraction=0.1, stop_when=given)
    assert config.stop_when == PAPER
    restored = TrainConfig.from_dict(json.loads(config.to_json()))
    assert restored == config and restored.stop_when == PAPER
    assert json.loads(config.to_json())["stop_when"] == [list(c) for c in PAPER]
    hash(config)  # still a hashable frozen value


def test_config_defaults_and_errors():
    assert TrainConfig("resnet18").stop_when is None
    assert TrainConfig.from_dict(TrainConfig("resnet18").to_dict()).stop_when is None
    with pytest.raises(ValueError, match="stop_when needs a validation split"):
        TrainConfig("resnet18", stop_when=PAPER)
    with pytest.raises(ValueError, match="unknown stop metric"):
        TrainConfig("resnet18", val_fraction=0.1, stop_when=(("val_acc", ">=", 0.9),))


# ------------------------------------------------------------------------ the loop


def test_stops_at_the_first_epoch_where_all_conditions_hold(tiny_backbone, tmp_path):
    full = _run(_config(tiny_backbone), tmp_path / "full")
    assert full["epochs_run"] == 8 and full["stop_reason"] is None
    losses = [row["val_loss"] for row in _history(tmp_path / "full")]
    assert all("stop_reason" not in row for row in _history(tmp_path / "full"))
    # An epoch 2 <= k < 8 whose val_loss is below every earlier one (a middle one); a
    # threshold between that value and the earlier minimum holds first at epoch k (training
    # is deterministic).
    records = [i + 1 for i in range(1, len(losses) - 1) if losses[i] < min(losses[:i])]
    k = records[len(records) // 2]
    threshold = (losses[k - 1] + min(losses[:k - 1])) / 2
    # Two conditions: the first holds from epoch 1, so only their conjunction waits for k.
    rule = (("val_loss", "<", 1e9), ("val_loss", "<", threshold))
    result = _run(_config(tiny_backbone, stop_when=rule), tmp_path / "stop")
    history = _history(tmp_path / "stop")
    assert result["epochs_run"] == len(history) == k and result["epoch"] == k
    np.testing.assert_allclose([row["val_loss"] for row in history], losses[:k], rtol=1e-6)
    assert history[-1]["stop_reason"].startswith("stop_when val_loss<1e+09")
    assert f"val_loss<{threshold:g}" in history[-1]["stop_reason"]
    assert all("stop_reason" not in row for row in history[:-1])
    metrics = json.loads((tmp_path / "stop" / "metrics.json").read_text())
    assert metrics["stop_reason"] == history[-1]["stop_reason"]
    assert metrics["config"]["stop_when"] == [list(c) for c in rule]
    # The stopping epoch's model (not a best-loss one) is the final model, as Keras' does.
    np.testing.assert_allclose(result["test_loss"], history[-1]["test_loss"], rtol=1e-6)
    # Resuming a stopped run trains no further.
    resumed = _run(_config(tiny_backbone, stop_when=rule), tmp_path / "stop", resume=True)
    assert resumed["epochs_run"] == k


def test_stops_after_epoch_one_and_never_when_never_true(tiny_backbone, tmp_path):
    result = _run(_config(tiny_backbone, epochs=3, stop_when=(("val_loss", "<", 1e9),)),
                  tmp_path / "always")
    assert result["epochs_run"] == 1 and "stop_when" in result["stop_reason"]
    result = _run(_config(tiny_backbone, epochs=3, stop_when=(("val_loss", "<", -1.0),)),
                  tmp_path / "never")
    assert result["epochs_run"] == 3 and result["stop_reason"] is None
    assert all("stop_reason" not in row for row in _history(tmp_path / "never"))


def test_metric_of_another_problem_type_fails_before_training(tiny_backbone, tmp_path):
    config = _config(tiny_backbone, stop_when=(("val_f1_macro", ">=", 0.5),))  # binary data
    with pytest.raises(ValueError, match=r"val_f1_macro.*does not compute"):
        _run(config, tmp_path)
    assert not (tmp_path / "history.json").exists()


def test_patience_stop_is_recorded(tiny_backbone, tmp_path):
    # A large learning rate makes the validation loss move both ways.
    full = _run(_config(tiny_backbone, learning_rate=0.5), tmp_path / "full")
    losses = [row["val_loss"] for row in _history(tmp_path / "full")]
    # Patience 1 stops at the first epoch that does not beat the best so far.
    worse = [i + 1 for i in range(1, len(losses)) if losses[i] >= min(losses[:i])]
    assert full["stop_reason"] is None
    result = _run(_config(tiny_backbone, learning_rate=0.5, early_stopping_patience=1),
                  tmp_path / "patience")
    history = _history(tmp_path / "patience")
    if worse:
        assert result["epochs_run"] == worse[0]
        assert history[-1]["stop_reason"].startswith("early_stopping_patience=1: no val_loss")
        assert result["stop_reason"] == history[-1]["stop_reason"]
    else:
        assert result["epochs_run"] == 8 and result["stop_reason"] is None


def test_cli_stop_when_flag(tiny_backbone, tmp_path, capsys):
    from featsim.cli import main

    data = _dataset(16)
    for split, n in (("train", 16), ("test", 4)):
        for i in range(n):
            folder = tmp_path / "d" / split / data.class_names[data.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i]).save(folder / f"{i:02d}.png")
    rc = main(["train", "--backbone", tiny_backbone, "--data", str(tmp_path / "d"),
               "--strategy", "scratch", "--no-augment", "--epochs", "3", "--batch-size", "4",
               "--val-fraction", "0.25", "--stop-when", "val_loss<1e9,val_accuracy>=0",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    metrics = json.loads((tmp_path / "out" / "seed_0" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1
    assert metrics["config"]["stop_when"] == [["val_loss", "<", 1e9],
                                              ["val_accuracy", ">=", 0.0]]
    assert main(["train", "--backbone", tiny_backbone, "--data", str(tmp_path / "d"),
                 "--strategy", "scratch", "--val-fraction", "0.25", "--stop-when",
                 "val_acc>=0.9", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "unknown stop metric 'val_acc'" in capsys.readouterr().err
