"""Settings from files and the command line, checked before any work starts: JSON files, `--set key=value`
overrides (dotted keys reach into groups), typed dataclass configs that refuse unknown keys (naming the
closest known one) and values of the wrong type, and the shipped run and DeepSpeed configs by name.

A value given on the command line is JSON when it parses as JSON (`lr=1e-4`, `adam_betas=[0.9,0.98]`,
`emd=false`), else a string (`mode=pipeline`). JSON's NaN and Infinity (and 1e999) parse as numbers that are
not finite: a setting refuses them, naming the key (a NaN learning rate passes every `< 0` check and trains NaN).
"""
import dataclasses
import difflib
import json
import math
import os
import typing

from pipeline.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = {"run": ("configs", "pretrain_{}.json"), "deepspeed": ("ds_configs", "{}.json")}


# ---------------------------------------------------------------- files
def read_json(path, what):
    """A JSON object from a file, a ConfigError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the {what} must be a JSON object, got {type(values).__name__}")
    return values


def shipped_dir(kind):
    """Where the shipped configs of `kind` ("run" or "deepspeed") are: pipeline/shipped/ of an installed package
    (first: beside an installed package, ROOT is site-packages, where another distribution's configs/ may
    be), else configs/ and ds_configs/ of a checkout (or an editable install)."""
    folder = SHIPPED[kind][0]
    for candidate in (os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped", folder), os.path.join(ROOT, folder)):
        if os.path.isdir(candidate):
            return candidate
    return os.path.join(ROOT, folder)


def shipped_names(kind):
    folder, pattern = SHIPPED[kind]
    prefix, suffix = pattern.split("{}")
    directory = shipped_dir(kind)
    names = [n[len(prefix):len(n) - len(suffix)] for n in os.listdir(directory)
             if n.startswith(prefix) and n.endswith(suffix)] if os.path.isdir(directory) else []
    return sorted(names)


def config_file(name_or_path, kind):
    """A config file given by path, or by the name of a shipped one (run configs: `xxlarge` is
    configs/pretrain_xxlarge.json; DeepSpeed configs: `zero3_bf16` is ds_configs/zero3_bf16.json)."""
    if os.path.exists(name_or_path) or os.sep in name_or_path or name_or_path.endswith(".json"):
        return name_or_path
    path = os.path.join(shipped_dir(kind), SHIPPED[kind][1].format(name_or_path))
    if os.path.exists(path):
        return path
    what = "run config" if kind == "run" else "DeepSpeed config"
    raise ConfigError(f"{name_or_path}: no such {what} file, and not the name of a shipped one "
                      f"({', '.join(shipped_names(kind))}){closest(name_or_path, shipped_names(kind))}")


# ---------------------------------------------------------------- --set KEY=VALUE
def parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item, option="--set"):
    """(key, value) of KEY=VALUE."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
    return key.strip(), parse_value(text)


def set_dotted(values, key, value, option="--set"):
    *parents, leaf = key.split(".")
    node = values
    for parent in parents:
        node = node.setdefault(parent, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{option} {key}: {parent!r} is not a group of settings")
    node[leaf] = value


def apply_overrides(values, items, option="--set"):
    for item in items:
        key, value = parse_override(item, option)
        set_dotted(values, key, value, option)
    return values


def check_finite(values, where, path=""):
    """Refuse a number that is not finite anywhere in a JSON tree, naming its dotted key after `where`."""
    if isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"{where} {path!r} is {json.dumps(values)}: expected a finite number")
    if isinstance(values, dict):
        for key, value in values.items():
            check_finite(value, where, f"{path}.{key}" if path else key)
    elif isinstance(values, list):
        for index, value in enumerate(values):
            check_finite(value, where, f"{path}[{index}]")


def closest(name, choices):
    """' (did you mean 'x'?)' for the closest of choices, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ---------------------------------------------------------------- typed values
def _describe(kind):
    origin = typing.get_origin(kind)
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    if kind is dict or origin is dict:
        return "a JSON object"
    if origin in (list, tuple) or kind in (list, tuple):
        return "a JSON list"
    return getattr(kind, "__name__", str(kind))


def coerce(value, kind, where):
    """`value` as the annotated type `kind`, or a ConfigError naming `where`: an int is not a bool and not 1.5,
    a float may be an int but not NaN or infinite, a tuple is given as a list, Optional[X] accepts null."""
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, options[0], where)
    ok = True
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {json.dumps(value)}")
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is dict or origin is dict:
        ok = isinstance(value, dict)
    elif kind in (list, tuple) or origin in (list, tuple):
        ok = isinstance(value, (list, tuple))
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        if ok and args:
            value = [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        if ok:
            value = tuple(value) if (kind is tuple or origin is tuple) else list(value)
    if not ok:
        raise ConfigError(f"{where}: expected {_describe(kind)}, got {json.dumps(value)}")
    return value


def build_dataclass(cls, values, where, ignore=("comment",)):
    """cls(**values) with every key known (else refused, naming the closest known key) and every value of its
    field's type. `where` names the source in messages: a file, or "--set". Keys starting with "_" are notes."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    given = {k: v for k, v in values.items() if k not in ignore and not k.startswith("_")}  # "_source": notes
    for key in given:
        if key not in names:
            raise ConfigError(f"{where}: unknown setting {key!r}{closest(key, names)}")
    typed = {key: coerce(value, hints[key], f"{where}: {key}") for key, value in given.items()}
    return cls(**typed)
