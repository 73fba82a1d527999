"""The original workflow's command lines, verbatim (issue 12 §3, issue 17 §12): underscore spellings,
the scripts' other spellings, the same spellings on every command, dash-like characters, Hub ids,
and a fuzz test of the override parser."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nvlcore.cli import build_cli
from nvlcore.config import ConfigError
from nvlcore.config.overrides import parse_overrides


@pytest.fixture(scope="module")
def cli() -> click.Group:
    return build_cli()


@pytest.fixture()
def paths(tmp_path: Path) -> dict[str, str]:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    ck = tmp_path / "ck"
    (ck / "iter_0000004").mkdir(parents=True)
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    img2 = tmp_path / "b.png"
    img2.write_bytes(b"x")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    return {"hf": str(hf), "ck": str(ck), "iter": str(ck / "iter_0000004"), "img": str(img), "img2": str(img2),
            "video": str(video), "out": str(tmp_path / "out")}


def parse(cli: click.Group, argv: list[str]) -> dict:
    """The parameters a command line gives, without running the command."""
    cmd: click.Command = cli
    ctx = None
    args = list(argv)
    while isinstance(cmd, click.Group):
        ctx = cmd.make_context(cmd.name or "nvl", args, parent=ctx, resilient_parsing=False)
        name, cmd, args = cmd.resolve_command(ctx, ctx._protected_args + ctx.args)  # type: ignore[attr-defined]
    sub = cmd.make_context(cmd.name or "", args, parent=ctx)
    return sub.params


def test_original_generate_script_spellings(cli, paths) -> None:
    """hf_to_megatron_generate_nemotron_vlm.py's and hf_to_megatron_generate_vlm.py's flags."""
    p = parse(cli, ["generate", "--hf_model_path", paths["hf"], "--megatron_model_path", paths["ck"],
                    "--image_path", f"{paths['img']},{paths['img2']}", "--prompt", "Hi", "--system_prompt", "",
                    "--max_new_tokens", "7", "--tp", "1", "--pp", "1", "--ep", "1", "--etp", "1"])
    assert p["hf_model_path"] == Path(paths["hf"]) and p["megatron_model_path"] == Path(paths["ck"])
    assert p["image_path"] == f"{paths['img']},{paths['img2']}" and p["max_new_tokens"] == 7
    assert p["system_prompt"] == "" and p["prompt"] == "Hi"
    # the generic script: --use_llava_model (the docs' flag no version had), --image_paths a b, --video_fps
    p = parse(cli, ["generate", "--hf_model_path", paths["hf"], "--use_llava_model", "--trust_remote_code",
                    "--image_paths", paths["img"], paths["img2"], "--max_new_tokens=3"])
    assert p["image_path"] == f"{paths['img']},{paths['img2']}" and p["max_new_tokens"] == 3
    p = parse(cli, ["generate", "--hf_model_path", paths["hf"], "--video_path", paths["video"], "--video_fps", "2.0"])
    assert p["fps"] == 2.0 and p["video_path"] == Path(paths["video"])
    # the same spellings as every other command
    for spelling in ("--hf-model", "--hf-model-id", "--hf_model_id"):
        assert parse(cli, ["generate", spelling, paths["hf"]])["hf_model_path"] == Path(paths["hf"])
    assert parse(cli, ["generate", "--hf-model", paths["hf"], "--megatron-path", paths["ck"]])["megatron_model_path"]


def test_original_convert_spellings(cli, paths) -> None:
    p = parse(cli, ["convert", "import", "--hf-model", paths["hf"], "--megatron-path", paths["out"],
                    "--torch-dtype", "bfloat16", "--device-map", "auto", "--trust-remote-code"])
    assert p["dtype"] == "bfloat16" and p["megatron_path"] == Path(paths["out"])
    p = parse(cli, ["convert", "import", "--hf_model", paths["hf"], "--megatron_path", paths["out"], "-tp", "2",
                    "--low-memory-save", "--torch_dtype=float32"])
    assert p["tp"] == 2 and p["dtype"] == "float32"
    p = parse(cli, ["convert", "export", "--hf-model", paths["hf"], "--megatron-path", paths["ck"], "--hf-path",
                    paths["out"], "--not-strict", "--no-progress", "--trust-remote-code", "--export-weight-dtype",
                    "bfloat16", "--distributed-save", "--save-every-n-ranks", "1", "-tp", "1"])
    assert p["not_strict"] and p["no_progress"] and p["dtype"] == "bfloat16" and p["hf_path"] == Path(paths["out"])
    # the spellings of the other commands
    p = parse(cli, ["convert", "export", "--hf-model-path", paths["hf"], "--megatron-model-path", paths["ck"],
                    "--output", paths["out"]])
    assert p["hf_model"] == Path(paths["hf"]) and p["megatron_path"] == Path(paths["ck"])


def test_original_merge_and_adapter_export_spellings(cli, paths) -> None:
    p = parse(cli, ["peft", "merge", "--lora-checkpoint", paths["iter"], "--output", paths["out"], "--hf-model-path",
                    paths["hf"], "--pretrained", paths["ck"], "--tp", "1", "--pp", "1", "--ep", "1", "--cpu",
                    "--debug"])
    assert p["lora_checkpoint"] == Path(paths["iter"]) and p["pretrained"] == Path(paths["ck"]) and p["_debug"]
    p = parse(cli, ["peft", "merge", "--lora_checkpoint", paths["iter"], "--hf-path", paths["out"], "--hf_model",
                    paths["hf"], "--pretrained-checkpoint", paths["ck"]])
    assert p["output"] == Path(paths["out"]) and p["hf_model_path"] == Path(paths["hf"])
    p = parse(cli, ["export", "--format", "hf-peft", "--hf-model-path", paths["hf"], "--lora-checkpoint", paths["ck"],
                    "--output", paths["out"], "--trust-remote-code", "--dtype", "float32", "--tp", "1"])
    assert p["dtype"] == "float32" and p["checkpoint"] == Path(paths["ck"])


def test_original_finetune_spellings(cli, paths) -> None:
    p = parse(cli, ["finetune", "--hf_model_path", paths["hf"], "--pretrained_checkpoint", paths["ck"],
                    "--lora_on_language_model", "--config_file", paths["hf"] + "/config.json",
                    "dataset.maker_name=make_raven_dataset", "model.freeze_language_model=True"])
    assert p["lora_on_language_model"] and p["pretrained_checkpoint"] == paths["ck"]
    assert p["overrides"] == ("dataset.maker_name=make_raven_dataset", "model.freeze_language_model=True")
    for spelling in ("--pretrained", "--megatron-path", "--megatron-model-path"):
        assert parse(cli, ["finetune", "--hf-model", paths["hf"], spelling, paths["ck"]])["pretrained_checkpoint"]


@pytest.mark.parametrize("argv,suggest", [
    (["finetune", "--hf-model-path", "X", "—-lora-on-vision-model"], "--lora-on-vision-model"),
    (["finetune", "—lora-on-vision-model"], "--lora-on-vision-model"),
    (["finetune", "\u2013\u2013lora-on-language-model"], "--lora-on-language-model"),
    (["generate", "\u2212\u2212max-new-tokens", "3"], "--max-new-tokens"),
    (["convert", "import", "—-hf-model", "x"], "--hf-model"),
    (["peft", "merge", "—-lora-checkpoint", "x"], "--lora-checkpoint"),
    (["finetune", "\u2014dataset.maker_name=raven"], "dataset.maker_name=raven"),
])
def test_dash_like_characters_give_one_line_with_what_to_type(cli, argv, suggest) -> None:
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"did you mean {suggest}?" in errors[0], res.output
    assert "Traceback" not in res.output


def test_dash_like_override_in_the_parser_itself() -> None:
    with pytest.raises(ConfigError, match="did you mean --lora-on-vision-model"):
        parse_overrides(["—-lora-on-vision-model"])


def test_malformed_override_prints_one_line_not_a_traceback(tmp_path) -> None:
    for bad in (["train.lr=[1,"], ["model.x={a:"], ["=3"], ["a..b=1"], ["-3"], ["x='unterminated"]):
        res = CliRunner().invoke(build_cli(), ["config", "show", *bad])
        assert res.exit_code == 2 and "Traceback" not in res.output, (bad, res.output)
        assert sum(line.startswith("Error:") for line in res.output.splitlines()) == 1, res.output


ALPHABET = (list("abcxyz_.=+~-{}[]:,\"' \\/019eE!&*#%|>?@`\t\n") +
            ["\u2014", "\u2013", "é", "\x00", "train.lr", "dataset.maker_kwargs=", "2001-13-45", "1:2:3",
             "!!python/object:os.system", "[[", "{a:", "null", "~", "++", "0x1F", ".inf", "1e400", "&a *a", "<<: "])


def test_fuzz_override_parser_parses_or_raises_the_config_error() -> None:
    """A few thousand random command lines: each parses, or raises ConfigError (which the CLI prints as
    one line); any other exception is a bug (the first run found an IndexError on 'a=[' and a
    ValueError on a date-shaped value such as 2001-13-45)."""
    rng = random.Random(12)
    parsed = refused = 0

    def token() -> str:
        noise = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 10)))
        if rng.random() < 0.5:  # a well-formed key with a random value: reaches the value parser
            return rng.choice(["train.lr", "dataset.maker_kwargs", "+peft.dim", "~a.b", "x"]) + rng.choice("= ") + noise
        return noise

    for _ in range(5000):
        argv = [t for part in (token() for _ in range(rng.randint(1, 3))) for t in part.split(" ", 1)]
        try:
            parse_overrides(argv)
            parsed += 1
        except ConfigError as exc:
            assert "\n" not in str(exc).strip() or "\n" in "".join(argv), (argv, str(exc))
            refused += 1
        except Exception as exc:  # pragma: no cover - the point of the test
            pytest.fail(f"parse_overrides({argv!r}) raised {type(exc).__name__}: {exc}")
    assert parsed > 100 and refused > 100  # both outcomes exercised


def test_deep_nesting_is_a_config_error() -> None:
    for text in ("[" * 5000, "{a:" * 5000):
        with pytest.raises(ConfigError, match="nested too deeply"):
            parse_overrides([f"x={text}"])


# ----------------------------------------------------------------------------------- Hub ids
def _hub_cache(root: Path, repo: str, commit: str, files: dict[str, str], refs: tuple[str, ...] = ("main",)) -> Path:
    """The Hugging Face cache layout: models--owner--name/{refs/<ref>, snapshots/<commit>/...}."""
    base = root / "hub" / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    (base / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (base / "refs" / ref).write_text(commit)
    return snap


def _nvl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvlcore", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_hub_ids_resolve_from_the_cache_offline(tmp_path: Path) -> None:
    """`nvl data preview --hf-model-path OWNER/NAME` and `nvl convert import --hf-model OWNER/NAME` with
    HF_HOME pointing at a pre-populated cache and HF_HUB_OFFLINE=1: no network, the cached snapshot is
    used; --revision picks another snapshot; an id that is not cached is one line that says what to do."""
    pytest.importorskip("nvl_nemotron_vl")
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    toy = Path(write_toy_checkpoint(tmp_path / "toy", "tiny", seed=1))
    hf_home = tmp_path / "hf_home"
    main = "a" * 40
    snap = _hub_cache(hf_home, "nvidia/Toy-VL", main, {})
    for f in toy.iterdir():
        os.symlink(f, snap / f.name) if f.is_file() else None
    other = "b" * 40
    _hub_cache(hf_home, "nvidia/Toy-VL", other, {"config.json": "{not json"}, refs=("v0",))
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

    out = tmp_path / "ckpt"
    proc = _nvl("convert", "import", "--hf_model", "nvidia/Toy-VL", "--megatron-path", str(out), "--no-progress",
                env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "iter_0000000").is_dir()

    proc = _nvl("data", "preview", "synthetic_shapes", "-n", "1", "--json", "--hf-model-id", "nvidia/Toy-VL",
                "--revision", main, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["num_tokens"] > 0

    # --revision v0 is the other (broken) snapshot: its config.json is what gets read
    proc = _nvl("data", "preview", "synthetic_shapes", "-n", "1", "--hf-model-path", "nvidia/Toy-VL", "--revision",
                "v0", env=env)
    assert proc.returncode != 0 and other in proc.stderr and "Traceback" not in proc.stderr

    for args in (["--hf-model-path", "nvidia/Not-Cached"], ["--hf-model-path", "nvidia/Toy-VL", "--revision", "v9"]):
        proc = _nvl("data", "preview", "synthetic_shapes", "-n", "1", *args, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        err = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(err) == 1 and "HF_HUB_OFFLINE" in err[0] and "huggingface-cli download" in err[0], proc.stderr


def test_a_local_directory_wins_and_nonsense_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from nvlcore.hub import HubResolutionError, resolve_hf_model

    d = tmp_path / "owner" / "name"
    d.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_hf_model("owner/name") == Path("owner/name")  # a directory, never a Hub lookup
    with pytest.raises(HubResolutionError, match="--revision applies to a Hub id only"):
        resolve_hf_model("owner/name", revision="main")
    with pytest.raises(HubResolutionError, match="not a Hugging Face Hub id"):
        resolve_hf_model("no/such/dir/here")


def test_global_options_and_per_command_ones(cli) -> None:
    res = CliRunner().invoke(cli, ["--help"])
    assert "--debug" in res.output and "--quiet" in res.output and "--no-progress" in res.output
    seen = {}

    @click.command("probe")
    def probe() -> None:
        from nvlcore.flags import global_flag

        seen.update({n: global_flag(n) for n in ("debug", "quiet", "no_progress")})

    cli.add_command(probe)
    try:
        assert CliRunner().invoke(cli, ["--quiet", "--debug", "probe"]).exit_code == 0
        assert seen == {"debug": True, "quiet": True, "no_progress": True}
        assert CliRunner().invoke(cli, ["--no_progress", "probe"]).exit_code == 0
        assert seen == {"debug": False, "quiet": False, "no_progress": True}
        assert "NVL_QUIET" not in os.environ  # restored after the command
    finally:
        cli.commands.pop("probe")


def test_global_debug_shows_the_traceback_quiet_hides_notes(cli, paths) -> None:
    argv = ["convert", "import", "--hf-model", paths["hf"], "--megatron-path", paths["out"]]
    plain = CliRunner().invoke(cli, argv)
    assert plain.exit_code == 1 and "architectures" in plain.output and isinstance(plain.exception, SystemExit)
    debug = CliRunner().invoke(cli, ["--debug", *argv])
    assert debug.exit_code == 1 and debug.exception is not None and not isinstance(debug.exception, SystemExit)
    assert "architectures" in str(debug.exception)


def test_option_values_and_prompts_may_start_with_a_dash(cli, paths) -> None:
    p = parse(cli, ["generate", "--hf_model_path", paths["hf"], "--prompt", "— what is this?", "--system_prompt",
                    "—-not-an-option"])
    assert p["prompt"] == "— what is this?" and p["system_prompt"] == "—-not-an-option"
    p = parse(cli, ["generate", "--hf-model-path", paths["hf"], "--prompt", "--max_new_tokens"])
    assert p["prompt"] == "--max_new_tokens" and p["max_new_tokens"] == 100
