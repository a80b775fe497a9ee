"""rsjax.config: one frozen dataclass gives the flags, the config and the recorded settings."""

import argparse
import dataclasses
from typing import Optional

import pytest

from rsjax import config
from rsjax.config import check, option
from rsjax.errors import RsjaxError


@dataclasses.dataclass(frozen=True)
class Toy:
    toy_search: str = option("grid", "how sigma is searched", choices=("grid", "bisection"))
    toy_left: float = option(0.12, "lower end")
    toy_right: float = option(1.7, "upper end")
    toy_steps: int = option(4, "steps")
    toy_memory: bool = option(False, "memory check")
    toy_sigma0: Optional[float] = option(None, "start (default: SIGMA)")
    toy_exponents: tuple = option((-1, 0, 1), "exponents")

    def __post_init__(self):
        check(self.toy_left > 0, f"--toy-left must be > 0, got {self.toy_left}")
        check(self.toy_left < self.toy_right, f"--toy-left {self.toy_left} must be below --toy-right {self.toy_right}")


@dataclasses.dataclass(frozen=True)
class Other:
    other_n: int = option(10, "draws")


def parser():
    p = argparse.ArgumentParser()
    config.add_arguments(p, Toy, title="toy options")
    config.add_arguments(p, Other)
    return p


def test_flags_from_fields_and_defaults_from_the_dataclass():
    p = parser()
    help_text = p.format_help()
    assert "--toy-search {grid,bisection}" in help_text and "how sigma is searched (default: grid)" in help_text
    assert "--toy-memory, --no-toy-memory" in help_text and "toy options" in help_text
    # a None default is explained by its help, not printed as "None"
    assert "start (default: SIGMA)" in help_text and "None" not in help_text
    cfg = config.from_args(Toy, p.parse_args([]))
    assert cfg == Toy()
    cfg = config.from_args(Toy, p.parse_args(["--toy-left", "0.2", "--toy-steps", "7", "--toy-memory",
                                              "--toy-sigma0", "0.5"]))
    assert (cfg.toy_left, cfg.toy_steps, cfg.toy_memory, cfg.toy_sigma0) == (0.2, 7, True, 0.5)
    assert config.from_args(Toy, p.parse_args(["--toy-sigma0", "none"])).toy_sigma0 is None
    assert config.from_args(Toy, p.parse_args([]), toy_steps=9).toy_steps == 9
    with pytest.raises(SystemExit):
        p.parse_args(["--toy-search", "random"])
    with pytest.raises(SystemExit):
        p.parse_args(["--toy-steps", "x"])


def test_validation_in_post_init_however_the_config_is_made():
    p = parser()
    with pytest.raises(RsjaxError, match="--toy-left must be > 0"):
        config.from_args(Toy, p.parse_args(["--toy-left", "-1"]))
    with pytest.raises(RsjaxError, match="must be below --toy-right"):
        config.from_args(Toy, p.parse_args(["--toy-left", "2", "--toy-right", "0.1"]))
    with pytest.raises(RsjaxError, match="must be > 0"):
        Toy(toy_left=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Toy().toy_left = 1.0


def test_given_flags_name_what_the_user_typed():
    ns = parser().parse_args(["--other-n", "3", "--toy-memory"])
    assert config.given_flags(Other, ns) == ["--other-n"]
    assert config.given_flags(Toy, ns) == ["--toy-memory"]
    assert config.given_flags(Other, parser().parse_args([])) == []


def test_recorded_settings_round_trip():
    cfg = Toy(toy_left=0.3, toy_exponents=(-2, 0))
    d = config.to_dict(cfg)
    assert d["toy_exponents"] == [-2, 0] and d["toy_left"] == 0.3 and list(d)[0] == "toy_search"
    import json

    assert config.from_dict(Toy, json.loads(json.dumps(d))) == cfg
    with pytest.raises(RsjaxError, match="unknown Toy settings: bogus"):
        config.from_dict(Toy, {**d, "bogus": 1})
    with pytest.raises(RsjaxError, match="must be > 0"):
        config.from_dict(Toy, {**d, "toy_left": -1})


def test_mutable_defaults_refused():
    with pytest.raises(TypeError, match="mutable"):
        option([1, 2], "no")
