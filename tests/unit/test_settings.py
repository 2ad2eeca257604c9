"""Settings from files and the command line (pipeline/settings.py): typed values, unknown keys with the closest
known one, KEY=VALUE parsing, and the shipped configs found by name."""
import json
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import apply_overrides, build_dataclass, coerce, config_file, parse_override, read_json


@dataclass
class Example:
    steps: int = 1
    lr: float = 0.1
    name: str = "x"
    on: bool = False
    betas: Tuple[float, ...] = (0.9, 0.99)
    extra: dict = field(default_factory=dict)
    peak: Optional[float] = None


def test_values_must_have_their_fields_type():
    assert build_dataclass(Example, {"steps": 3, "lr": 1, "betas": [0.8, 0.9], "peak": None}, "f.json") == \
        Example(steps=3, lr=1.0, betas=(0.8, 0.9))
    for values, message in (({"steps": 1.5}, "f.json: steps: expected an integer, got 1.5"),
                            ({"steps": "abc"}, 'f.json: steps: expected an integer, got "abc"'),
                            ({"steps": True}, "f.json: steps: expected an integer, got true"),
                            ({"lr": "abc"}, 'f.json: lr: expected a number, got "abc"'),
                            ({"on": 1}, "f.json: on: expected true or false, got 1"),
                            ({"betas": 0.9}, "f.json: betas: expected a JSON list, got 0.9"),
                            ({"betas": [0.9, "a"]}, 'f.json: betas[1]: expected a number, got "a"'),
                            ({"extra": []}, "f.json: extra: expected a JSON object, got []"),
                            ({"peak": "x"}, 'f.json: peak: expected a number, got "x"')):
        with pytest.raises(ConfigError) as error:
            build_dataclass(Example, values, "f.json")
        assert str(error.value) == message


def test_an_unknown_key_names_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"f.json: unknown setting 'stpes' \(did you mean 'steps'\?\)"):
        build_dataclass(Example, {"stpes": 3}, "f.json")
    with pytest.raises(ConfigError, match=r"unknown setting 'zzz'$"):
        build_dataclass(Example, {"zzz": 3}, "f.json")
    assert build_dataclass(Example, {"comment": "a note"}, "f.json") == Example()


def test_key_value_items_are_json_or_strings_and_dotted_keys_reach_into_groups():
    assert parse_override("lr=1e-4") == ("lr", 1e-4)
    assert parse_override("mode=pipeline") == ("mode", "pipeline")
    assert parse_override("betas=[0.9,0.98]") == ("betas", [0.9, 0.98])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2", "d=true"]) == {"a": {"b": 1, "c": 2}, "d": True}
    with pytest.raises(ConfigError, match="--set 'lr': expected KEY=VALUE"):
        parse_override("lr")
    with pytest.raises(ConfigError, match="--set a.b: 'a' is not a group of settings"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_files_that_are_no_json_object_are_named(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ConfigError, match="list.json: the run config must be a JSON object, got list"):
        read_json(str(tmp_path / "list.json"), "run config")
    for name in ("bad.json", "latin1.json"):
        with pytest.raises(ConfigError, match=f"{name}: not valid JSON"):
            read_json(str(tmp_path / name), "run config")
    with pytest.raises(ConfigError, match="missing.json: run config not found"):
        read_json(str(tmp_path / "missing.json"), "run config")


def test_shipped_configs_are_found_by_name_and_paths_stay_paths(tmp_path):
    assert config_file("xxlarge", "run").endswith("configs/pretrain_xxlarge.json")
    assert config_file("zero3_bf16", "deepspeed").endswith("ds_configs/zero3_bf16.json")
    assert json.load(open(config_file("tiny_cpu", "run")))["model"] == "tiny"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert config_file(str(own), "run") == str(own)
    with pytest.raises(ConfigError, match=r"zero3_bf17: no such DeepSpeed config file, and not the name of a shipped "
                       r"one \(.*zero3_bf16.*\) \(did you mean 'zero3_bf16'\?\)"):
        config_file("zero3_bf17", "deepspeed")


def test_coerce_accepts_null_for_optional_only():
    assert coerce(None, Optional[int], "x") is None
    with pytest.raises(ConfigError, match="x: expected an integer, got null"):
        coerce(None, int, "x")
