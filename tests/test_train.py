"""train.py end to end: real TRL SFT, real W&B offline run files, real DeepSpeed ZeRO-3 on CPU.
Runs are started in-process with ``train(cfg, run_dir)``; subprocesses only where processes are
the point (several ranks, a sweep, launches in the same second)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import sparcom
from sparcom.cli import compose
from sparcom.data import CATEGORIES, load_records
from sparcom.demo import what_changed
from sparcom.models.loading import load_model
from sparcom.snapshot import Snapshot, snapshot_series
from sparcom.train.drift import DriftPoint, drift_point, read_drift
from sparcom.train.sft import Launch
from train import train

from helpers.models import torchrun
from helpers.wandb_log import artifacts, config, history, run, run_file, summary

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "sparcom.epsilons=[0.3,0.5]"]


def launch(tmp_path: Path, *overrides: str, processes: int = 1) -> subprocess.Popen:
    """train.py in its own process (or torchrun's), in ``tmp_path``, as a user starts it."""
    launcher = torchrun(processes) if processes > 1 else [sys.executable]
    env = {**os.environ, "WANDB_MODE": "", "PYTHONUNBUFFERED": "1"}
    env.pop("SPARCOM_RUN_STAMP", None)
    return subprocess.Popen(
        [*launcher, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen, timeout: int = 600) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-2000:] + err[-4000:]
    return out


def drift_rows(run_dir: Path) -> list[DriftPoint]:
    return read_drift(run_dir / "snapshots" / "drift.jsonl")


@pytest.mark.slow
def test_sft_run_logs_drift_next_to_the_loss_and_the_whole_config(tmp_path):
    overrides = [*SMOKE, "sparcom.token_scope=all", "trainer.args.learning_rate=2e-4"]
    result = train(
        compose("train", overrides),
        tmp_path / "run",
        Launch(overrides, {"model": "tiny-qwen2-moe", "trainer": "full"}),
    )
    run_dir = result.run_dir
    wandb_file = run_file(run_dir / "wandb")
    settings = config(wandb_file)
    # Every sparcom setting, the model preset, the learning rate and the command line: filterable in W&B.
    assert settings["sparcom"]["epsilons"] == [0.3, 0.5] and settings["sparcom"]["token_scope"] == "all"
    assert settings["sparcom"]["probe"]["per_category"] == 4 and settings["sparcom"]["overlap_epsilon"] == 0.5
    assert settings["trainer"]["args"]["learning_rate"] == 2e-4
    # One truthful copy: none of the flat TrainingArguments and model-config keys transformers would add
    # beside it (among them project "huggingface" and a run_name that contradict the real ones).
    assert not {"learning_rate", "project", "run_name", "output_dir", "vocab_size"} & set(settings)
    assert settings["model/num_parameters"] > 0
    assert (
        settings["model"]["name_or_path"] == "tiny-qwen2-moe"
        and settings["choices"]["model"] == "tiny-qwen2-moe"
    )
    assert (
        settings["overrides"] == overrides and settings["seed"] == 0 and settings["deepspeed_stage"] is None
    )
    assert settings["data"]["path"] is None and settings["stats"]["resamples"] == 200
    record = run(wandb_file)
    assert record.project == "sparcom" and record.display_name == "run"
    assert list(record.tags) == ["tiny-qwen2-moe", "full"]

    rows = history(wandb_file)
    losses = {r["train/global_step"] for r in rows if "train/loss" in r}
    assert losses == {1, 2, 3, 4, 5, 6}
    drift = {r["train/global_step"]: r for r in rows if "sparcom/isn_jaccard/base/eps=0.5/math" in r}
    assert set(drift) == {0, 3, 6}  # step 0 and both checkpoints, on the loss's step axis
    # What a sweeper ranks the run by: the objective train() returns, and the W&B summary (the lowest
    # held-out loss reached, the drift where it ended).
    points = read_drift(run_dir / "snapshots" / "drift.jsonl")
    mean_loss = [sum(p.held_out_loss.values()) / len(p.held_out_loss) for p in points]
    assert result.step == 6 and result.objective("eval/loss/mean") == pytest.approx(mean_loss[-1])
    summarised = summary(wandb_file)
    assert summarised["eval/loss/mean"] == pytest.approx(min(mean_loss))
    assert summarised["sparcom/isn_jaccard/base/mean"] == pytest.approx(
        drift[6]["sparcom/isn_jaccard/base/mean"]
    )
    # Snapshots and checkpoints as reference artifacts (their files' paths, sizes and checksums, nothing
    # uploaded); every later snapshot names the base it was compared with.
    logged = artifacts(wandb_file)
    run_id = run(wandb_file).run_id
    snapshots = [a for a in logged if a["type"] == "sparcom-snapshot"]
    assert [a["metadata"]["step"] for a in snapshots] == [0, 3, 6]
    assert {a["name"] for a in snapshots} == {f"snapshots-{run_id}"}
    assert "base" in snapshots[0]["aliases"] and "step-6" in snapshots[2]["aliases"]
    for artifact, path in zip(snapshots, snapshot_series(run_dir / "snapshots").values(), strict=True):
        ((reference, digest, size),) = artifact["entries"].values()
        assert reference == path.resolve().as_uri() and size == path.stat().st_size
        assert digest == base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()
        assert artifact["metadata"]["compared_with"] == f"snapshots-{run_id}:step-0"
    checkpoints = [a for a in logged if a["type"] == "model"]
    assert [a["metadata"]["step"] for a in checkpoints] == [3, 6]
    assert any(
        ref.endswith("checkpoint-6/model.safetensors") for ref, _, _ in checkpoints[1]["entries"].values()
    )
    for step, row in drift.items():
        for category in CATEGORIES:
            for epsilon in ("0.3", "0.5"):
                assert f"sparcom/isn_jaccard/base/eps={epsilon}/{category}" in row
            assert f"sparcom/ise_pearson/base/{category}" in row
        if step:
            assert f"sparcom/isn_jaccard/prev/eps=0.5/{category}" in row
    assert all(drift[0][f"sparcom/isn_jaccard/base/eps=0.5/{c}"] == 1.0 for c in CATEGORIES)
    for row in drift.values():  # the overlap epsilon's numbers again, under keys every sweep shares
        for category in (*CATEGORIES, "mean"):
            assert (
                row[f"sparcom/isn_jaccard/base/{category}"]
                == row[f"sparcom/isn_jaccard/base/eps=0.5/{category}"]
            )
            assert row[f"eval/loss/{category}"] > 0  # the held-out loss beside the drift
    assert any(drift[6][f"sparcom/isn_jaccard/base/eps=0.5/{c}"] < 1.0 for c in CATEGORIES)  # it moved
    # The snapshots on disk reload to exactly what was logged.
    series = snapshot_series(run_dir / "snapshots")
    assert (
        sorted(series) == [0, 3, 6]
        and (run_dir / "checkpoint-3").is_dir()
        and (run_dir / "checkpoint-6").is_dir()
    )
    snapshots = {step: Snapshot.load(path) for step, path in series.items()}
    for step, previous in ((3, 0), (6, 3)):
        point = drift_point(step, snapshots[0], snapshots[step], snapshots[previous], epsilons=[0.3, 0.5])
        for key, value in point.wandb_metrics().items():
            assert drift[step][key] == pytest.approx(value, abs=1e-12), key
        for category in CATEGORIES:  # the chance level of a Jaccard lies below what it measures here
            assert 0 < drift[step][f"sparcom/isn_jaccard_chance/base/eps=0.5/{category}"] < 1
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["sparcom"]["token_scope"] == "all" and written["trainer"]["args"]["learning_rate"] == 2e-4
    # make demo's closing table: each category's loss, its drift, and that drift's chance level.
    table = what_changed(run_dir).splitlines()
    math_row = next(line for line in table if line.split()[0] == "math").split()
    assert float(math_row[1]) == pytest.approx(points[0].held_out_loss["math"], abs=5e-4)
    assert float(math_row[4]) == pytest.approx(drift[6]["sparcom/isn_jaccard/base/eps=0.5/math"], abs=5e-4)
    assert float(math_row[5]) == pytest.approx(
        drift[6]["sparcom/isn_jaccard_chance/base/eps=0.5/math"], abs=5e-4
    )


@pytest.mark.slow
def test_resumed_run_continues_the_drift_series(tmp_path):
    run_dir = tmp_path / "run"
    train(compose("train", [*SMOKE, "logger=disabled", "trainer.args.max_steps=3"]), run_dir)
    base_file = snapshot_series(run_dir / "snapshots")[0]
    base_bytes = base_file.read_bytes()
    train(compose("train", [*SMOKE, "logger=disabled", "trainer.args.max_steps=6", "resume=true"]), run_dir)
    assert [point.step for point in drift_rows(run_dir)] == [0, 3, 6]
    assert base_file.read_bytes() == base_bytes  # the base came from disk, not from resumed weights
    series = snapshot_series(run_dir / "snapshots")
    last = drift_rows(run_dir)[-1]
    logged = last.wandb_metrics()
    loaded = {step: Snapshot.load(path) for step, path in series.items()}
    assert last.headline_epsilon == 0.5 and set(last.held_out_loss) == set(
        CATEGORIES
    )  # measured after resuming
    point = drift_point(6, loaded[0], loaded[6], loaded[3], epsilons=[0.3, 0.5], headline_epsilon=0.5)
    expected = dataclasses.replace(point, held_out_loss=last.held_out_loss).wandb_metrics()
    assert set(logged) == set(expected)  # base and prev, every epsilon and category
    assert all(logged[k] == pytest.approx(v, abs=1e-12) for k, v in expected.items())


@pytest.mark.slow
def test_zero3_two_ranks_record_what_one_process_records(tmp_path):
    run_dir = tmp_path / "run"
    finished(
        launch(
            tmp_path, *SMOKE, f"hydra.run.dir={run_dir}", "deepspeed=zero3", "logger=disabled", processes=2
        )
    )
    series = snapshot_series(run_dir / "snapshots")
    assert sorted(series) == [0, 3, 6]
    model, tokenizer = load_model(str(run_dir / "checkpoint-6"))
    distributed = Snapshot.load(series[6])
    by_id = {r["id"]: r for r in load_records()}
    probe = [by_id[i] for i in distributed.instruction_ids]  # the run's probe, drawn from its held-out split
    torch.set_num_threads(1)  # as each torchrun rank ran
    single = sparcom.record(model, tokenizer, probe, progress=False)
    assert distributed.tokens == single.tokens
    for site in single.category_counts:
        assert torch.equal(
            distributed.instruction_counts[site].long(), single.instruction_counts[site].long()
        ), site


@pytest.mark.slow
def test_sweep_jobs_are_named_by_their_swept_values_in_one_group(tmp_path):
    finished(
        launch(tmp_path, "-m", *SMOKE, "trainer.args.max_steps=3", "trainer.args.learning_rate=1e-4,3e-4")
    )
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1
    records = [run(run_file(sweeps[0] / job / "wandb")) for job in ("0", "1")]
    assert {r.run_group for r in records} == {sweeps[0].name}
    assert sorted(r.display_name for r in records) == ["learning_rate=0.0001", "learning_rate=0.0003"]
    for job, rate in (("0", 1e-4), ("1", 3e-4)):
        assert config(run_file(sweeps[0] / job / "wandb"))["trainer"]["args"]["learning_rate"] == rate
        assert snapshot_series(sweeps[0] / job / "snapshots")


@pytest.mark.slow
def test_launches_in_the_same_second_write_separate_folders(tmp_path):
    """Two train.py processes started together (a job array, a shell loop) never share a folder."""
    while time.time() % 1 > 0.2:  # start early in a second, so both start within it
        time.sleep(0.01)
    common = ["experiment=smoke", "logger=disabled", "trainer.args.max_steps=3"]
    processes = [launch(tmp_path, *common, f"trainer.args.learning_rate={rate}") for rate in (1e-4, 3e-4)]
    for process in processes:
        finished(process)
    folders = sorted((tmp_path / "outputs").iterdir())
    assert len(folders) == 2
    assert len({folder.name.rsplit("_", 1)[0] for folder in folders}) == 1, folders  # the same second
    rates = set()
    for folder in folders:
        rates.add(yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["args"]["learning_rate"])
        assert sorted(snapshot_series(folder / "snapshots")) == [0, 3]
        assert (folder / "checkpoint-3" / "trainer_state.json").is_file()
        assert (folder / "snapshots" / "drift.jsonl").read_text().count("\n") == 2
    assert rates == {1e-4, 3e-4}


@pytest.mark.slow
def test_lora_run_records_the_adapted_model(tmp_path):
    run_dir = train(compose("train", [*SMOKE, "trainer=lora", "logger=disabled"]), tmp_path / "run").run_dir
    points = drift_rows(run_dir)
    assert [point.step for point in points] == [0, 3, 6]
    assert (
        points[-1].wandb_metrics()["sparcom/isn_jaccard/base/eps=0.5/mean"] < 1.0
    )  # the adapters moved the ISNs
    assert (run_dir / "checkpoint-6" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_isn_only_run_trains_the_base_models_isns_and_nothing_else(tmp_path):
    from safetensors.torch import load_file

    from helpers.isn_masks import assert_only_isns_moved, entries_of

    run_dir = train(
        compose("train", [*SMOKE, "trainer=isn", "trainer.isn.epsilon=0.7"]), tmp_path / "run"
    ).run_dir
    mask = load_file(run_dir / "isn_mask.safetensors")
    base_snapshot = Snapshot.load(snapshot_series(run_dir / "snapshots")[0])
    expected = sparcom.train.isn_training.select_isns(base_snapshot, 0.7)  # the step-0 recording's ISNs
    assert set(mask) == set(expected) and all(torch.equal(mask[s], expected[s]) for s in mask)
    base, _ = load_model("tiny-qwen2-moe")
    tuned, _ = load_model(str(run_dir / "checkpoint-6"))
    # Byte for byte outside the mask, every ISN entry moved: in the checkpoint analyze.py loads.
    assert_only_isns_moved(base.state_dict(), tuned.state_dict(), mask)
    trained = entries_of(mask, base.state_dict())
    settings = config(run_file(run_dir / "wandb"))
    assert settings["isn"]["trainable_parameters"] == sum(int(m.sum()) for m in trained.values())
    assert settings["isn"]["neurons"] == sum(int(m.sum()) for m in mask.values())


@pytest.mark.slow
def test_isn_training_against_its_matched_random_control(tmp_path):
    """trainer.isn.control=random trains random neurons with exactly the ISN set's counts in every
    site and every expert: the mask differs, the counts do not, and everything outside the mask stays
    byte-identical to the base; the mask file, W&B and the report's header say which kind it is."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from helpers.isn_masks import assert_only_isns_moved

    run_dir = train(
        compose("train", [*SMOKE, "trainer=isn", "trainer.isn.control=random", "trainer.isn.control_seed=3"]),
        tmp_path / "control",
    ).run_dir
    mask = load_file(run_dir / "isn_mask.safetensors")
    isns = sparcom.train.isn_training.select_isns(
        Snapshot.load(snapshot_series(run_dir / "snapshots")[0]), 0.5
    )
    assert set(mask) == set(isns)
    for site, chosen in mask.items():
        per_unit = (lambda m: m.sum(-1)) if chosen.dim() > 1 else (lambda m: m.sum())
        assert torch.equal(per_unit(chosen), per_unit(isns[site])), site  # the same count per site and expert
    assert any(not torch.equal(mask[s], isns[s]) for s in mask)  # other neurons
    base, _ = load_model("tiny-qwen2-moe")
    tuned, _ = load_model(str(run_dir / "checkpoint-6"))
    assert_only_isns_moved(base.state_dict(), tuned.state_dict(), mask)
    with safe_open(str(run_dir / "isn_mask.safetensors"), "pt") as handle:
        settings = json.loads(handle.metadata()["settings"])
    assert settings["control"] == "random" and settings["control_seed"] == 3
    assert config(run_file(run_dir / "wandb"))["isn"]["trains"] == "random neurons matched to the ISNs"
    from sparcom.report.workflows import read_run

    assert "control: random neurons matched to the ISNs, seed 3" in read_run(run_dir).settings["trainer"]
