"""Typed config: defaults, TOML files, dotted overrides, one-line errors, and a lossless round trip."""

import math
from pathlib import Path

import pytest

from diffusekit.config import (
    Config,
    config_from_dict,
    config_to_dict,
    format_config,
    load_config,
    parse_override,
    save_config,
)
from diffusekit.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def _error(path=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_load_and_are_the_dataclass_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.data.name, cfg.model.kind, cfg.diffusion.T, cfg.train.lr) == ("digits", "unet", 1000, 2e-3)
    assert cfg.model.channel_mult == [1, 2] and cfg.model.attn_resolutions == [4]


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('# a comment\n[train]\nlr = 1e-3\nsteps = 10\n[diffusion]\nschedule = "cosine"\n'
                    '[model]\nchannel_mult = [1, 2, 2]\n')
    cfg = load_config(path, ["train.lr=2e-4", "model.dropout=0", "sample.clip_x0=true", "loss.weighting=min_snr",
                             'data.name="moons"', "data.path=2024", "model.attn_resolutions=[]"])
    assert cfg.train.lr == 2e-4 and cfg.train.steps == 10 and cfg.diffusion.schedule == "cosine"
    assert cfg.model.channel_mult == [1, 2, 2] and cfg.model.attn_resolutions == []
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)  # ints widen to float
    assert cfg.sample.clip_x0 == 1.0 and cfg.loss.weighting == "min_snr" and cfg.data.name == "moons"
    assert cfg.data.path == "2024"  # a bare value for a string key stays the text given
    assert cfg.train.batch_size == 128  # untouched keys keep their defaults


def test_parse_override_values():
    assert parse_override("train.lr=2e-4") == ("train", "lr", 2e-4)
    assert parse_override("model.channel_mult = [1,2]") == ("model", "channel_mult", [1, 2])
    assert parse_override("diffusion.schedule=cosine") == ("diffusion", "schedule", "cosine")
    assert parse_override('diffusion.schedule="cosine"') == ("diffusion", "schedule", "cosine")
    assert parse_override("data.path=a=b") == ("data", "path", "a=b")


def test_unknown_keys_and_sections_suggest_the_closest(tmp_path):
    assert "train.lrr" in (m := _error(None, ["train.lrr=1"])) and "train.lr" in m.split("did you mean")[1]
    assert "did you mean model.channel_mult" in _error(None, ["model.channel_mul=[1]"])
    assert "did you mean train.lr" in _error(None, ["lr=1"])
    path = tmp_path / "c.toml"
    path.write_text("[trian]\nlr = 1\n")
    assert (m := _error(path)).startswith(str(path)) and "[trian]" in m and "did you mean train" in m
    path.write_text("[train]\nema = 0.9\n")
    assert "train.ema" in (m := _error(path)) and "train.ema_decay" in m
    path.write_text("steps = 5\n")
    assert "did you mean train.steps" in _error(path)


def test_wrong_types_name_key_expected_type_and_value():
    m = _error(None, ["train.lr=abc"])
    assert "train.lr" in m and "number" in m and "'abc'" in m
    assert "integer" in _error(None, ["train.steps=1.5"])
    assert "integer" in _error(None, ["train.steps=true"])  # bools are not ints
    assert "number" in _error(None, ["train.lr=true"])
    assert "list of int" in _error(None, ["model.channel_mult=[1.0, 2]"])
    assert "true or false" in _error(None, ["diffusion.learned_schedule=1"])


def test_literal_choices():
    m = _error(None, ["diffusion.schedule=cosin"])
    assert "diffusion.schedule" in m and "'cosine'" in m and "'cosin'" in m
    assert "model.prediction" in _error(None, ["model.prediction=noise"])
    assert "data.name" in (m := _error(None, ["data.name=mooons"])) and "moons" in m


@pytest.mark.parametrize("override,key", [
    ("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"), ("model.dropout=nan", "model.dropout"),
    ("diffusion.beta_end=-inf", "diffusion.beta_end"), ("train.time_limit_s=inf", "train.time_limit_s"),
])
def test_non_finite_floats_are_rejected_naming_the_key(override, key):
    m = _error(None, [override])
    assert m.startswith(key) and "finite" in m


