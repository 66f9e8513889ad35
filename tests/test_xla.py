"""featsim's XLA:CPU defaults: appended once, never over a user's choice, opt-out works."""

import importlib.metadata
import os

from featsim import _xla


def test_appends_flag(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("FEATSIM_XLA_DEFAULTS", raising=False)
    assert _xla.apply_cpu_defaults() == [
        "--xla_cpu_experimental_ynn_fusion_type=dot,reduce",
        "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=2 "
        "--xla_cpu_experimental_ynn_fusion_type=dot,reduce "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false")
    assert not _xla.apply_cpu_defaults()  # already chosen: left alone


def test_respects_user_choice_opt_out_and_other_jaxlib(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert _xla.apply_cpu_defaults() == [  # only the flag the user did not set
        "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true "
                       "--xla_cpu_experimental_ynn_fusion_type=")
    assert not _xla.apply_cpu_defaults()
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("FEATSIM_XLA_DEFAULTS", "0")
    assert not _xla.apply_cpu_defaults()
    monkeypatch.delenv("FEATSIM_XLA_DEFAULTS")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
    assert not _xla.apply_cpu_defaults()
