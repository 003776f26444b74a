"""TRL's ``SFTConfig`` fields as plain data: names, simple types, defaults and one-line docs.

The config schema (``sparcom.config``) builds ``trainer.args`` from the checked-in
``sft_fields.json``, so that a config is type-checked without importing TRL (which imports torch
and takes seconds). A test compares the file with the installed TRL; regenerate it with

    python -m sparcom.config.sft_fields
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path

FIELDS_FILE = Path(__file__).with_name("sft_fields.json")
REGENERATE = "python -m sparcom.config.sft_fields"

# Fields the entry point sets from other parts of the config, with where to set them instead.
MANAGED_FIELDS = {
    "output_dir": "hydra.run.dir",
    "report_to": "logger.mode",
    "deepspeed": "deepspeed=none|zero2|zero3",
    "seed": "seed",
    "run_name": "logger.name",
}
_SIMPLE = {bool: "bool", int: "int", float: "float", str: "str"}


def _simple_type(hint) -> tuple[str, list[str] | None]:
    """``(type, choices)``: a type OmegaConf can check (``bool``, ``int|str``, ``list[str]``, ...,
    ``?`` suffix for optional) or ``any``; enum-typed fields become ``str`` with their choices."""
    members = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    optional = type(None) in members
    members = [m for m in members if m is not type(None)]
    choices = None
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums:
        choices = [member.value for member in enums[0]]
        members = [str]
    if all(m in _SIMPLE for m in members):
        name = "|".join(_SIMPLE[m] for m in members)
    elif (
        len(members) == 1 and typing.get_origin(members[0]) is list and typing.get_args(members[0]) == (str,)
    ):
        name = "list[str]"
    else:
        return "any", choices
    return name + ("?" if optional else ""), choices


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def describe_sft_config() -> list[dict]:
    """Every public ``SFTConfig`` field the user may set, from the installed TRL."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    described = []
    for field in dataclasses.fields(SFTConfig):
        if not field.init or field.name.startswith("_") or field.name in MANAGED_FIELDS:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        if isinstance(default, enum.Enum):
            default = default.value
        kind, choices = _simple_type(hints[field.name])
        if not (default is None or isinstance(default, str | int | float | bool | list | dict)):
            kind, default = "any", None
        entry = {"name": field.name, "type": kind, "default": default}
        if choices:
            entry["choices"] = choices
        entry["help"] = _first_sentence(field.metadata.get("help", ""))
        described.append(entry)
    return described


def load_sft_fields() -> list[dict]:
    """The checked-in description (no TRL import)."""
    return json.loads(FIELDS_FILE.read_text(encoding="utf-8"))


def main() -> None:
    FIELDS_FILE.write_text(json.dumps(describe_sft_config(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIELDS_FILE}")


if __name__ == "__main__":
    main()
