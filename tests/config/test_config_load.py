"""Loading configs: defaults, values, every error message, overrides, YAML output."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs
import pytest
import yaml

from tscale.config import (
    Config,
    DataConfig,
    SyntheticConfig,
    load_config,
    save_config,
    to_dict,
    to_yaml,
)
from tscale.errors import ConfigError
from tscale.optim import AdamWConfig, LionConfig, MuonConfig, WSDConfig


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(source, overrides=(), cls=Config) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides, cls=cls)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- defaults and values ----------------------------------------------------------------------


def test_defaults_from_none_empty_mapping_and_empty_file(tmp_path):
    assert load_config(None) == Config()
    assert load_config({}) == Config()
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "# only a comment\n")) == Config()


def test_a_section_left_empty_keeps_its_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "optimizer:\ntrain:\n  max_steps: 5\n"))
    assert cfg.optimizer == AdamWConfig()  # the first type of the tagged union
    assert cfg.train.max_steps == 5


def test_values_from_a_file(tmp_path):
    path = _write(
        tmp_path,
        """
run: {name: demo, threads: 2}
model: {dtype: bfloat16, num_kv_heads: null}
data:
  train_files: [a.jsonl, b.jsonl]
  synthetic: {tasks: [add]}
optimizer: {lr: 0.01, betas: [0.8, 0.9], max_grad_norm: null}
""",
    )
    cfg = load_config(str(path))
    assert cfg.run.name == "demo" and cfg.run.threads == 2
    assert cfg.model.dtype == "bfloat16" and cfg.model.num_kv_heads is None
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.data.synthetic == SyntheticConfig(tasks=["add"])
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.optimizer.max_grad_norm is None
    assert cfg.model.hidden_size == Config().model.hidden_size  # untouched keys keep defaults


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3e-4", 3e-4),
        ("1e3", 1000.0),
        ("1.0e-3", 1e-3),
        ("+2E-1", 0.2),  # a sign; a negative lr is out of its domain
        ("2", 2.0),
        ("'0.5'", 0.5),
    ],
)
def test_float_fields_take_the_numbers_pyyaml_reads_as_strings(tmp_path, text, expected):
    assert yaml.safe_load(f"x: {text}")["x"] is not None
    cfg = load_config(_write(tmp_path, f"optimizer:\n  lr: {text}\n"))
    assert cfg.optimizer.lr == pytest.approx(expected)
    assert type(cfg.optimizer.lr) is float


@pytest.mark.parametrize(
    ("text", "expected"), [("7", 7), ("7.0", 7), ("1e3", 1000), ("1_000", 1000)]
)
def test_int_fields_take_whole_numbers(tmp_path, text, expected):
    cfg = load_config(_write(tmp_path, f"train:\n  max_steps: {text}\n"))
    assert cfg.train.max_steps == expected
    assert type(cfg.train.max_steps) is int


def test_a_mapping_source_is_not_mutated_and_may_hold_records():
    source = {"optimizer": {"lr": 0.5}, "data": DataConfig(max_length=9)}
    cfg = load_config(source, ["optimizer.eps=0.1"])
    assert source == {"optimizer": {"lr": 0.5}, "data": DataConfig(max_length=9)}
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.eps == 0.1 and cfg.data.max_length == 9


# ---- unknown keys -----------------------------------------------------------------------------


def test_unknown_key_names_the_full_path_and_the_closest_key():
    message = _error({"optimizer": {"lr_rate": 3e-4}})
    assert "unknown key 'optimizer.lr_rate'" in message
    assert "did you mean 'optimizer.lr'?" in message


def test_unknown_key_in_a_file_starts_with_the_file_and_line(tmp_path):
    path = _write(tmp_path, "run:\n  name: x\noptimizer:\n  lr: 0.1\n  lr_rate: 1\n")
    message = _error(path)
    assert message == (f"{path}:5: unknown key 'optimizer.lr_rate'; did you mean 'optimizer.lr'?")


@pytest.mark.parametrize(
    ("source", "suggestion"),
    [
        ({"optimizer": {"learning_rate": 1}}, "'optimizer.lr'"),  # initials
        ({"model": {"num_layer": 2}}, "'model.num_layers'"),  # a typo
        ({"data": {"synthetic": {"task": ["add"]}}}, "'data.synthetic.tasks'"),  # nested
        ({"train": {"lr": 1}}, "'optimizer.lr'"),  # misplaced: the key exists in another section
        ({"tokenizer": {}}, "'data.tokenizer'"),  # a misplaced section
        ({"optimiser": {}}, "'optimizer'"),  # top level
        ({"optimizer": {"Type": "adamw"}}, "'optimizer.type'"),  # case
    ],
)
def test_unknown_key_suggestions(source, suggestion):
    message = _error(source)
    assert f"did you mean {suggestion}?" in message, message


def test_a_key_in_several_other_sections_suggests_each():
    message = _error({"data": {"vocab_size": 1}})
    assert message == (
        "unknown key 'data.vocab_size'; "
        "did you mean 'model.vocab_size' or 'data.tokenizer.vocab_size'?"
    )


def test_unknown_key_with_nothing_close_lists_the_valid_keys():
    message = _error({"scheduler": {"zzz": 1}})
    assert message == (
        "unknown key 'scheduler.zzz'; valid keys in 'scheduler': type, warmup_steps, "
        "min_lr_ratio"  # the keys of the chosen type (cosine, the default)
    )
    message = _error({"zzz": 1})
    assert message.startswith("unknown key 'zzz'; valid keys: run, task, model, data, optimizer")


# ---- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            {"optimizer": {"type": "adamx"}},
            "optimizer.type: 'adamx' is not one of: adamw, adamw_8bit, lion, prodigy, sophia_g, "
            "schedule_free_adamw, muon (did you mean 'adamw'?)",
        ),
        (
            {"scheduler": {"type": "step"}},
            "scheduler.type: 'step' is not one of: cosine, constant, cosine_restarts, linear, wsd, "
            "rex, inverse_sqrt, polynomial",
        ),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number, got 'fast'"),
        (
            {"optimizer": {"weight_decay": None}},
            "optimizer.weight_decay: expected a number, got null",
        ),
        ({"optimizer": {"lr": True}}, "optimizer.lr: expected a number, got true"),
        ({"optimizer": [1, 2]}, "optimizer: expected a mapping, got a list"),
        ({"optimizer": "adamw"}, "optimizer: expected a mapping, got 'adamw'"),
        ({"model": {"num_layers": 1.5}}, "model.num_layers: expected an integer, got 1.5"),
        ({"model": {"num_layers": "many"}}, "model.num_layers: expected an integer, got 'many'"),
        ({"model": {"num_layers": False}}, "model.num_layers: expected an integer, got false"),
        ({"model": {"head_dim": 2.5}}, "model.head_dim: expected an integer, got 2.5"),
        (
            {"model": {"tie_word_embeddings": "yes"}},
            "model.tie_word_embeddings: expected true or false, got 'yes'",
        ),
        (
            {"model": {"tie_word_embeddings": 1}},
            "model.tie_word_embeddings: expected true or false, got 1",
        ),
        ({"run": {"name": 123}}, "run.name: expected a string, got 123 (quote it: '123')"),
        ({"data": {"train_files": "a.jsonl"}}, "data.train_files: expected a list, got 'a.jsonl'"),
        (
            {"data": {"train_files": ["a", 1]}},
            "data.train_files[1]: expected a string, got 1 (quote it: '1')",
        ),
        (
            {"data": {"synthetic": {"tasks": ["sort", "sortt"]}}},
            "data.synthetic.tasks[1]: 'sortt' is not one of: reverse, sort, add "
            "(did you mean 'sort'?)",
        ),
        (
            {"optimizer": {"betas": [0.9]}},
            "optimizer.betas: expected a list of 2 items, got 1 item",
        ),
        ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas[1]: expected a number, got 'x'"),
        ({"model": {"dtype": "fp16"}}, "model.dtype: 'fp16' is not one of: float32, bfloat16"),
    ],
)
def test_bad_values_name_the_path_and_what_is_valid(source, expected):
    assert _error(source) == expected


def test_bad_value_in_a_file_has_file_and_line(tmp_path):
    path = _write(tmp_path, "optimizer:\n  type: adamw\n  lr: fast\n")
    assert _error(path) == f"{path}:3: optimizer.lr: expected a number, got 'fast'"
    path = _write(tmp_path, "data:\n  synthetic:\n    tasks:\n      - sort\n      - sorts\n")
    assert _error(path).startswith(f"{path}:5: data.synthetic.tasks[1]: 'sorts' is not one of")


# ---- files and YAML ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert _error(path) == f"{path}: config file not found"
    assert _error(str(path)) == f"{path}: config file not found"


def test_a_directory_is_not_a_config(tmp_path):
    assert _error(tmp_path).startswith(f"{tmp_path}: is a directory")


def test_yaml_syntax_error_has_the_line(tmp_path):
    path = _write(tmp_path, "run:\n  name: x\n bad: [\n")
    message = _error(path)
    assert message.startswith(f"{path}:3: invalid YAML: ")


def test_duplicate_keys_are_errors(tmp_path):
    path = _write(tmp_path, "run:\n  name: x\n  seed: 1\n  name: y\n")
    assert _error(path) == f"{path}:4: duplicate key 'run.name' (first on line 2)"


@pytest.mark.parametrize(("text", "got"), [("- 1\n- 2\n", "a list"), ("hello\n", "'hello'")])
def test_the_top_level_must_be_a_mapping(tmp_path, text, got):
    path = _write(tmp_path, text)
    message = _error(path)
    assert message.startswith(f"{path}:1: the top level must be a mapping of sections (run, ")
    assert message.endswith(f"got {got}")


def test_a_source_of_another_kind_is_an_error():
    assert "must be a path or a mapping" in _error([1, 2])


# ---- overrides --------------------------------------------------------------------------------


def test_overrides_nested_lists_null_and_numbers():
    cfg = load_config(
        None,
        [
            "optimizer.lr=3e-4",
            "data.synthetic.tasks=[sort]",
            "data.synthetic.num_train=10",
            "model.num_kv_heads=2",
            "optimizer.max_grad_norm=null",
            "optimizer.betas=[0.5, 0.6]",
            "train.donate=false",
            "model.dtype=bfloat16",
        ],
    )
    assert cfg.optimizer.lr == 3e-4
    assert cfg.data.synthetic.tasks == ["sort"] and cfg.data.synthetic.num_train == 10
    assert cfg.model.num_kv_heads == 2
    assert cfg.optimizer.max_grad_norm is None
    assert cfg.optimizer.betas == (0.5, 0.6)
    assert cfg.train.donate is False
    assert cfg.model.dtype == "bfloat16"


def test_overrides_apply_over_the_file_in_order(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: 0.1\n  eps: 0.2\n")
    cfg = load_config(path, ["optimizer.lr=0.3", "optimizer.lr=0.4"])
    assert cfg.optimizer.lr == 0.4 and cfg.optimizer.eps == 0.2


def test_an_override_of_a_string_field_keeps_its_text():
    cfg = load_config(None, ["run.name=2024", "run.device=cuda:1", "data.tokenizer.path=true"])
    assert cfg.run.name == "2024" and cfg.run.device == "cuda:1"
    assert cfg.data.tokenizer.path == "true"
    assert load_config(None, ["data.tokenizer.path=null"]).data.tokenizer.path is None


def test_a_mapping_override_merges_into_the_section(tmp_path):
    path = _write(tmp_path, "optimizer:\n  eps: 0.2\n")
    cfg = load_config(path, ["optimizer={lr: 0.5}"])
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.eps == 0.2


def test_an_override_for_an_unknown_key():
    message = _error(None, ["optimizer.lr_rate=3"])
    assert message == (
        "override 'optimizer.lr_rate=3': unknown key 'optimizer.lr_rate'; "
        "did you mean 'optimizer.lr'?"
    )
    assert _error(None, ["train.lr=3"]).endswith("did you mean 'optimizer.lr'?")
    assert _error(None, ["optimiser.lr=3"]).startswith(
        "override 'optimiser.lr=3': unknown key 'optimiser'; did you mean 'optimizer'?"
    )


def test_a_bad_override_value_blames_the_override(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: 0.1\n")
    assert _error(path, ["optimizer.lr=fast"]) == (
        "override 'optimizer.lr=fast': optimizer.lr: expected a number, got 'fast'"
    )
    assert _error(None, ["optimizer={eps: x}"]) == (
        "override 'optimizer={eps: x}': optimizer.eps: expected a number, got 'x'"
    )
    assert _error(None, ["data.synthetic.tasks=[sort, sortt]"]).startswith(
        "override 'data.synthetic.tasks=[sort, sortt]': data.synthetic.tasks[1]: 'sortt' is not"
    )


def test_a_bad_file_value_still_blames_the_file_when_overrides_are_given(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: fast\n")
    assert _error(path, ["optimizer.eps=0.1"]).startswith(f"{path}:2: optimizer.lr: ")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr", "override 'optimizer.lr': expected key.path=value"),
        ("=3", "override '=3': expected key.path=value"),
        ("optimizer..lr=3", "override 'optimizer..lr=3': empty name in key path"),
        ("optimizer.lr=[", "override 'optimizer.lr=[': invalid YAML value"),
        (
            "optimizer.weight_decay.x=1",
            "override 'optimizer.weight_decay.x=1': optimizer.weight_decay: is a number, not a",
        ),
    ],
)
def test_malformed_overrides(override, expected):
    assert _error(None, [override]).startswith(expected)


def test_an_override_through_a_non_mapping_in_the_file(tmp_path):
    path = _write(tmp_path, "optimizer: [1]\n")
    assert _error(path, ["optimizer.lr=1"]) == (
        "override 'optimizer.lr=1': optimizer: expected a mapping, got a list"
    )


# ---- tagged unions (optimizer, scheduler) --------------------------------------------------------


def test_the_type_picks_the_record_and_its_defaults(tmp_path):
    path = _write(tmp_path, "optimizer:\n  type: muon\n  lr: 0.02\n  momentum: 0.9\n")
    cfg = load_config(path)
    assert cfg.optimizer == MuonConfig(lr=0.02, momentum=0.9)
    assert load_config({"optimizer": {"lr": 0.1}}).optimizer == AdamWConfig(lr=0.1)  # no type
    assert load_config({"scheduler": None}).scheduler == Config().scheduler


def test_a_field_of_another_type_names_the_types_that_take_it(tmp_path):
    path = _write(tmp_path, "optimizer:\n  type: adamw\n  lr: 0.1\n  momentum: 0.9\n")
    assert _error(path) == (
        f"{path}:4: optimizer.momentum is not a field of optimizer.type: adamw (muon takes it)"
    )
    assert _error({"scheduler": {"type": "constant", "min_lr_ratio": 0.1}}) == (
        "scheduler.min_lr_ratio is not a field of scheduler.type: constant (cosine, "
        "cosine_restarts, linear, wsd, rex, polynomial take it)"
    )
    assert _error(None, ["optimizer.rho=0.1"]) == (
        "override 'optimizer.rho=0.1': optimizer.rho is not a field of optimizer.type: adamw "
        "(sophia_g takes it)"
    )


def test_a_typo_of_another_types_key_suggests_it_with_its_types():
    assert _error({"optimizer": {"momentun": 0.9}}) == (
        "optimizer.momentun is not a field of optimizer.type: adamw; did you mean "
        "'optimizer.momentum' (muon takes it)?"
    )
    # a typo of the chosen type's own key stays the usual unknown key
    assert _error({"optimizer": {"type": "muon", "momentun": 0.9}}) == (
        "unknown key 'optimizer.momentun'; did you mean 'optimizer.momentum'?"
    )


def test_an_override_switches_the_type_of_a_file_section(tmp_path):
    path = _write(tmp_path, "optimizer:\n  type: adamw\n  lr: 0.1\n  betas: [0.8, 0.9]\n")
    cfg = load_config(path, ["optimizer.type=lion"])
    assert cfg.optimizer == LionConfig(lr=0.1, betas=(0.8, 0.9))  # the shared keys carry over
    cfg = load_config(None, ["scheduler.type=wsd", "scheduler.decay_fraction=0.3"])
    assert cfg.scheduler == WSDConfig(decay_fraction=0.3)
    assert _error(path, ["optimizer.type=muon"]) == (
        f"{path}:4: optimizer.betas is not a field of optimizer.type: muon (adamw, adamw_8bit, "
        "lion, prodigy, sophia_g, schedule_free_adamw take it)"
    )
    assert _error(None, ["optimizer.type=adamx"]) == (
        "override 'optimizer.type=adamx': optimizer.type: 'adamx' is not one of: adamw, "
        "adamw_8bit, lion, prodigy, sophia_g, schedule_free_adamw, muon (did you mean 'adamw'?)"
    )


def test_null_leaves_out_a_key_the_new_type_does_not_take(tmp_path):
    """Switching a file's section to another type from the command line: null unsets a key
    the new type does not take; a null for a key the type takes keeps its meaning (or is an
    error), and a typo stays an error."""
    path = _write(tmp_path, "optimizer:\n  betas: [0.9, 0.98]\n  max_grad_norm: 0.5\n")
    cfg = load_config(path, ["optimizer.type=muon", "optimizer.betas=null"])
    assert cfg.optimizer == MuonConfig(max_grad_norm=0.5)
    assert _error(path, ["optimizer.type=lion", "optimizer.betas=null"]).endswith(
        "optimizer.betas: expected a list of 2 items, got null"
    )
    assert load_config(path, ["optimizer.max_grad_norm=null"]).optimizer.max_grad_norm is None
    assert _error(path, ["optimizer.betaz=null"]).startswith(
        "override 'optimizer.betaz=null': unknown key 'optimizer.betaz'"
    )


def test_every_type_round_trips_through_yaml():
    from tscale.optim import OPTIMIZER_CONFIGS, SCHEDULE_CONFIGS

    for opt in OPTIMIZER_CONFIGS:
        for sched in SCHEDULE_CONFIGS:
            cfg = Config(optimizer=opt(), scheduler=sched(warmup_steps=3))
            text = to_yaml(cfg)
            assert f"optimizer:\n  type: {cfg.optimizer.type}\n" in text
            assert load_config(yaml.safe_load(text)) == cfg


# ---- output -----------------------------------------------------------------------------------


def test_to_dict_is_plain_and_in_schema_order():
    data = to_dict(Config())
    assert list(data) == [f.name for f in attrs.fields(Config)]
    assert list(data["optimizer"]) == [f.name for f in attrs.fields(AdamWConfig)]
    assert data["optimizer"]["type"] == "adamw"  # the tag first
    assert data["optimizer"]["betas"] == [0.9, 0.999]  # the chosen optimizer's own default

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, bool | int | float | str)

    assert plain(data)


def test_to_yaml_keeps_schema_order_and_reads_back():
    cfg = load_config(None, ["optimizer.lr=3e-4", "data.synthetic.tasks=[add]"])
    text = to_yaml(cfg)
    top = [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert top == [f.name for f in attrs.fields(Config)]
    assert "optimizer:\n  type: adamw\n" in text and "  betas: [0.9, 0.999]\n" in text
    assert yaml.safe_load(text) == to_dict(cfg)
    assert load_config(yaml.safe_load(text)) == cfg


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["run.name=saved", "optimizer.eps=1e-7"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


# ---- any attrs class ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Inner:
    size: int = attrs.field(default=1, validator=attrs.validators.gt(0))


@attrs.frozen(kw_only=True)
class _Custom:
    mode: Literal["a", "b"] = "a"
    inner: _Inner = _Inner()
    maybe: _Inner | None = None
    weights: dict[str, float] = attrs.field(factory=dict)
    either: int | str = 0
    rest: tuple[int, ...] = ()


def test_load_is_generic_over_attrs_classes():
    cfg = load_config(
        {"inner": {"size": 3}, "weights": {"x": "1e-3"}, "either": "s", "rest": [1, 2]},
        ["maybe={size: 2}"],
        cls=_Custom,
    )
    assert cfg == _Custom(
        inner=_Inner(size=3), maybe=_Inner(size=2), weights={"x": 1e-3}, either="s", rest=(1, 2)
    )
    assert load_config({"maybe": None}, cls=_Custom).maybe is None
    assert load_config(None, ["weights.y=2"], cls=_Custom).weights == {"y": 2.0}
    assert _error({"inner": {"sise": 1}}, cls=_Custom) == (
        "unknown key 'inner.sise'; did you mean 'inner.size'?"
    )
    assert _error({"either": 1.5}, cls=_Custom) == (
        "either: expected an integer or a string, got 1.5"
    )
    assert _error({"weights": {"x": "heavy"}}, cls=_Custom) == (
        "weights.x: expected a number, got 'heavy'"
    )
    # attrs validators run too (through cattrs), and name their section
    assert _error({"inner": {"size": 0}}, cls=_Custom) == "inner: 'size' must be > 0: 0"
    assert load_config(to_dict(_Custom(rest=(4,))), cls=_Custom) == _Custom(rest=(4,))