@pytest.mark.parametrize("override,key", [
    ("train.steps=0", "train.steps"), ("train.batch_size=0", "train.batch_size"), ("diffusion.T=0", "diffusion.T"),
    ("train.lr=0", "train.lr"), ("train.lr=-1e-3", "train.lr"), ("train.ema_decay=1", "train.ema_decay"),
    ("train.ema_decay=-0.1", "train.ema_decay"), ("model.dropout=1.0", "model.dropout"),
    ("train.grad_accum=0", "train.grad_accum"), ("diffusion.beta_start=0", "diffusion.beta_start"),
    ("diffusion.beta_end=1e-5", "diffusion.beta_end"), ("diffusion.beta_end=1", "diffusion.beta_end"),
    ("sample.eta=1.5", "sample.eta"), ("sample.steps=-1", "sample.steps"), ("sample.steps=1001", "sample.steps"),
    ("model.channel_mult=[]", "model.channel_mult"), ("model.channel_mult=[1,0]", "model.channel_mult"),
    ("data.channels=2", "data.channels"), ("data.seed=-1", "data.seed"), ("train.log_every=0", "train.log_every"),
    ("sample.guidance=-1", "sample.guidance"), ("sample.guidance=nan", "sample.guidance"),
    ("sample.guidance=2", "sample.guidance"),  # guidance needs model.num_classes > 0
])
def test_range_checks(override, key):
    assert _error(None, [override]).startswith(key)


def test_ranges_are_checked_after_all_overrides():
    cfg = load_config(None, ["sample.steps=50", "diffusion.T=50"])
    assert cfg.sample.steps == cfg.diffusion.T == 50


def test_bad_override_syntax():
    assert "section.key=value" in _error(None, ["train.lr"])
    assert "section.key" in _error(None, ["a.b.c=1"])


def test_bad_files_name_the_file_and_line(tmp_path):
    assert "not found" in _error(tmp_path / "missing.toml")
    path = tmp_path / "broken.toml"
    path.write_text("[train]\nlr = 1e-3\nsteps = \n")
    m = _error(path)
    assert m.startswith(str(path)) and "line 3" in m
    path.write_bytes(b"[train]\nlr = 1e-3 # \xff\xfe\n")
    assert _error(path).startswith(str(path))
    assert _error(tmp_path).startswith(str(tmp_path))
    path.write_text("[train]\nsteps = 1.5\n")
    assert (m := _error(path)).startswith(str(path)) and "train.steps" in m
    path.write_text("train = 3\n")
    assert "[train]" in _error(path)


def test_round_trip_save_load(tmp_path):
    cfg = load_config(None, ["train.lr=3.3e-4", "model.channel_mult=[1,2,3]", "model.attn_resolutions=[]",
                             'data.path="we\\"ird \\\\ path ü"', "sample.clip_x0=true", "diffusion.beta_start=1e-5",
                             "train.ema_decay=0.9999", "loss.min_snr_gamma=5", "data.name=folder"])
    path = save_config(cfg, tmp_path / "sub" / "config.toml")
    again = load_config(path)
    assert again == cfg and again.data.path == 'we"ird \\ path ü'
    assert format_config(cfg) == path.read_text(encoding="utf-8")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    d = config_to_dict(cfg)
    assert isinstance(d["train"]["lr"], float) and math.isclose(d["train"]["lr"], 3.3e-4)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    cfg = load_config(path)
    assert load_config(save_config(cfg, tmp_path / path.name)) == cfg
    text = path.read_text()
    assert text.startswith("#") and f"diffusekit train --config configs/{path.name}" in text


def test_all_shipped_configs_are_present():
    assert {p.name for p in CONFIGS} >= {"digits.toml", "mnist.toml", "moons.toml", "gmm.toml"}


def test_clip_x0_is_a_value_and_reads_the_older_boolean_form(tmp_path):
    """sample.clip_x0 = C clips to [-C, C]; configs and checkpoint records written when it was a boolean
    still load: true means 1, false means off. Off is written as an absent key (TOML has no null)."""
    assert load_config(None, ["sample.clip_x0=2.5"]).sample.clip_x0 == 2.5
    assert load_config(None, ["sample.clip_x0=false"]).sample.clip_x0 is None
    assert config_from_dict({"sample": {"clip_x0": False}}).sample.clip_x0 is None
    assert config_from_dict({"sample": {"clip_x0": True}}).sample.clip_x0 == 1.0
    assert "clip_x0" not in format_config(Config())
    path = tmp_path / "c.toml"
    save_config(load_config(None, ["sample.clip_x0=0.5"]), path)
    assert load_config(path).sample.clip_x0 == 0.5 and load_config(path) == load_config(None, ["sample.clip_x0=0.5"])
    assert "sample.clip_x0" in _error(None, ["sample.clip_x0=-1"])
    assert "sample.clip_x0" in _error(None, ["sample.clip_x0=1", "sample.sampler=unipc"])
