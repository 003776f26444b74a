"""What train.py and analyze.py share around Hydra: a run folder per launch, every job's config
checked before Hydra creates a folder or anything heavy is imported, and bad input reported on
one line with exit status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback instead)."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import OmegaConf, open_dict, read_write

from sparcom.config import CONF, AnalyzeConfig, TrainConfig, register
from sparcom.config.checks import to_object
from sparcom.config.messages import one_line
from sparcom.errors import ConfigError
from sparcom.train.run_folder import check_resume, check_run_dir, check_writable
from sparcom.train.sft import Launch

STAMP = "SPARCOM_RUN_STAMP"  # the launch's folder name, shared by every rank of a job
SWEPT = "SPARCOM_SWEPT"  # the keys a multirun sweeps, for its jobs' W&B names


def run_stamp() -> str:
    """``<launch time>_<hash>``: one folder name per launch, the same on every rank of a job.

    Ranks started by torchrun, accelerate launch or the deepspeed launcher share one parent, the
    launcher, so its start time and a short hash of (host, boot, launcher pid, launcher start
    ticks) name the run; a single process uses its own. Launches in the same second differ in
    their pid (on one host) or their host, so their folders never collide.
    """
    launcher = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    try:
        with open(f"/proc/{launcher}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as boot:
            booted = next(int(line.split()[1]) for line in boot if line.startswith("btime"))
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            boot = boot_id.read().strip()
        started = booted + ticks / os.sysconf("SC_CLK_TCK")
    except OSError:  # no /proc (macOS): the launcher's identity is this process's start
        started, ticks, boot = time.time(), time.time_ns(), ""
    identity = f"{socket.gethostname()}|{boot}|{launcher}|{ticks}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:6]
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started)) + "_" + digest


def analysis_dir(run: str | None, out: str | None, stamp: str, sweep=None) -> str:
    """Where analyze.py writes: ``out``, else ``<run>/analysis`` (a run's, or a sweep folder's), else
    ``analysis/<launch stamp>``."""
    if out not in (None, "None", "null"):
        return str(out)
    if sweep not in (None, "None", "null") and (isinstance(sweep, str) or len(sweep) == 1):
        run = sweep if isinstance(sweep, str) else sweep[0]
    if run not in (None, "None", "null"):
        return str(Path(run) / "analysis")
    return f"analysis/{stamp}"


def prepare(config_name: str, argv: list[str] | None = None) -> list[str]:
    """Everything an entry point does before ``@hydra.main``: name the launch, register the schemas
    and ``checked_launch``, reporting bad input on one line (exit status 2). Returns the command line
    Hydra runs (``sys.argv`` is updated when ``argv`` is None)."""
    given = sys.argv[1:] if argv is None else list(argv)
    with reported():
        final = checked_launch(config_name, given)
    if argv is None:
        sys.argv[1:] = final
    return final


def checked_launch(config_name: str, argv: list[str]) -> list[str]:
    """Complete a resume's command line with the run's own overrides, and check the config of every
    job (a multirun's too), its data and its folder, so that a bad launch fails before Hydra creates
    a folder or anything heavy is imported. Hydra's informational flags (--help, --cfg, ...) pass
    through. Returns the command line to run."""
    from hydra._internal.utils import get_args_parser

    os.environ.setdefault(STAMP, run_stamp())
    register()
    OmegaConf.register_new_resolver("analysis_dir", analysis_dir, replace=True)
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return argv
    name = args.config_name or config_name
    overrides = list(args.overrides)
    if name == "train":
        overrides = resumed_overrides(overrides, args.multirun)
    jobs = job_overrides(overrides, args.multirun)
    if args.multirun and name == "train":
        warn_if_nothing_retrains(os.environ.get(SWEPT, ""))
    for number, job in enumerate(jobs):
        checked(name, job, number, args.multirun)
    return [a for a in argv if a not in args.overrides] + overrides


def resumed_overrides(overrides: list[str], multirun: bool) -> list[str]:
    """A resume's command line: the run's own overrides (the launch that started it, and every
    extension recorded since), then the ones given now, the folder's Hydra record left as it is.
    ``resume=<checkpoint>`` alone resumes the run that holds the checkpoint."""
    from sparcom.train.run_folder import launch_overrides

    values = {key: value for key, value, _ in _parsed(overrides)}
    resume = values.get("resume")
    if resume in (None, False, "false", "null", "none", "None"):
        return overrides
    if multirun:
        raise ConfigError(
            "resume: given with -m; expected one job at a time: hydra.run.dir=<job folder> resume=true"
        )
    run = values.get("hydra.run.dir")
    if run is None and isinstance(resume, str) and resume not in ("true", "True"):
        run = str(Path(resume).parent)
        overrides = [*overrides, f"hydra.run.dir={run}"]
    if run is None:
        raise ConfigError("resume: true names no run; expected hydra.run.dir=<the run folder> resume=true")
    completed: dict[str, str] = {}
    for key, _, text in _parsed([*launch_overrides(run), *overrides, "hydra.output_subdir=null"]):
        completed.pop(key, None)  # the later value wins, in the later place
        completed[key] = text
    return list(completed.values())


def _parsed(overrides: list[str]) -> list[tuple[str, object, str]]:
    """``(key, value, text)`` of each override, as Hydra parses them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # a syntax error: Hydra's message names the override
        raise ConfigError(" ".join(str(err).split())) from err
    return [(o.key_or_group, o.value(), text) for o, text in zip(parsed, overrides, strict=True)]


# Settings whose every value comes from the same training run: sweeping only these retrains
# identical models. Epsilons and selection are applied to the stored counts after the fact.
NO_RETRAINING = ("sparcom.epsilons", "sparcom.overlap_epsilon", "sparcom.selection_mode", "stats.", "logger.")


def warn_if_nothing_retrains(swept: str) -> None:
    """A multirun over settings that need no retraining trains the same model once per job."""
    keys = [k.lstrip("+~") for k in swept.split(",") if k]
    if keys and all(k.startswith(NO_RETRAINING) for k in keys):
        print(
            f"warning: this sweep varies only {', '.join(keys)}, which need no retraining: every job trains "
            "the same model. One run records counts that serve every epsilon and selection mode: set "
            "sparcom.epsilons=[...] in one run, or use analyze.py on its snapshots.",
            file=sys.stderr,
        )


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Each job's overrides: one job, or every job of a sweep (as Hydra's basic sweeper splits it)."""
    if not multirun:
        return [list(overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # a syntax error: Hydra's message names the override
        raise ConfigError(" ".join(str(err).split())) from err
    os.environ[SWEPT] = ",".join(o.get_key_element() for o in parsed if o.is_sweep_override())
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose(config_name: str, overrides: Sequence[str] = ()) -> TrainConfig | AnalyzeConfig:
    """The typed, checked config that ``python <config_name>.py <overrides>`` runs with (one job)."""
    return _composed(config_name, overrides, with_hydra=False)[0]


def checked(config_name: str, overrides: Sequence[str], number: int = 0, multirun: bool = False):
    """One job's config composed as Hydra will compose it, converted and checked, with its data and
    its output folder (on the main rank: the others start while it writes into the folder). A folder
    that does not exist yet is remembered, so that bad input found later removes it again."""
    from sparcom.config.checks import check_data, check_models_loadable

    typed, hydra = _composed(config_name, overrides, with_hydra=True)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if multirun:
        with read_write(hydra):
            hydra.job.num = number
        folder, key = Path(hydra.sweep.dir) / str(hydra.sweep.subdir), "hydra.sweep.dir"
    else:
        folder, key = Path(str(hydra.run.dir)), "hydra.run.dir" if isinstance(typed, TrainConfig) else "out"
    if main_rank:
        if isinstance(typed, TrainConfig):
            check_run_dir(folder, typed.resume, key)
            if typed.resume:
                check_resume(typed, folder)
        else:
            check_writable(folder, key)
    check_data(typed)
    check_models_loadable(typed)
    if main_rank:
        folder = folder.absolute()
        _new_folders.update(str(p) for p in (folder, *folder.parents) if not p.exists())
    return typed


_new_folders: set[str] = set()  # what this launch creates: removed again if its input proves bad


def discard_new_folder(folder: Path) -> None:
    """Remove ``folder`` and its empty parents if this launch created them (bad input found inside
    a job, after Hydra made the folder): a refused launch leaves nothing behind."""
    import shutil

    folder = Path(folder).absolute()
    if str(folder) not in _new_folders or int(os.environ.get("RANK", "0")) != 0:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if str(parent) not in _new_folders or any(parent.iterdir()):
            break
        parent.rmdir()


def _composed(config_name: str, overrides: Sequence[str], with_hydra: bool):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose(config_name, list(overrides), return_hydra_config=with_hydra)
    except Exception as err:  # Hydra's composition errors span lines; one line, with a suggestion
        raise one_line(err) from err
    if not with_hydra:
        return to_object(cfg), None
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]  # to_object resolves every key, and some of Hydra's resolve only in a job
    return to_object(job), cfg.hydra


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Bad input ends the program with its message on stderr and exit status 2, no traceback."""
    try:
        yield
    except Exception as err:
        if not _bad_input(err) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _bad_input(err: Exception) -> bool:
    from sparcom.data import DataFileError

    kinds: tuple[type, ...] = (ConfigError, DataFileError)
    snapshot = sys.modules.get("sparcom.snapshot")  # loaded whenever a SnapshotError can exist
    if snapshot is not None:
        kinds += (snapshot.SnapshotError,)
    return isinstance(err, kinds)


