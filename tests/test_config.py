"""The config system: Megatron-Bridge YAML files as written, every override form, typed errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import click.testing
import pytest
import yaml

from nvlcore import hookimpl
from nvlcore.config import (
    ConfigError,
    NvlConfig,
    config_to_dict,
    config_to_yaml,
    load_config,
    missing_keys,
    parse_overrides,
    resolve_config,
)
from nvlcore.config.overrides import DELETE, Override, parse_value

DATA = Path(__file__).parent / "data" / "mbridge"
EXAMPLE = DATA / "nemotron_nano_v2_vl_override_example.yaml"
VIDEO = DATA / "nemotron_nano_v2_vl_video.yaml"


# -- in-test plugins: makers with and without a Kwargs schema, a PEFT method with a Config -----------
def make_raven_dataset(*, split: str = "train", **kwargs: Any) -> list[dict[str, Any]]:
    return []


class LlavaVideoMaker:
    @attrs.define
    class Kwargs:
        video_root_path: str
        subsets: str | list[str] = "0_30_s_nextqa"
        max_samples: int | None = None
        fps: float = attrs.field(default=1.0)

        @fps.validator
        def _positive(self, attribute: Any, value: float) -> None:
            if value <= 0:
                raise ValueError(f"fps must be positive, got {value}")

    def __call__(self, *, split: str = "train", **kwargs: Any) -> list[dict[str, Any]]:
        return []


class FakeLora:
    @attrs.define
    class Config:
        use_dora: bool = False
        lora_plus_ratio: float | None = None
        # a core peft field redeclared: the method's own validator also checks it
        dropout_position: str = attrs.field(default="pre", validator=attrs.validators.in_(["pre"]))


class DataAndPeftPlugin:
    @hookimpl
    def nvl_register_dataset_makers(self, register: Any) -> None:
        register("make_raven_dataset", make_raven_dataset, aliases=("raven",))
        register("make_llava_video_178k_dataset", LlavaVideoMaker(), aliases=("llava_video_178k",))
        register("make_cord_v2_dataset", make_raven_dataset, aliases=("cord_v2",))

    @hookimpl
    def nvl_register_peft_methods(self, register: Any) -> None:
        register("lora", FakeLora)


@pytest.fixture
def plugins(register_plugin: Any) -> None:
    register_plugin(DataAndPeftPlugin(), name="test-data")


def err(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# -- the original YAML files --------------------------------------------------------------------------
def test_original_example_yaml_loads_as_written(plugins: None) -> None:
    cfg = load_config([EXAMPLE], [])
    assert cfg.model.seq_length == 4096
    assert cfg.train.global_batch_size == 32 and cfg.train.train_iters == 2000
    assert cfg.validation.eval_iters == 0  # train.eval_iters is the deprecated alias
    assert cfg.optimizer.lr == pytest.approx(2e-5) and isinstance(cfg.optimizer.lr, float)  # "2e-5" is a float
    assert cfg.optimizer.min_lr == pytest.approx(2e-6)
    assert cfg.dataset.seq_length == 4096  # dataset.sequence_length alias
    assert cfg.dataset.maker_name == "make_raven_dataset"
    assert cfg.rng.seed == 42 and cfg.ddp.grad_reduce_in_fp32 is True
    assert cfg.checkpoint.save == "???"
    assert missing_keys(cfg) == ["checkpoint.save"]
    with pytest.raises(ConfigError, match=r"checkpoint\.save.*checkpoint\.save=VALUE"):
        resolve_config(cfg)
    resolved = resolve_config(load_config([EXAMPLE], ["checkpoint.save=/tmp/ckpt"]))
    assert resolved.checkpoint.save == "/tmp/ckpt"


def test_original_video_yaml_and_mapping_override_merges(plugins: None) -> None:
    cfg = load_config([VIDEO], [])
    assert cfg.model.tensor_model_parallel_size == 8 and cfg.dataset.seq_length == 8192
    assert missing_keys(cfg) == ["dataset.maker_kwargs.video_root_path"]
    # the documented form: dataset.maker_kwargs={"video_root_path":$VIDEO_ROOT}, after the shell ate the quotes
    cfg = load_config([VIDEO], ["dataset.maker_kwargs={video_root_path:/data/videos}"])
    assert cfg.dataset.maker_kwargs == {
        "video_root_path": "/data/videos",
        "subsets": ["0_30_s_nextqa"],  # kept from the YAML: mappings merge
        "max_samples": None,  # the maker's Kwargs defaults are filled in
        "fps": 1.0,
    }
    assert resolve_config(cfg) is cfg


def test_three_documented_override_forms_visible_in_printed_config(plugins: None) -> None:
    cfg = load_config(
        [EXAMPLE],
        [
            "train.global_batch_size=8",
            "dataset.maker_name",
            "make_llava_video_178k_dataset",
            "dataset.maker_kwargs",
            '{"video_root_path":"/data/videos"}',
        ],
    )
    printed = yaml.safe_load(config_to_yaml(cfg))
    assert printed["train"]["global_batch_size"] == 8
    assert printed["dataset"]["maker_name"] == "make_llava_video_178k_dataset"
    assert printed["dataset"]["maker_kwargs"]["video_root_path"] == "/data/videos"


def test_yaml_round_trip_is_exact(plugins: None, tmp_path: Path) -> None:
    cfg = load_config([VIDEO], ["dataset.maker_kwargs.video_root_path=/v", "peft.method=lora", "peft.use_dora=true"])
    out = tmp_path / "run_config.yaml"
    out.write_text(config_to_yaml(cfg))
    again = load_config([out], [])
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again == cfg


def test_defaults_are_the_recipe() -> None:
    cfg = load_config([], [], validate_plugins=False)
    assert cfg.model.tensor_model_parallel_size == 4 and cfg.model.pipeline_model_parallel_size == 1
    assert (cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (2000, 32, 1)
    assert (cfg.validation.eval_interval, cfg.validation.eval_iters) == (500, 0)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.adam_beta2) == (2e-5, 2e-6, 0.95)
    assert cfg.scheduler.lr_decay_style == "cosine" and cfg.scheduler.lr_warmup_iters == 5
    assert cfg.scheduler.start_weight_decay == cfg.scheduler.end_weight_decay == 0.033
    assert cfg.checkpoint.save_interval == 200 and cfg.checkpoint.most_recent_k == -1
    assert cfg.rng.seed == 1234 and cfg.logger.log_interval == 10
    assert cfg.ddp.average_in_collective is False and cfg.ddp.use_distributed_optimizer is True
    assert (cfg.peft.dim, cfg.peft.alpha, cfg.peft.dropout_position) == (16, 32, "pre")
    assert cfg.dataset.pad_to_multiple_of == 128 and cfg.dataset.num_workers == 2
    assert cfg.mixed_precision == "bf16_mixed"


def test_layers_base_then_files_then_overrides(plugins: None, tmp_path: Path) -> None:
    second = tmp_path / "second.yaml"
    second.write_text("train:\n  train_iters: 7\noptimizer:\n  lr: 1.0e-3\n")
    base = {"train": {"train_iters": 1, "micro_batch_size": 2}, "model": {"tensor_model_parallel_size": 2}}
    cfg = load_config([EXAMPLE, second], ["optimizer.lr=3e-4"], base=base)
    assert cfg.train.train_iters == 7  # second file beats the first file beats the base
    assert cfg.train.micro_batch_size == 1  # the example file beats the base
    assert cfg.model.tensor_model_parallel_size == 2  # only the base sets it
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # the command line wins


def test_switching_maker_drops_the_previous_makers_kwargs(plugins: None) -> None:
    base = {"dataset": {"maker_name": "make_llava_video_178k_dataset", "maker_kwargs": {"video_root_path": "/v"}}}
    cfg = load_config([], ["dataset.maker_name=raven"], base=base)
    assert cfg.dataset.maker_kwargs == {}


# -- override parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train.global_batch_size=8"], [("train.global_batch_size", 8)]),
        (["dataset.maker_name", "make_raven_dataset"], [("dataset.maker_name", "make_raven_dataset")]),
        (["dataset.maker_kwargs", '{"video_root_path":"/data/videos"}'],
         [("dataset.maker_kwargs", {"video_root_path": "/data/videos"})]),
        (["dataset.maker_kwargs={video_root_path:/data/videos}"],
         [("dataset.maker_kwargs", {"video_root_path": "/data/videos"})]),
        (['dataset.maker_kwargs={path:"/x"}'], [("dataset.maker_kwargs", {"path": "/x"})]),
        (["d.k={url: http://h:80/a, n: 3, l: [1, 'b,c'], e: {}}"],
         [("d.k", {"url": "http://h:80/a", "n": 3, "l": [1, "b,c"], "e": {}})]),
        (["optimizer.lr=2e-5", "a.b=1.5", "a.c=true", "a.d=null", "a.e=~", "a.f='8'"],
         [("optimizer.lr", 2e-5), ("a.b", 1.5), ("a.c", True), ("a.d", None), ("a.e", None), ("a.f", "8")]),
        (["+peft.use_dora=true", "++train.train_iters=3", "~checkpoint.save"],
         [("peft.use_dora", True), ("train.train_iters", 3), ("checkpoint.save", DELETE)]),
        (["checkpoint.most_recent_k", "-1", "x.y=a=b"], [("checkpoint.most_recent_k", -1), ("x.y", "a=b")]),
        (["x.y="], [("x.y", "")]),
    ],
)
def test_parse_overrides_forms(argv: list[str], expected: list[tuple[str, Any]]) -> None:
    assert [tuple(o) for o in parse_overrides(argv)] == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train.global_batch_size"], "has no value"),
        (["--bogus"], "unknown option '--bogus'"),
        (["not a key=1"], "expected KEY=VALUE"),
        (["a.b={x: 1"], "cannot parse value"),
        (["a.b=[1, 2"], "cannot parse value"),
        (["a.b='open"], "unterminated string"),
    ],
)
def test_parse_overrides_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_overrides(argv)


def test_parse_value_keeps_plain_text() -> None:
    assert parse_value("a: b") == "a: b"
    assert parse_value("/data/videos") == "/data/videos"
    assert parse_value("1e3") == 1000.0 and parse_value("12") == 12


# -- errors name the key and suggest --------------------------------------------------------------------
def test_mistyped_key_suggests_closest(plugins: None) -> None:
    msg = err([EXAMPLE], ["train.global_batch_sise=8"])
    assert "train.global_batch_sise: unknown key (did you mean 'train.global_batch_size'?)" in msg
    assert "from the command line" in msg


def test_key_in_wrong_section_points_to_the_right_one(plugins: None) -> None:
    assert "did you mean 'optimizer.lr'?" in err([], ["train.lr=1e-4"])


def test_unknown_section_and_key_in_file_name_the_file(plugins: None, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  train_iters: 3\n")
    msg = err([bad], [])
    assert "trian: unknown section (did you mean 'train'?)" in msg and str(bad) in msg
    bad.write_text("optimizer:\n  learning_rate: 3\n")
    assert "optimizer.learning_rate: unknown key" in err([bad], [])


def test_wrong_types_fail_naming_key_and_source(plugins: None, tmp_path: Path) -> None:
    assert "train.global_batch_size: expected int, got 'eight'" in err([], ["train.global_batch_size=eight"])
    assert "expected int, got 8.5" in err([], ["train.train_iters=8.5"])
    assert "expected bool" in err([], ["model.freeze_language_model=maybe"])
    bad = tmp_path / "types.yaml"
    bad.write_text("optimizer:\n  lr: fast\n")
    msg = err([bad], [])
    assert "optimizer.lr: expected float, got 'fast'" in msg and str(bad) in msg
    assert "did you mean 'cosine'?" in err([], ["scheduler.lr_decay_style=cosin"])
    assert "train.train_iters: train is a value" not in err([], ["train.train_iters.x=1"])
    assert "is a value, not a mapping" in err([], ["train.train_iters.x=1"])


def test_alias_and_canonical_name_in_one_layer_conflict(plugins: None, tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text("dataset:\n  sequence_length: 4096\n  seq_length: 8192\n")
    assert "same setting" in err([both], [])
    later = load_config([EXAMPLE], ["dataset.seq_length=1024"])  # a later layer may use the other name
    assert later.dataset.seq_length == 1024


def test_reset_with_tilde_restores_default(plugins: None) -> None:
    cfg = load_config([EXAMPLE], ["~rng.seed", "~checkpoint.save"])
    assert cfg.rng.seed == 1234 and cfg.checkpoint.save is None
    assert missing_keys(cfg) == []


def test_null_section_means_defaults(plugins: None) -> None:
    cfg = load_config([], ["peft.method=lora", "peft=null"])
    assert cfg.peft.method is None


# -- plugin-owned sections -----------------------------------------------------------------------------
def test_maker_kwargs_validated_against_maker_schema(plugins: None) -> None:
    msg = err([VIDEO], ["dataset.maker_kwargs.video_root=/x"])
    assert "dataset.maker_kwargs.video_root: unknown key (did you mean 'dataset.maker_kwargs.video_root_path'?)" in msg
    assert "expected int | null, got 'many'" in err([VIDEO], ["dataset.maker_kwargs.max_samples=many"])
    assert "fps must be positive" in err([VIDEO], ["dataset.maker_kwargs={video_root_path: /v, fps: -1}"])
    assert "dataset.val_maker_kwargs.sbusets: unknown key (did you mean" in err(
        [VIDEO], ["dataset.val_maker_kwargs={sbusets: x}"]
    )
    # a maker without a schema takes any kwargs
    assert load_config([EXAMPLE], ["dataset.maker_kwargs.anything=1"]).dataset.maker_kwargs == {"anything": 1}


def test_maker_required_kwarg_left_out_is_mandatory(plugins: None) -> None:
    cfg = load_config([], ["dataset.maker_name=llava_video_178k"])
    assert missing_keys(cfg) == ["dataset.maker_kwargs.video_root_path"]


def test_unknown_maker_lists_known_ones(plugins: None) -> None:
    msg = err([], ["dataset.maker_name=make_raven_datset"])
    assert "dataset.maker_name: unknown dataset_maker 'make_raven_datset' (did you mean 'make_raven_dataset'?)" in msg
    assert "known:" in msg


def test_peft_method_config_fields(plugins: None) -> None:
    cfg = load_config([], ["peft.method=lora", "peft.use_dora=true", "peft.dim=8"])
    assert cfg.peft.dim == 8 and cfg.peft.options == {"use_dora": True, "lora_plus_ratio": None}
    assert config_to_dict(cfg)["peft"]["use_dora"] is True  # printed flat, as written
    assert "peft.use_dorra: unknown key (did you mean 'peft.use_dora'?)" in err(
        [], ["peft.method=lora", "peft.use_dorra=1"])
    assert "peft.use_dora: unknown key" in err([], ["peft.use_dora=true"])  # no method selected
    assert "unknown peft_method 'lorra'" in err([], ["peft.method=lorra"])
    assert "'dropout_position' must be in ['pre']" in err([], ["peft.method=lora", "peft.dropout_position=post"])
    # WSD needs the length of its final decay
    assert "scheduler.lr_decay_style=WSD needs scheduler.lr_wsd_decay_iters" in err(
        [], ["scheduler.lr_decay_style=WSD"])
    assert load_config([], ["scheduler.lr_decay_style=WSD",
                            "scheduler.lr_wsd_decay_iters=10"]).scheduler.lr_wsd_decay_iters == 10
    # precision: mixed_precision decides; an optimizer.bf16=false it would override is refused
    assert "optimizer.bf16=False has no effect: mixed_precision=bf16_mixed" in err([], ["optimizer.bf16=false"])
    assert load_config([], ["optimizer.bf16=false", "mixed_precision=fp32"]).optimizer.bf16 is False
    assert load_config([], ["optimizer.bf16=false", "mixed_precision=null"]).mixed_precision is None
    # no method: a peft setting would be ignored, so it is refused
    assert "peft.dropout_position='post' has no effect: peft.method is null" in err([], ["peft.dropout_position=post"])


def test_logger_and_bridge_names_checked(plugins: None) -> None:
    assert "unknown logger 'consol' (did you mean 'console'?)" in err([], ["logger.loggers=[consol]"])
    assert load_config([], ["logger.loggers=console"]).logger.loggers == ["console"]
    assert "model.bridge: unknown model_bridge 'nemotron'" in err([], ["model.bridge=nemotron"])


def test_resolve_rejects_unsupported_settings(plugins: None) -> None:
    # unsupported values are refused when the config is loaded (nvlcore.config.refused)...
    for override, key in [
        ("model.pipeline_model_parallel_size=2", "model.pipeline_model_parallel_size"),
        ("dist.use_torch_fsdp2=true", "dist.use_torch_fsdp2"),
    ]:
        assert f"{key}=" in err([], [override]) and "is not supported by nvl" in err([], [override])
    # ...and a config built by hand is checked again by resolve_config
    cfg = load_config([], [])
    cfg.model.pipeline_model_parallel_size = 2
    with pytest.raises(ConfigError, match=r"model\.pipeline_model_parallel_size=2 is not supported"):
        resolve_config(cfg)
    cfg = load_config([], ["train.micro_batch_size=2", "train.global_batch_size=3"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        resolve_config(cfg)


def test_base_may_be_an_nvlconfig(plugins: None) -> None:
    base = load_config([], ["train.train_iters=5"])
    assert load_config([], [], base=config_to_dict(base)).train.train_iters == 5
    assert isinstance(load_config([], []), NvlConfig)


def test_overrides_as_parsed_pairs(plugins: None) -> None:
    cfg = load_config([], [Override("train.train_iters", 9)])
    assert cfg.train.train_iters == 9
    assert load_config([], [("dataset.maker_kwargs", {"a": 1}), ("rng.seed", 5)]).rng.seed == 5
    with pytest.raises(TypeError, match="not a mix"):
        load_config([], ["rng.seed=1", ("rng.seed", 2)])


def test_missing_file_named(plugins: None, tmp_path: Path) -> None:
    assert "does not exist" in err([tmp_path / "nope.yaml"], [])
    (tmp_path / "list.yaml").write_text("- a\n")
    assert "must hold a mapping" in err([tmp_path / "list.yaml"], [])


# -- the CLI --------------------------------------------------------------------------------------------
def test_cli_config_show_prints_overrides(plugins: None, nvl_cli: Any) -> None:
    result = nvl_cli(
        "config", "show", "-c", str(VIDEO),
        "train.global_batch_size=8",
        "dataset.maker_name", "make_llava_video_178k_dataset",
        "dataset.maker_kwargs", '{"video_root_path":"/data/videos"}',
        "checkpoint.most_recent_k", "-1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["global_batch_size"] == 8
    assert shown["dataset"]["maker_kwargs"]["video_root_path"] == "/data/videos"
    assert shown["checkpoint"]["most_recent_k"] == -1


def test_cli_config_show_errors_are_usage_errors(plugins: None, nvl_cli: Any) -> None:
    result = nvl_cli("config", "show", "-c", str(EXAMPLE), "train.global_batch_sise=8")
    assert result.exit_code == 2
    assert "did you mean 'train.global_batch_size'?" in result.output
    result = nvl_cli("config", "show", "-c", str(EXAMPLE), "--check")
    assert result.exit_code == 2 and "checkpoint.save" in result.output
    assert nvl_cli("config", "show", "-c", str(EXAMPLE), "--check", "checkpoint.save=/x").exit_code == 0


def test_cli_config_keys(nvl_cli: Any) -> None:
    result = nvl_cli("config", "keys", "optimizer")
    assert result.exit_code == 0 and "optimizer.lr" in result.output and "2e-05" in result.output
    result = nvl_cli("config", "keys", "optimiser")
    assert result.exit_code == 2 and "did you mean 'optimizer'?" in result.output


def test_config_doc_is_generated_from_the_schema() -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "gen_config_docs.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_documented_forms_through_a_real_shell(tmp_path: Path) -> None:
    """What bash actually passes for the documented command lines (it eats the double quotes)."""
    import json as _json
    import shutil
    import subprocess
    import sys

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = tmp_path / "show.py"
    script.write_text(
        "import sys, json\nfrom nvlcore.config import parse_overrides\n"
        "print(json.dumps([list(o) for o in parse_overrides(sys.argv[1:])]))\n"
    )
    line = (
        f"{sys.executable} {script} train.global_batch_size=8 dataset.maker_name make_raven_dataset "
        'dataset.maker_kwargs {"video_root_path":"/data/videos"} '
        'dataset.val_maker_kwargs={"video_root_path":$VIDEO_ROOT} '
        "'dataset.test_maker_kwargs={path:\"/x\"}'"
    )
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                          env={"VIDEO_ROOT": "/v/root", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert _json.loads(done.stdout) == [
        ["train.global_batch_size", 8],
        ["dataset.maker_name", "make_raven_dataset"],
        ["dataset.maker_kwargs", {"video_root_path": "/data/videos"}],
        ["dataset.val_maker_kwargs", {"video_root_path": "/v/root"}],
        ["dataset.test_maker_kwargs", {"path": "/x"}],
    ]


def test_coerce_handles_abstract_and_tuple_types() -> None:
    from collections.abc import Mapping, Sequence
    from typing import Literal

    from nvlcore.config.structure import coerce

    assert coerce(["a", "b"], Sequence[str], "k") == ["a", "b"]
    assert coerce(("a",), tuple[str, ...], "k") == ("a",)
    assert coerce({"x": "3"}, Mapping[str, int], "k") == {"x": 3}
    assert coerce("a", list[str], "k") == ["a"]  # one string for a list field
    assert coerce("2e-5", float, "k") == 2e-5 and coerce("yes", bool, "k") is True
    assert coerce("x", str | list[str], "k") == "x" and coerce(["x"], str | list[str], "k") == ["x"]
    assert coerce("/p", Path, "k") == Path("/p") and coerce("???", int, "k") == "???"
    with pytest.raises(ConfigError, match=r"k\[1\]: expected int, got 'x'"):
        coerce([1, "x"], list[int], "k")
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        coerce("cosin", Literal["cosine", "linear"] | None, "k")
    with pytest.raises(ConfigError, match="expected int, got True"):
        coerce(True, int, "k")


def test_config_options_decorator_for_other_commands(plugins: None, tmp_path: Path) -> None:
    """The plumbing `nvl finetune` reuses: -c (repeatable), --print-config, space-separated overrides."""
    import click
    from click.testing import CliRunner

    from nvlcore.cli.options import CONFIG_CONTEXT_SETTINGS, config_options, echo_config, load_config_from_cli

    @click.command(context_settings=CONFIG_CONTEXT_SETTINGS)
    @config_options()
    def run(config_files: tuple[Path, ...], print_config: bool, overrides: tuple[str, ...]) -> None:
        cfg = load_config_from_cli(config_files, overrides, resolve=not print_config)
        if print_config:
            echo_config(cfg)
            return
        click.echo(f"training {cfg.train.train_iters} iters into {cfg.checkpoint.save}")

    more = tmp_path / "more.yaml"
    more.write_text("train:\n  train_iters: 3\n")
    runner = CliRunner()
    shown = runner.invoke(run, ["-c", str(EXAMPLE), "-c", str(more), "--print-config", "rng.seed", "7"])
    assert shown.exit_code == 0, shown.output
    printed = yaml.safe_load(shown.stdout)
    assert printed["train"]["train_iters"] == 3 and printed["rng"]["seed"] == 7
    assert printed["checkpoint"]["save"] == "???"  # printing does not require mandatory values
    missing = runner.invoke(run, ["-c", str(EXAMPLE)])
    assert missing.exit_code == 2 and "checkpoint.save" in missing.output
    ok = runner.invoke(run, ["-c", str(EXAMPLE), "checkpoint.save", "/ck", "train.train_iters=4"])
    assert ok.exit_code == 0 and ok.stdout.strip() == "training 4 iters into /ck"
    assert runner.invoke(run, ["--config-file", str(tmp_path / "nope.yaml")]).exit_code == 2


def test_cli_config_show_says_core_defaults_and_shows_the_recipe_with_a_model(tmp_path: Path) -> None:
    """Issue 17 item 14: `config show` matches `finetune --print-config` when given the model."""
    from nvl_nemotron_vl.toy import write_toy_checkpoint
    from nvlcore.cli import build_cli

    runner = click.testing.CliRunner()
    plain = runner.invoke(build_cli(), ["config", "show"])
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("# nvlcore's defaults (no --hf-model-path)")
    assert yaml.safe_load(plain.stdout)["rng"]["seed"] == 1234
    toy = write_toy_checkpoint(tmp_path / "toy", "tiny", seed=0)
    shown = runner.invoke(build_cli(), ["config", "show", "--hf-model-path", str(toy), "train.train_iters=7"])
    assert shown.exit_code == 0, shown.output
    printed = runner.invoke(build_cli(),
                            ["finetune", "--hf-model-path", str(toy), "--print-config", "train.train_iters=7"])
    assert printed.exit_code == 0, printed.output
    a, b = yaml.safe_load(shown.stdout), yaml.safe_load(printed.stdout)
    assert a == b and a["rng"]["seed"] == 42 and a["dataset"]["maker_name"] == "make_raven_dataset"
    assert a["train"]["train_iters"] == 7


def test_a_bare_off_is_the_choice_off_not_a_bool(plugins: None) -> None:
    """YAML 1.1 reads `off` as False: a choice key that has "off" among its values takes it as that choice
    (`train.memory_plan=off` failed with "False is not one of 'off', 'check', 'auto'")."""
    assert load_config([EXAMPLE], ["train.memory_plan=off"]).train.memory_plan == "off"
    assert load_config([EXAMPLE], ['train.memory_plan="off"']).train.memory_plan == "off"
    with pytest.raises(Exception, match="is not one of"):  # a bool where no choice is "off"/"on" stays refused
        load_config([EXAMPLE], ["dataset.packing=yes"])
