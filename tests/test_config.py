"""The config schema: composed in-process as Hydra composes it, converted with ``to_object``,
every bad value refused on one line naming its key, and train.py and analyze.py spelling the
shared settings the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparcom.cli import analysis_dir, compose, run_stamp
from sparcom.config import (
    TINY_PRESET_NAMES,
    AnalyzeConfig,
    SelectionMode,
    SparcomConfig,
    TokenScope,
    TrainConfig,
)
from sparcom.config.checks import check_data, check_probe_fits
from sparcom.config.sft_fields import REGENERATE, describe_sft_config, load_sft_fields
from sparcom.data import load_records
from sparcom.errors import ConfigError
from sparcom.train.run_folder import check_run_dir

ROOT = Path(__file__).resolve().parents[1]


BAD_TRAIN = [
    (
        "sparcom.epsilons=[1.5]",
        r"^sparcom\.epsilons\[0\]: 1\.5 is not a valid epsilon; expected a number in \(0, 1\]",
    ),
    ("sparcom.epsilons=[0.5,0]", r"^sparcom\.epsilons\[1\]: 0 is not a valid epsilon"),
    ("sparcom.epsilons=[]", r"^sparcom\.epsilons: \[\] is empty"),
    ("sparcom.overlap_epsilon=2", r"^sparcom\.overlap_epsilon: 2\.0 is not a valid epsilon"),
    (
        "+trainer.args.learning_rat=1e-4",
        r"^trainer\.args\.learning_rat: unknown key \(did you mean trainer\.args\.learning_rate\?\); expected",
    ),
    (
        "trainer.args.learning_rat=1e-4",
        r"^trainer\.args\.learning_rat: unknown key \(did you mean trainer\.args\.learning_rate\?\)",
    ),
    (
        "trainer.args.learning_rate=abc",
        r"^trainer\.args\.learning_rate: 'abc' is not of the right type; expected float",
    ),
    (
        "trainer.args.lr_scheduler_type=cosin",
        r"^trainer\.args\.lr_scheduler_type: 'cosin' is unknown \(did you mean cosine\?\)",
    ),
    ("trainer.args.seed=1", r"^trainer\.args\.seed: is set by the entry point; expected seed"),
    (
        "trainer.args.save_steps=0",
        r"^trainer\.args\.save_steps: 0\.0 is not allowed; expected a positive integer",
    ),
    ("trainer.args.max_steps=0", r"^trainer\.args\.max_steps: 0 is not allowed"),
    ("model=nope", r"^model: 'nope' is not a config option; expected one of deepseek-v2-lite, "),
    (
        "trainer=ful",
        r"^trainer: 'ful' is not a config option \(did you mean full\?\); expected one of full, isn, lora",
    ),
    (
        "model.name_or_path=tiny-gpt",
        r"^model\.name_or_path: 'tiny-gpt' is not a tiny preset; expected one of tiny-llama",
    ),
    (
        "sparcom.probe.per_categry=3",
        r"^sparcom\.probe\.per_categry: unknown key \(did you mean sparcom\.probe\.per_category\?\)",
    ),
    ("+seeed=3", r"^seeed: unknown key \(did you mean seed\?\); expected one of model, data, trainer"),
    (
        "sparcom.token_scope=everything",
        r"^sparcom\.token_scope: 'everything' is unknown; expected one of prompt, response, all",
    ),
    ("sparcom.selection_mode=top", r"^sparcom\.selection_mode: 'top' is unknown; expected one of threshold"),
    (
        "data.categories=[math,poetry]",
        r"^data\.categories\[1\]: 'poetry' is unknown; expected one of classification",
    ),
    ("data.path=/nope.jsonl", r"^data\.path: '/nope\.jsonl' does not exist; expected a JSONL file"),
    (
        "sparcom.record.every_steps=-2",
        r"^sparcom\.record\.every_steps: -2 is not allowed; expected a positive integer or null",
    ),
    (
        "deepspeed.config=/nope/ds.json",
        r"^deepspeed\.config: '/nope/ds\.json' does not exist; expected a DeepSpeed JSON",
    ),
    ("logger.mode=loud", r"^logger\.mode: 'loud' is unknown; expected one of online, offline, disabled"),
    ("resume=/nope", r"^resume: '/nope' is not a checkpoint folder"),
    ("stats.resamples=0", r"^stats\.resamples: 0 is not allowed; expected a positive integer"),
]


@pytest.mark.parametrize(("override", "message"), BAD_TRAIN)
def test_bad_train_value_is_refused_on_one_line_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        compose("train", [override])
    assert "\n" not in str(caught.value)


def test_bad_lora_rank_is_refused():
    with pytest.raises(
        ConfigError, match=r"^trainer\.peft\.r: -1 is not allowed; expected a positive integer$"
    ):
        compose("train", ["trainer=lora", "trainer.peft.r=-1"])


BAD_ANALYZE = [
    (
        ["pairs=[{name: a, base: x}]"],
        r"^pairs\[0\]\.tuned: null; expected a snapshot file, .* to compare with pairs\[0\]\.base",
    ),
    (["pairs=[{name: a}]"], r"^pairs\[0\]\.base: missing; expected a value"),
    (
        ["pairs=[{name: a, base: x, tuned: y}, {name: a, base: x, tuned: z}]"],
        r"^pairs\[1\]\.name: 'a' is used twice",
    ),
    (
        ["mode=ablate", "base=x.safetensors"],
        r"^base: 'x\.safetensors' is a snapshot, and mode=ablate needs a model; expected a run folder",
    ),
    (
        ["run=/nonexistent"],
        r"^run: '/nonexistent' is not a train\.py run folder; expected a folder holding snapshots/",
    ),
    (["base=x.safetensors", "tuned=y"], r"^base: 'x\.safetensors' does not exist; expected a snapshot file"),
    (["base=x"], r"^tuned: null; expected"),
    ([], r"^base: null; expected run=<run folder>, or base=<\.\.\.> and tuned=<\.\.\.>"),
    (
        ["mode=steer", "base=x.safetensors"],
        r"^base: 'x\.safetensors' is a snapshot, and mode=steer needs a model",
    ),
    (["mode=steer", "base=tiny-llama", "steer.scales=[]"], r"^steer.scales: \[\] is empty; expected factors"),
    (
        ["mode=ablate", "base=tiny-llama", "stats.control_draws=1"],
        r"^stats.control_draws: 1 is too few; expected at least 2",
    ),
    (
        ["mode=explain", "base=x", "tuned=y"],
        r"^tuned: given with mode=explain; expected run=<run folder> or base=",
    ),
    (
        ["mode=explain", "base=x.safetensors"],
        r"^base: 'x\.safetensors' is a snapshot, and mode=explain needs a model",
    ),
    (
        ["mode=explain", "base=tiny-llama", "explain.neuron=mlp"],
        r"^explain\.neuron: 'mlp' is not a neuron; expected <site>:<i>, or <site>:<expert>,<i>",
    ),
    (["mode=explain", "base=tiny-llama", "explain.top=0"], r"^explain\.top: 0 is not allowed"),
    (["device_map=gpu", "base=x", "tuned=y"], r"^device_map: 'gpu' is unknown; expected one of \['auto'"),
    (
        ["+max_memory={cpu: 2GiB}", "base=x", "tuned=y"],
        r"^max_memory: \{'cpu': '2GiB'\} needs device_map=auto",
    ),
    (
        ["device_map=auto", "+max_memory={cpu: lots}", "base=x", "tuned=y"],
        r"^max_memory\.cpu: 'lots' is not a size; expected e\.g\. 20GiB",
    ),
    (
        ["device_map=auto", "+max_memory={gpu0: 2GiB}", "base=x", "tuned=y"],
        r"^max_memory: device 'gpu0' is unknown",
    ),
    (["mode=summarise"], r"^mode: 'summarise' is unknown; expected one of compare, ablate, steer, explain"),
    (["sparcom.epsilons=[2]", "base=x", "tuned=y"], r"^sparcom\.epsilons\[0\]: 2 is not a valid epsilon"),
    (["sweep_epsilons=[0.5,1.2]", "base=x", "tuned=y"], r"^sweep_epsilons\[1\]: 1\.2 is not a valid epsilon"),
    (
        ["epsilons=[0.5]"],
        r"^epsilons: unknown key \(did you mean sparcom\.epsilons\?\); expected one of mode, run, sweep, base",
    ),
    (["probe.per_category=4"], r"^probe: unknown key \(did you mean sparcom\.probe\?\)"),
    (["base=tiny-lama", "tuned=y"], r"^base: 'tiny-lama' is not a tiny preset \(did you mean tiny-llama\?\)"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_ANALYZE)
def test_bad_analyze_value_is_refused_on_one_line_naming_its_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        compose("analyze", overrides)
    assert "\n" not in str(caught.value)


def test_a_single_epsilon_is_a_one_element_list():
    assert compose("train", ["sparcom.epsilons=0.5"]).sparcom.epsilons == [0.5]
    assert compose("analyze", ["sparcom.epsilons=0.5", "base=a", "tuned=b"]).sparcom.epsilons == [0.5]


def test_train_and_analyze_spell_the_shared_settings_the_same_way():
    shared = [
        "sparcom.epsilons=[0.2,0.4]",
        "sparcom.selection_mode=percentile_layer",
        "sparcom.token_scope=all",
        "sparcom.overlap_epsilon=0.4",
        "sparcom.probe.per_category=7",
        "sparcom.probe.seed=3",
        "sparcom.probe.batch_size=5",
        "sparcom.probe.per_instruction=false",
        "stats.resamples=50",
    ]
    train = compose("train", shared)
    analyze = compose("analyze", [*shared, "base=a", "tuned=b"])
    as_shared = SparcomConfig(**{k: getattr(train.sparcom, k) for k in SparcomConfig.__dataclass_fields__})
    assert as_shared == analyze.sparcom and train.stats == analyze.stats
    assert analyze.sparcom.probe.per_category == 7 and analyze.sparcom.selection_mode == "percentile_layer"
    # The defaults differ where the uses differ: a training probe is small, an analysis probes all.
    assert compose("train", []).sparcom.probe.per_category == 20
    assert compose("analyze", ["base=a", "tuned=b"]).sparcom.probe.per_category == 200


def test_every_config_group_option_composes_and_passes_its_checks():
    options = [f"model={p.stem}" for p in sorted((ROOT / "conf" / "model").glob("*.yaml"))]
    options += [
        "trainer=lora",
        "deepspeed=zero2",
        "deepspeed=zero3",
        "logger=online",
        "logger=disabled",
        *[
            f"experiment={p.stem}"
            for p in sorted((ROOT / "conf" / "experiment").glob("*.yaml"))
            if p.stem != "paper"
        ],
    ]
    for option in options:
        cfg = compose("train", [option])
        assert isinstance(cfg, TrainConfig), option
        check_data(cfg)  # its split and probe fit HexaInst
    lora = compose("train", ["trainer=lora"])
    assert lora.trainer.peft.r == 16 and lora.trainer.args.learning_rate == 5e-4
    assert compose("train", ["deepspeed=zero3"]).deepspeed.config["zero_optimization"]["stage"] == 3
    smoke = compose("train", ["experiment=smoke"])
    assert smoke.trainer.args.max_steps == 6 and smoke.sparcom.probe.per_category == 4
    assert smoke.trainer.args.max_length == smoke.data.max_length == 512  # the interpolation resolved
    paper = compose("analyze", ["experiment=paper"])
    assert isinstance(paper, AnalyzeConfig) and [p.name for p in paper.pairs] == [
        "qwen1.5-moe-a2.7b",
        "qwen2.5-7b",
    ]
    assert paper.sparcom.probe.batch_size == 8


def test_trainer_args_hold_every_field_of_the_installed_sft_config(tmp_path):
    """The checked-in description is what the installed TRL's SFTConfig says, so trainer.args
    refuses exactly the names SFTConfig refuses."""
    assert load_sft_fields() == describe_sft_config(), (
        f"TRL's SFTConfig changed: regenerate with `{REGENERATE}`"
    )
    from trl import SFTConfig

    args = compose("train", ["trainer.args.weight_decay=0.01"]).trainer.args
    # TRL accepts every value as it comes out of the schema
    SFTConfig(**{**vars(args), "use_cpu": True, "bf16": False}, output_dir=str(tmp_path))


def test_choices_named_without_torch_match_the_library():
    from sparcom.models.loading import TINY_PRESETS
    from sparcom.recording.conversation import TOKEN_SCOPES
    from sparcom.stats.select import SELECTION_MODES

    assert tuple(TokenScope) == TOKEN_SCOPES
    assert tuple(SelectionMode) == SELECTION_MODES
    assert set(TINY_PRESET_NAMES) == set(TINY_PRESETS)
    from sparcom.config import PACKAGED_PRESET_NAMES
    from sparcom.models.packaged import PACKAGED

    assert set(PACKAGED_PRESET_NAMES) == set(PACKAGED)


def test_checking_a_config_imports_neither_torch_nor_trl():
    code = (
        "import sys; from sparcom.cli import checked, prepare; prepare('train', ['sparcom.epsilons=0.5']); "
        "heavy = {'torch', 'trl', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_a_folder_holding_a_run_is_reused_only_to_resume_it(tmp_path):
    check_run_dir(tmp_path / "new", None)
    check_run_dir(tmp_path, None)  # an empty folder (hydra.run.dir=<fresh tmp dir>) is fine
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(
        ConfigError,
        match=r"^hydra\.run\.dir: '.*' already holds a run; expected a new folder, or resume=true",
    ):
        check_run_dir(tmp_path, None)
    with pytest.raises(ConfigError, match=r"^resume: true, but .* holds no complete checkpoint-\* folder"):
        check_run_dir(tmp_path, True)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    check_run_dir(tmp_path, True)


def test_probe_larger_than_the_data_is_refused():
    with pytest.raises(
        ConfigError,
        match="sparcom.probe.per_category: 201 is more than the 200 classification records",
    ):
        check_probe_fits(load_records(), 201)


def test_ranks_of_one_launch_share_a_stamp_and_launches_do_not(tmp_path):
    """Children of one launcher (LOCAL_RANK set, as torchrun sets it) share the launcher's stamp;
    launchers started together, in the same second, get different ones."""
    child = "from sparcom.cli import run_stamp; print(run_stamp())"
    launcher = (
        "import os, subprocess, sys\n"
        f"env = {{**os.environ, 'LOCAL_RANK': '0'}}\n"
        f"ranks = [subprocess.Popen([sys.executable, '-c', {child!r}], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]\n"
        "print(' '.join(p.communicate()[0].strip() for p in ranks))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    launches = [
        subprocess.Popen(
            [sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        for _ in range(3)
    ]
    stamps = [p.communicate(timeout=60)[0].split() for p in launches]
    assert all(len(set(ranks)) == 1 for ranks in stamps), stamps
    assert len({ranks[0] for ranks in stamps}) == 3, stamps
    assert run_stamp() == run_stamp()


def test_analysis_folder():
    assert analysis_dir("outputs/r", None, "s") == "outputs/r/analysis"
    assert analysis_dir(None, "x", "s") == "x" and analysis_dir(None, None, "s") == "analysis/s"


def test_run_config_is_plain_yaml_and_json(tmp_path):
    """The typed config holds only plain values: the W&B config and config.yaml carry no objects."""
    cfg = compose("train", ["trainer=lora", "model=tiny-qwen2-moe"])
    from sparcom.train.sft import wandb_settings

    settings = wandb_settings(cfg, tmp_path / "run")
    assert json.loads(json.dumps(settings)) == settings
    assert settings["config"]["sparcom"]["token_scope"] == "prompt"
    assert settings["tags"] == ["tiny-qwen2-moe", "lora"] and settings["name"] == "run"
