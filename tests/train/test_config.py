"""``TrainConfig``: flags generated from the dataclasses, recipes resolved before anything fingerprints the config,
explicit flags beating recipe defaults, YAML config files under command-line overrides."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qgdist.cli import build_parser, main
from qgdist.core.config import add_arguments, build, from_args, to_dict
from qgdist.train.checkpointer import Checkpointer, load_checkpoint
from qgdist.train.config import RECIPES, TrainConfig, resolve
from tests.trainkit import write_dataset

TINY = ["--model-arg", "conv_params=[[4, [8, 8]]]", "--model-arg", "fc_params=[[16, 0.1]]"]


def _parse(*argv: str) -> TrainConfig:
    return from_args(TrainConfig, build_parser().parse_args(["train", *argv]))


def test_every_field_is_a_flag_with_help_and_choices():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    actions = {a.dest: a for a in parser._actions}
    assert actions["optim__recipe"].choices == ("paper", "seed")
    assert actions["optim__schedule"].choices == ("onecycle", "step", "constant")
    assert actions["data__preset"].choices == ("kin", "kinpid")
    assert all(a.help for d, a in actions.items() if "__" in d), "every field carries its help text"
    assert "--lr" in actions["optim__lr"].option_strings and "--no-track" in actions["tracking__track"].option_strings


def test_recipe_fills_only_what_the_user_left_unset():
    paper = resolve(_parse("--data", "d", "--model", "particlenet-lite", "--lr", "0.001"))
    assert paper.optim.lr == 0.001                                         # the explicit flag wins ...
    assert paper.optim.optimizer == "adamw" and paper.optim.schedule == "onecycle"  # ... the rest is the recipe's
    seed_cloud = resolve(_parse("--data", "d", "--model", "particlenet-lite", "--recipe", "seed"))
    assert (seed_cloud.optim.optimizer, seed_cloud.optim.lr, seed_cloud.optim.schedule) == ("adam", 1e-3, "step")
    seed_image = resolve(_parse("--data", "d", "--model", "resnet15", "--recipe", "seed", "--momentum", "0.9"))
    assert (seed_image.optim.optimizer, seed_image.optim.momentum) == ("sgd", 0.9)
    assert seed_image.optim.lr == RECIPES["seed"]["image"]["lr"]
    # Resolving is idempotent, and a resolved config is what gets fingerprinted.
    assert resolve(seed_image) == seed_image
    assert seed_image.fingerprint()["optimizer"] == "sgd"
    with pytest.raises(ValueError, match="unresolved"):
        _parse("--data", "d", "--model", "resnet15").fingerprint()


def test_precision_auto_is_resolved_for_the_device_the_run_uses():
    cpu = resolve(_parse("--data", "d", "--model", "resnet15", "--workers", "2"))
    gpu = resolve(_parse("--data", "d", "--model", "resnet15", "--workers", "2", "--gpu"))
    assert cpu.optim.precision == "fp32" and gpu.optim.precision == "bf16"
    assert cpu.fingerprint()["precision"] != gpu.fingerprint()["precision"]


def test_config_file_under_command_line_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("data: shards/ef\nmodel:\n  model: particlenet\noptim:\n  epochs: 7\n  lr: 0.002\nworkers: 4\n")
    cfg = _parse("--config", str(run), "--lr", "0.0005")
    assert cfg.model.model == "particlenet" and cfg.optim.epochs == 7 and cfg.launch.workers == 4
    assert cfg.optim.lr == 0.0005                      # the flag beats the file
    assert cfg.data.data == "shards/ef"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nmodel: resnet15\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown setting 'learning_rate'"):
        _parse("--config", str(bad))


def test_missing_required_setting_is_named():
    with pytest.raises(ValueError, match="--data is required"):
        _parse("--model", "resnet15")


def test_config_round_trips_through_plain_data():
    cfg = resolve(_parse("--data", "d", "--model", "particlenet-lite", *TINY, "--recipe", "seed"))
    assert build(TrainConfig, to_dict(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # frozen: the config that runs is the config that was resolved


def test_explicit_lr_is_what_the_optimiser_uses(tmp_path, capsys):
    """Through the real command: the resolved config is printed once, and the checkpoint's optimiser ran
    with the user's peak learning rate under the paper recipe's one-cycle schedule."""
    data = write_dataset(str(tmp_path / "cloud"), "cloud", {"train": [32, 32], "val": [16]}, seed=3)
    code = main(["train", "--data", data, "--model", "particlenet-lite", *TINY, "--workers", "0", "--epochs", "1",
                 "--batch-size", "8", "--max-steps", "2", "--lr", "0.0007", "--no-track", "--no-progress",
                 "--storage", str(tmp_path / "runs"), "--run-name", "lr"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "training config (resolved):" in printed and "lr: 0.0007" in printed and "optimizer: adamw" in printed
    state = load_checkpoint(Checkpointer(tmp_path / "runs" / "lr").latest())
    group = state.training.optimizer["param_groups"][0]
    assert group["max_lr"] == pytest.approx(0.0007)
    assert state.fingerprint["lr"] == pytest.approx(0.0007) and state.fingerprint["schedule"] == "onecycle"
    assert isinstance(group["lr"], float) and torch.isfinite(torch.tensor(group["lr"]))


def test_bad_setting_is_a_clean_cli_error(capsys):
    assert main(["train", "--model", "resnet15"]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_the_job_config_example_parses():
    """jobs/configs/*.yaml travel with the job's working_dir and are read by the same parser."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "particlenet-lite-gpu.yaml"
    cfg = resolve(_parse("--config", str(example), "--data", "s3://b/shards", "--run-name", "pn1"))
    assert cfg.launch.gpu and cfg.launch.workers == 4 and cfg.data.loader_workers == 6
    assert cfg.optim.precision == "bf16" and cfg.optim.optimizer == "adamw" and cfg.data.data == "s3://b/shards"


def test_workers_min_max_makes_an_elastic_launch():
    from qgdist.train.config import LaunchConfig, TrainConfig, parse_workers

    cfg = TrainConfig.of(data="d", model="particlenet-lite", workers="2-4")
    assert cfg.launch.workers == 4 and cfg.launch.min_workers == 2 and cfg.launch.elastic
    assert [cfg.allows_world_size(w) for w in (1, 2, 4, 5)] == [False, True, True, False]
    fixed = TrainConfig.of(data="d", model="particlenet-lite", workers=3)
    assert not fixed.launch.elastic and [fixed.allows_world_size(w) for w in (2, 3)] == [False, True]
    assert TrainConfig.of(data="d", model="particlenet-lite", workers="3-3").launch.min_workers is None
    assert parse_workers("5") == 5
    with pytest.raises(ValueError, match="MIN-MAX"):
        parse_workers("two")
    with pytest.raises(ValueError, match="1 <= MIN <= MAX"):
        LaunchConfig(workers=(3, 2))


def test_the_schedule_keeps_its_fraction_done_after_a_resize():
    from qgdist.train.elastic import schedule_position

    # 30-step schedule at step 6 (20%); 48 steps now remain: go on at 12 of 60 (still 20%), ending on step 60.
    assert schedule_position(6, 30, 48) == 12
    assert schedule_position(10, 20, 5) == 5                     # grown: fewer steps left, same fraction (50%)
    assert schedule_position(7, 7, 3) == 7                       # a finished schedule is left alone
