"""`featsim train`'s parser: built from TrainConfig's fields, `--config run.json` with flags
overriding it, and no JAX while the parser is built (the training itself is stubbed)."""

import dataclasses
import json
import subprocess
import sys

import pytest

import featsim.train
from featsim.cli import build_parser, main
from featsim.train.config import (
    CLASS_WEIGHTINGS,
    HEADS,
    IMAGE_DTYPES,
    INITS,
    NORMALIZATIONS,
    SCHEDULES,
    STRATEGIES,
    AugmentConfig,
    TrainConfig,
)


def _train_actions():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["train"]._actions


def test_every_field_has_a_flag_with_the_configs_choices():
    by_dest = {}
    for action in _train_actions():
        by_dest.setdefault(action.dest, []).append(action)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(fields) <= set(by_dest), sorted(set(fields) - set(by_dest))
    choices = {"strategy": STRATEGIES, "schedule": SCHEDULES, "head": HEADS, "init": INITS,
               "class_weighting": CLASS_WEIGHTINGS, "normalization": NORMALIZATIONS,
               "image_dtype": IMAGE_DTYPES}
    for name, want in choices.items():
        assert tuple(by_dest[name][0].choices) == want, name
    flags = {s for a in _train_actions() for s in a.option_strings}
    # the missing ones, and the spellings docs and tests use
    assert {"--init", "--weight-decay", "--warmup-epochs", "--class-weighting", "--config",
            "--lr", "--early-stopping", "--no-augment", "--no-recompute-bn", "--seeds",
            "--target-column", "--head-hidden", "--stop-when"} <= flags


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Runs `featsim train` with run_seeds stubbed; returns (config, seeds) it got."""
    got = {}

    def fake_run_seeds(config, seeds, workdir, **kwargs):
        got.update(config=config, seeds=list(seeds))
        return {"runs": [{"bn_stats": "none"}], "summary": {"test_accuracy": (1.0, 0.0)}}

    monkeypatch.setattr(featsim.train, "run_seeds", fake_run_seeds, raising=False)

    def run(*argv):
        assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                     *argv]) == 0
        return got["config"], got["seeds"]

    return run


def test_flags_set_the_fields_the_cli_had_none_for(captured):
    config, seeds = captured("--backbone", "resnet18", "--strategy", "finetune", "--init",
                             "random", "--weight-decay", "0.01", "--warmup-epochs", "2",
                             "--class-weighting", "none", "--bn-stats-images", "64",
                             "--no-recompute-bn", "--no-augment", "--seeds", "3,4")
    assert config == TrainConfig("resnet18", strategy="finetune", init="random",
                                 weight_decay=0.01, warmup_epochs=2.0, class_weighting="none",
                                 bn_stats_images=64, recompute_bn_stats=False,
                                 augment=AugmentConfig(enabled=False))
    assert seeds == [3, 4]


def test_config_file_with_flags_overriding_it(captured, tmp_path):
    saved = TrainConfig("resnet18", strategy="scratch", epochs=7, learning_rate=3e-4, seed=5,
                        augment=AugmentConfig(hflip_prob=0.25, rotation_degrees=(-5.0, 5.0)),
                        stop_when="val_accuracy>=0.9", val_fraction=0.2)
    path = tmp_path / "config.json"
    path.write_text(saved.to_json() + "\n")  # as a run folder holds it
    config, seeds = captured("--config", str(path))
    assert config == saved and seeds == [5]  # a saved run's config reproduces it
    config, seeds = captured("--config", str(path), "--epochs", "2", "--no-augment",
                             "--seeds", "0")
    assert config == saved.replace(epochs=2, augment=dataclasses.replace(saved.augment,
                                                                         enabled=False))
    assert seeds == [0]


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"backbone": "resnet18", "epochz": 3}))
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*argv, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "unknown TrainConfig fields ['epochz']" in err
    assert main(argv) == 2
    assert "give --backbone NAME, or --config FILE" in capsys.readouterr().err


def test_building_the_parser_imports_no_jax():
    code = ("import sys; import featsim.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('jax', 'numpy', 'scipy', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
