"""Hydra's and OmegaConf's config errors as one ``ConfigError`` line each, naming the key and what
is accepted, with the closest valid key or option when a name is misspelt."""

from __future__ import annotations

import re

from sparcom.errors import ConfigError, closest


def one_line(err: Exception) -> ConfigError:
    """A Hydra composition error or an OmegaConf validation error as one ``ConfigError`` line, with
    the closest valid key or option when a name is misspelt."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    cause = err
    while (
        not isinstance(cause, OmegaConfBaseException | MissingConfigException) and cause.__cause__ is not None
    ):
        cause = cause.__cause__
    if isinstance(cause, MissingConfigException):
        return _missing_option(cause)
    if not isinstance(cause, OmegaConfBaseException):
        text = " ".join(str(err).split())
        ambiguous = re.match(r"Ambiguous value for argument '([^=]*)=(.*?)'", text)
        if ambiguous:
            key, value = ambiguous.groups()
            return ConfigError(
                f"{key}: {value!r} is ambiguous; expected {key}=[{value}] (a list), {key}='{value}' "
                "(a string), or -m to sweep over it"
            )
        return ConfigError(text)
    key = str(cause.full_key or cause.key)
    message = str(cause.msg).splitlines()[0]
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = cause.parent_node
        keys = [k for k in (node.keys() if node is not None else []) if parent or k != "hydra"]
        return unknown_key(key, parent, keys, node)
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(f"{key}: missing; expected a value")
    if isinstance(cause, ValidationError):
        found = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", message)
        if found:
            value, accepted = found.groups()
            return ConfigError(
                f"{key}: {value!r} is unknown{closest(value, accepted.split(', '))}; expected one of {accepted}"
            )
        found = re.search(r"could not be converted to (\w+)|incompatible with type hint '(.*)'", message)
        if found:
            expected = (found.group(1) or found.group(2)).lower()
            return ConfigError(f"{key}: {cause.value!r} is not of the right type; expected {expected}")
    return ConfigError(f"{key}: {message}")


def check_keys(node, prefix: str = "") -> None:
    """Refuse keys the schema does not have. ``+key=value`` adds a key even to a structured config
    and ``OmegaConf.to_object`` then drops it silently, so a misspelt ``+`` override would vanish."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, ListConfig):
        for index in range(len(node)):
            check_keys(node._get_node(index), f"{prefix}[{index}]")
        return
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node:
        path = f"{prefix}.{key}" if prefix else str(key)
        if path == "hydra":  # Hydra's own settings, checked by Hydra
            continue
        if known is not None and key not in known:
            raise unknown_key(path, prefix, known, node)
        check_keys(node._get_node(key), path)


def unknown_key(key: str, parent: str, keys: list[str], node=None) -> ConfigError:
    """``key`` is not in the schema: suggest a close sibling, or the place where a key of that
    name lives (``epsilons`` -> ``sparcom.epsilons``)."""
    from sparcom.config.sft_fields import MANAGED_FIELDS

    name = key.rsplit(".", 1)[-1]
    if parent == "trainer.args" and name in MANAGED_FIELDS:
        return ConfigError(f"{key}: is set by the entry point; expected {MANAGED_FIELDS[name]}")
    hint = closest(name, keys).replace(
        "did you mean ", f"did you mean {parent}." if parent else "did you mean "
    )
    if not hint and node is not None:
        elsewhere = [path for path in _schema_paths(node) if path.rsplit(".", 1)[-1] == name]
        hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else ""
    if parent:
        return ConfigError(
            f"{key}: unknown key{hint}; expected one of the keys of {parent} (`--cfg job` lists them)"
        )
    return ConfigError(f"{key}: unknown key{hint}; expected one of {', '.join(keys)}")


def _schema_paths(node) -> list[str]:
    """Every dotted key of the schema of ``node``'s root config."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    def paths(schema, prefix: str) -> list[str]:
        found = []
        hints = typing.get_type_hints(schema)
        for field in dataclasses.fields(schema):
            path = f"{prefix}{field.name}"
            found.append(path)
            kind = hints[field.name]
            for member in [m for m in typing.get_args(kind) if m is not type(None)] or [kind]:
                if dataclasses.is_dataclass(member):
                    found += paths(member, path + ".")
        return found

    schema = OmegaConf.get_type(node._get_root())
    return paths(schema, "") if dataclasses.is_dataclass(schema) else []


def _missing_option(err) -> ConfigError:
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, option = missing.rpartition("/")
    options = list(getattr(err, "options", None) or [])
    if not group or not options:
        return ConfigError(" ".join(str(err).split("\n")[0].split()))
    return ConfigError(
        f"{group}: {option!r} is not a config option{closest(option, options)}; expected one of {', '.join(options)}"
    )
