"""Unit tests for the typed config loader (exit_loop/config.py): YAML, dotted overrides, flags,
and the errors for unknown keys and wrong types. Pure and fast: no model, no network."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from exit_loop.config import ConfigError, dump_yaml, load_config, parse_override, to_dict
from exit_loop.pipeline.generate import GenerateConfig, parse_args
from exit_loop.sample import SampleConfig
from exit_loop.tasks import DataConfig


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@dataclass
class Inner:
    n: int = 1
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)
    limit: int | None = None
    rate: float = 0.5
    label: str = "x"
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None


# --------------------------------------------------------------------------- loading and precedence

def test_yaml_overrides_and_values_fill_a_nested_config(tmp_path):
    path = write(tmp_path, """
        output_dir: out/a
        data:
          dataset: ../shared/data/gsm8k/train.jsonl
          num_examples: 10
        sample:
          temperature: 0.6
          num_samples: 2
          stop: ["</answer>", "\\n\\n"]
        """)
    cfg = load_config(GenerateConfig, path, ["sample.num_samples=4", "sample.top_p=0.95"],
                      values={"sample.model_name": "Qwen/Qwen2.5-0.5B", "data.split": "test"})
    assert isinstance(cfg, GenerateConfig)
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.sample, SampleConfig)
    assert cfg.output_dir == "out/a"
    assert cfg.data.dataset == "../shared/data/gsm8k/train.jsonl"
    assert cfg.data.num_examples == 10
    assert cfg.data.split == "test"
    assert cfg.sample.model_name == "Qwen/Qwen2.5-0.5B"
    assert cfg.sample.temperature == 0.6
    assert cfg.sample.num_samples == 4
    assert cfg.sample.top_p == 0.95
    assert cfg.sample.stop == ["</answer>", "\n\n"]
    # untouched keys keep their defaults
    assert cfg.sample.max_tokens == SampleConfig().max_tokens
    assert cfg.filter.dedup is True


def test_no_file_gives_the_defaults():
    assert load_config(GenerateConfig) == GenerateConfig()


@pytest.mark.parametrize("overrides,values,expected", [
    ([], {}, 10),                                           # YAML
    ([], {"data.num_examples": 20}, 20),                    # values beat YAML
    (["data.num_examples=30"], {}, 30),                     # overrides beat YAML
    (["data.num_examples=30"], {"data.num_examples": 20}, 30),  # overrides beat values
    (["data.num_examples=30", "data.num_examples=40"], {}, 40),  # the last override wins
])
def test_precedence_override_then_values_then_yaml(tmp_path, overrides, values, expected):
    path = write(tmp_path, "data:\n  num_examples: 10\n  split: test\n")
    cfg = load_config(GenerateConfig, path, overrides, values)
    assert cfg.data.num_examples == expected
    assert cfg.data.split == "test"  # a sibling key from YAML is kept


def test_command_line_flags_reach_the_config_through_values(tmp_path):
    path = write(tmp_path, "data:\n  num_examples: 10\nsample:\n  num_samples: 2\n")
    cfg = parse_args(["--config", str(path), "--num_examples", "7", "--prompt_style", "chat",
                      "sample.num_samples=3"], "exit-loop generate", "")
    assert cfg.data.num_examples == 7
    assert cfg.sample.prompt_style == "chat"
    assert cfg.sample.num_samples == 3
    cfg = parse_args(["--config", str(path), "--num_examples", "7", "data.num_examples=9"],
                     "exit-loop generate", "")
    assert cfg.data.num_examples == 9


# --------------------------------------------------------------------------- unknown keys

def test_unknown_top_level_key_in_yaml_names_key_file_line_and_valid_keys(tmp_path):
    path = write(tmp_path, """
        data:
          num_examples: 5
        outptu_dir: runs/x
        """)
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, path)
    msg = str(e.value)
    assert "'outptu_dir'" in msg
    assert f"{path}:3" in msg
    assert "at the top level" in msg
    assert "data, filter, output_dir, sample" in msg


def test_unknown_nested_key_in_yaml_names_key_file_line_and_valid_keys(tmp_path):
    path = write(tmp_path, """
        output_dir: runs/x
        sample:
          num_samples: 2
          temprature: 0.6
        """)
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, path)
    msg = str(e.value)
    assert "'sample.temprature'" in msg
    assert f"{path}:4" in msg
    assert "under 'sample'" in msg
    assert "temperature" in msg and "top_p" in msg and "num_samples" in msg


@pytest.mark.parametrize("item,key,valid", [
    ("outdir=x", "outdir", "data, filter, output_dir, sample"),
    ("sample.temprature=0.6", "sample.temprature", "temperature"),
    ("data.num_exampels=5", "data.num_exampels", "num_examples"),
])
def test_unknown_key_in_override_names_key_and_valid_keys(item, key, valid):
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, None, [item])
    assert f"'{key}'" in str(e.value)
    assert valid in str(e.value)


def test_unknown_key_in_values_is_refused():
    with pytest.raises(ConfigError, match=r"'data\.nope'.*num_examples"):
        load_config(GenerateConfig, None, values={"data.nope": 1})


def test_override_into_a_non_section_is_refused():
    with pytest.raises(ConfigError, match=r"data\.num_examples.*not a section"):
        load_config(GenerateConfig, None, ["data.num_examples.x=1"])


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(GenerateConfig, None, ["sample.temperature"])


def test_unknown_key_under_an_optional_section_names_the_key(tmp_path):
    path = write(tmp_path, "maybe:\n  n: 2\n  nn: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, path)
    msg = str(e.value)
    assert "'maybe.nn'" in msg and f"{path}:3" in msg and "limit, mode, n" in msg
    assert load_config(Outer, write(tmp_path, "maybe:\n  n: 2\n", "ok.yaml")).maybe == Inner(n=2)
    assert load_config(Outer, None, ["maybe.n=4"]).maybe == Inner(n=4)
    assert load_config(Outer).maybe is None


# --------------------------------------------------------------------------- wrong types

@pytest.mark.parametrize("item,key,expected", [
    ("data.num_examples=abc", "data.num_examples", "int"),         # int given text
    ("sample.num_samples=2.5", "sample.num_samples", "int"),       # int given a float
    ("sample.num_samples=true", "sample.num_samples", "int"),      # int given a bool
    ("sample.trust_remote_code=3", "sample.trust_remote_code", "bool"),  # bool given an int
    ("sample.trust_remote_code=maybe", "sample.trust_remote_code", "bool"),
    ("sample.temperature=hot", "sample.temperature", "float"),
    ("sample.backend=tpu", "sample.backend", ("'auto'", "'vllm'", "'hf'")),  # Literal: a bad choice
    ("sample.prompt_style=R1", "sample.prompt_style", ("'r1_zero'", "'chat'", "'reasoning'")),
    ("sample.stop=</answer>", "sample.stop", "list"),              # list given a scalar
    ("sample.stop=[1, 2]", "sample.stop[0]", "str"),               # list items are checked too
    ("sample.sampling=5", "sample.sampling", "mapping"),           # dict given a scalar
    ("data=5", "data", "mapping"),                                 # a section given a scalar
])
def test_wrong_type_in_override_names_key_and_expected_type(item, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, None, [item])
    msg = str(e.value)
    assert f"'{key}'" in msg
    for word in (expected if isinstance(expected, tuple) else (expected,)):
        assert word in msg
    assert "command line" in msg


def test_wrong_type_in_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, """
        data:
          split: train
          num_examples: abc
        """)
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, path)
    assert "'data.num_examples'" in str(e.value)
    assert f"{path}:3" in str(e.value)
    assert "expected int" in str(e.value)


@pytest.mark.parametrize("text,key", [
    ("n: yes_please\n", "n"),
    ("flag: 3\n", "flag"),
    ("mode: c\n", "mode"),
    ("names: solo\n", "names"),
    ("limit: [1]\n", "limit"),
    ("label: 5\n", "label"),
])
def test_wrong_types_from_yaml_on_a_flat_config(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' ({path}:1)")):
        load_config(Inner, path)


def test_ints_widen_to_float_but_nothing_else_is_coerced():
    cfg = load_config(Inner, None, ["rate=1", "n=3", "flag=true", "mode=b", "names=[p, q]"])
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.n == 3 and cfg.flag is True and cfg.mode == "b" and cfg.names == ["p", "q"]


# --------------------------------------------------------------------------- strings, null, floats

@pytest.mark.parametrize("text", ["1e3", "007", "true", "null", "3.0", "[a, b]", "x: y", " padded"])
def test_str_field_keeps_override_text_verbatim(text):
    cfg = load_config(GenerateConfig, None, [f"sample.model_name={text}"])
    assert cfg.sample.model_name == text


@pytest.mark.parametrize("text,expected", [
    ("cuda:0", "cuda:0"),
    ("42", "42"),
    ("1e3", "1e3"),
    ("Answer: put the number in the tags", "Answer: put the number in the tags"),
    ("[unbalanced", "[unbalanced"),
    ("- a list-looking line", "- a list-looking line"),
    ("null", None),
    ("~", None),
    ("", None),
])
def test_optional_str_field_keeps_text_and_reads_null(text, expected):
    cfg = load_config(GenerateConfig, None, [f"sample.system_prompt={text}"])
    assert cfg.sample.system_prompt == expected


def test_int_or_none_accepts_null(tmp_path):
    path = write(tmp_path, "data:\n  num_examples: 10\nsample:\n  max_model_len: ~\n")
    assert load_config(GenerateConfig, path).sample.max_model_len is None
    assert load_config(GenerateConfig, path).data.num_examples == 10
    assert load_config(GenerateConfig, path, ["data.num_examples=null"]).data.num_examples is None
    assert load_config(GenerateConfig, path, ["data.num_examples="]).data.num_examples is None
    assert load_config(GenerateConfig, path, values={"data.num_examples": None}).data.num_examples is None
    path = write(tmp_path, "data:\n  num_examples: null\n", "null.yaml")
    assert load_config(GenerateConfig, path).data.num_examples is None


@pytest.mark.parametrize("text,expected", [("1e-3", 0.001), ("1.5e2", 150.0), ("2", 2.0), ("-1E-2", -0.01)])
def test_exponent_floats_are_floats_in_overrides_and_yaml(tmp_path, text, expected):
    # PyYAML's YAML 1.1 resolver reads `1e-3` as a string; a config must read it as a number
    assert load_config(Inner, None, [f"rate={text}"]).rate == expected
    assert load_config(Inner, write(tmp_path, f"rate: {text}\n")).rate == expected


def test_exponent_floats_in_pass_through_dicts_are_numbers(tmp_path):
    path = write(tmp_path, "sample:\n  sampling:\n    min_p: 1e-2\n")
    cfg = load_config(GenerateConfig, path, ["sample.engine.swap_space=4e0"])
    assert cfg.sample.sampling == {"min_p": 0.01}
    assert cfg.sample.engine == {"swap_space": 4.0}


# --------------------------------------------------------------------------- pass-through dicts

def test_pass_through_dict_sub_keys(tmp_path):
    path = write(tmp_path, "sample:\n  sampling:\n    min_p: 0.05\n    top_k: 1\n")
    cfg = load_config(GenerateConfig, path, ["sample.sampling.top_k=5", "sample.engine.max_num_seqs=8",
                                             "sample.sampling.logit_bias={1: -100}"])
    assert cfg.sample.sampling == {"min_p": 0.05, "top_k": 5, "logit_bias": {1: -100}}
    assert cfg.sample.engine == {"max_num_seqs": 8}
    assert load_config(GenerateConfig, None, ["sample.sampling.top_k=5"]).sample.sampling == {"top_k": 5}


def test_pass_through_dict_whole_value():
    cfg = load_config(GenerateConfig, None, ["sample.sampling={top_k: 5, min_p: 0.1}"])
    assert cfg.sample.sampling == {"top_k": 5, "min_p": 0.1}


# --------------------------------------------------------------------------- __post_init__

@pytest.mark.parametrize("item,words", [
    ("sample.num_samples=0", "num_samples"),
    ("data.num_examples=0", "num_examples"),
    ("sample.shard_id=3", "shard_id"),
    ("filter.max_correct_per_question=0", "max_correct_per_question"),
])
def test_post_init_value_error_becomes_config_error(item, words):
    with pytest.raises(ConfigError, match=words):
        load_config(GenerateConfig, None, [item])


def test_post_init_error_names_the_section():
    with pytest.raises(ConfigError, match=r"'inner'.*n must be >= 0"):
        load_config(Outer, None, ["inner.n=-1"])


def test_empty_section_in_yaml_means_defaults(tmp_path):
    path = write(tmp_path, """
        output_dir: runs/x
        filter:
          # max_correct_per_question: 4
        sample:
          num_samples: 2
        """)
    cfg = load_config(GenerateConfig, path)
    assert cfg.filter == GenerateConfig().filter
    assert cfg.sample.num_samples == 2


# --------------------------------------------------------------------------- files

def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(GenerateConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(GenerateConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(GenerateConfig, write(tmp_path, "data: [1,\n", "bad.yaml"))
    assert load_config(GenerateConfig, write(tmp_path, "# only a comment\n", "empty.yaml")) == GenerateConfig()


def test_to_dict_and_dump_yaml_round_trip(tmp_path):
    cfg = load_config(GenerateConfig, None, [
        "output_dir=runs/rt", "data.num_examples=12", "data.shuffle=true",
        "sample.model_name=1e3", "sample.temperature=1e-4", "sample.stop=['</answer>', 'User:']",
        "sample.system_prompt=Answer: in tags", "sample.sampling.top_k=5",
        "sample.engine={max_num_seqs: 8}", "filter.max_response_tokens=2048",
    ])
    d = to_dict(cfg)
    assert list(d) == ["output_dir", "data", "sample", "filter", "slurm"]
    assert d["sample"]["sampling"] == {"top_k": 5}
    assert d["sample"]["model_name"] == "1e3"
    text = dump_yaml(cfg)
    assert text.splitlines()[0] == "output_dir: runs/rt"
    path = tmp_path / "resolved.yaml"
    path.write_text(text, encoding="utf-8")
    back = load_config(GenerateConfig, path)
    assert back == cfg
    assert back.sample.model_name == "1e3"
    assert back.sample.temperature == 1e-4


def test_parse_override_returns_key_and_typed_value():
    assert parse_override(GenerateConfig, "sample.temperature=0.6") == ("sample.temperature", 0.6)
    assert parse_override(GenerateConfig, "sample.model_name=007") == ("sample.model_name", "007")
    assert parse_override(GenerateConfig, "sample.sampling.top_k=5") == ("sample.sampling.top_k", 5)


# --------------------------------------------------------------------------- import cost

def test_importing_the_cli_and_generate_does_not_import_vllm_or_torch():
    code = (
        "import sys\n"
        "import exit_loop.cli\n"
        "assert 'vllm' not in sys.modules, 'exit_loop.cli imported vllm'\n"
        "assert 'torch' not in sys.modules, 'exit_loop.cli imported torch'\n"
        "import exit_loop.pipeline.generate\n"
        "assert 'vllm' not in sys.modules, 'exit_loop.pipeline.generate imported vllm'\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_shipped_generate_configs_load_and_round_trip(tmp_path):
    root = Path(__file__).resolve().parents[1]
    paths = sorted((root / "configs").glob("generate_*.yaml"))
    assert paths, "no configs/generate_*.yaml"
    for path in paths:
        cfg = load_config(GenerateConfig, path)
        assert path.read_text(encoding="utf-8").startswith("# exit-loop "), f"{path}: no launch command on top"
        dumped = tmp_path / path.name
        dumped.write_text(dump_yaml(cfg), encoding="utf-8")
        assert load_config(GenerateConfig, dumped) == cfg


def test_a_key_given_twice_in_yaml_is_an_error(tmp_path):
    path = write(tmp_path, """
        sample:
          num_samples: 4
          temperature: 0.6
        data:
          split: test
        sample:
          temperature: 1.0
        """)
    with pytest.raises(ConfigError, match=re.escape(f"{path}:6: key 'sample' given twice (also at line 1)")):
        load_config(GenerateConfig, path)
    path = write(tmp_path, "sample:\n  sampling:\n    top_k: 5\n    top_k: 6\n", "nested.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4: key 'sample.sampling.top_k' given twice")):
        load_config(GenerateConfig, path)


@dataclass
class Derived:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    total: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.total = self.steps * 2


def test_dump_leaves_out_derived_fields_so_it_loads_back(tmp_path):
    cfg = load_config(Derived, None, ["steps=4", "inner.names=[a]"])
    assert cfg.total == 8
    assert to_dict(cfg) == {"steps": 4, "inner": to_dict(Inner(names=["a"]))}
    path = tmp_path / "d.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    assert load_config(Derived, path) == cfg


def test_a_partly_given_section_keeps_its_own_defaults(tmp_path):
    """Setting one key of a section whose default is not its class's default (eval.data is
    DataConfig(split="test")) keeps the others: eval must not quietly read the training split."""
    from exit_loop.pipeline.quickstart import QuickstartConfig
    from exit_loop.pipeline.run import ExperimentConfig

    cfg = load_config(ExperimentConfig, None, ["student=x", "eval.data.dataset=t.jsonl"])
    assert (cfg.eval.data.dataset, cfg.eval.data.split) == ("t.jsonl", "test")
    path = tmp_path / "c.yaml"
    path.write_text("student: x\neval:\n  k: 4\n  data:\n    num_examples: 50\n")
    cfg = load_config(ExperimentConfig, path)
    assert (cfg.eval.k, cfg.eval.data.split, cfg.eval.data.num_examples) == (4, "test", 50)
    task = load_config(QuickstartConfig, None, ["task.num_test=100"]).task
    assert (task.num_train, task.num_test) == (1536, 100)  # QuickstartConfig's own task default
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.data.splt'.*valid keys under 'eval.data'"):
        load_config(ExperimentConfig, None, ["student=x", "eval.data.splt=test"])


def test_help_lists_every_config_key_with_its_default_and_comment():
    from exit_loop.command import keys_help
    from exit_loop.pipeline.run import ExperimentConfig

    lines = keys_help(ExperimentConfig)
    by_key = {line.split()[0]: line for line in lines}
    assert "samples per problem" in by_key["sample.num_samples=1"]           # a comment at the end of its line
    assert "what the student trains on" in by_key["arms.NAME.split=correct"]  # comment lines above the field
    assert "eval.data.split=test" in by_key                 # a section's own default, not its class's
    assert "teacher.model=''" in by_key and "train.peft.r=16" in by_key    # a section null by default, nested
    assert all(line == line.rstrip() for line in lines)
    # every key listed is one the loader takes
    keys = [k.split("=")[0] for k in by_key if "=" in k and "NAME" not in k]
    for key in keys:
        assert parse_override(ExperimentConfig, f"{key}=null")[0] == key


def test_a_teacher_takes_the_samplers_keys_checked_as_the_students_are():
    from exit_loop.pipeline.run import TEACHER_SAMPLE_KEYS, ExperimentConfig
    from exit_loop.sample import SampleConfig

    base = ["student=s", "teacher.model=T"]
    cfg = load_config(ExperimentConfig, None, [*base, "teacher.max_tokens=40", "teacher.stop=[x]",
                                               "sample.temperature=0.3"])
    teacher = cfg.teacher.sample_config(cfg.sample, "s")
    assert (teacher.model_name, teacher.max_tokens, teacher.stop, teacher.temperature) == ("T", 40, ["x"], 0.3)
    with pytest.raises(ConfigError, match=r"config 'teacher': max_tokens must be at least 1, got 0"):
        load_config(ExperimentConfig, None, [*base, "teacher.max_tokens=0"])  # at load, not at round 0
    with pytest.raises(ConfigError, match=r"'teacher.temperature' \(command line\): expected float \| null"):
        load_config(ExperimentConfig, None, [*base, "teacher.temperature=hot"])
    with pytest.raises(ConfigError, match="unknown config key 'teacher.num_samples'"):  # the run's, not the teacher's
        load_config(ExperimentConfig, None, [*base, "teacher.num_samples=4"])
    assert set(TEACHER_SAMPLE_KEYS) <= {f for f in SampleConfig.__dataclass_fields__}