def exits_on_bad_input(task):
    """``reported()`` around a Hydra task function; a folder this launch created for a job whose input
    proved bad is removed. An interrupted job (Ctrl-C) ends with its message and exit status 130."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        from sparcom.train.run_folder import Interrupted

        try:
            with reported():
                try:
                    return task(*args, **kwargs)
                except Exception as err:
                    if _bad_input(err):
                        discard_new_folder(run_dir())
                    raise
        except Interrupted as stop:
            print(f"interrupted: {stop}", file=sys.stderr)
            sys.exit(130)

    return wrapper


def run_dir() -> Path:
    """The current Hydra job's output folder."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def launch() -> Launch:
    """The current Hydra job's command line, for its W&B record: a sweep is the group, and a
    sweep job is named by its swept overrides (``learning_rate=3e-05``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    overrides = list(hydra.overrides.task)
    choices = {k: str(v) for k, v in hydra.runtime.choices.items() if not k.startswith("hydra") and v}
    if hydra.mode != RunMode.MULTIRUN:
        return Launch(overrides, choices)
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    # The keys a sweep varies: from the command line (basic sweeper), or a sweeper's search space (Optuna).
    searched = list((hydra.sweeper.get("params") or {}).keys()) if "params" in hydra.sweeper else []
    swept = [k for k in [*os.environ.get(SWEPT, "").split(","), *searched] if k in values]
    short = [k.rsplit(".", 1)[-1] for k in swept]
    labels = [s if short.count(s) == 1 else k for s, k in zip(short, swept, strict=True)]
    name = ",".join(f"{label}={values[k]}" for label, k in zip(labels, swept, strict=True))
    return Launch(overrides, choices, group=Path(hydra.sweep.dir).name, name=name or f"job-{hydra.job.num}")
