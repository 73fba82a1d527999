#!/usr/bin/env python3
"""Benchmark `nvl convert import/export` on a toy checkpoint, beside the disk's own sequential speed.

Self-contained: run from the repository root (nvlcore and the nvl-nemotron-vl plugin are put on
sys.path). Needs torch, safetensors, tokenizers, tqdm (transformers brings them), pyyaml and pluggy
(``pip install --no-index --find-links .whl pluggy pyyaml`` if missing; checked before any work);
megatron-core, datasets and a GPU are not used. Run time at 12b-shape: a few minutes (disk-bound);
disk: about 2.1x the toy (~55 GB) in --low-disk mode, chosen automatically when space is short.

    python bench/convert_gpu_machine.py --size 12b-shape --out $OUT/convert_12b.md      # H200 host
    python bench/convert_gpu_machine.py --size small --toy model --disk-test-gb 0.5 --out bench/results/x.md

Steps (each timed; the record is written to --out as markdown plus a .json beside it):

1. machine facts and free disk; refuses to start when the work dir cannot hold the run;
2. the disk's sequential write and read speed: a --disk-test-gb file written and read back with
   O_DIRECT (page cache bypassed; falls back to buffered I/O + fsync + fadvise(DONTNEED) where
   O_DIRECT is refused, and says so);
3. the toy HF checkpoint: `--toy model` runs the model plugin's own writer (random init, slow at 12B:
   ~35 M elements/s/core); `--toy fast` (default for 12b-shape) writes the same config.json,
   tokenizer and side files and the same keys/shapes/dtypes, with values sliced from a 256 MB pool
   of random bf16/fp32 numbers at a different offset per tensor, streamed through nvl's sharded
   safetensors writer (bounded memory, disk-speed);
4. the interpreter baseline: peak RSS of a child that imports everything the conversion imports;
5. import (child process under /usr/bin/time -v; the toy's pages evicted first so it is read from
   disk): seconds, GB/s, peak RSS, against the largest tensor group;
6. export (the checkpoint's pages evicted first) -- with `--low-disk` (automatic when free space is
   short) the toy's weights are deleted after import and export runs from the tensor inventory the
   import recorded, exactly like exporting with a config-only reference directory;
7. verification: the exported key set, shapes and dtypes equal the source's, and the raw bytes of a
   sample of tensors (every fused kind, the carried RADIO buffers, the largest tensors; all tensors
   for toys under 2 GB) hash identically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "nvl-nemotron-vl"
for p in (str(PLUGIN), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(PLUGIN), os.environ.get("PYTHONPATH", "")]),
           PYTHONWARNINGS="ignore")
GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- toy


def hf_inventory(cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every HF key of the model described by ``cfg`` with shape and dtype, from the published layout
    (model-format reference section 2), independently of the model code."""
    llm, vis = cfg.llm, cfg.vision
    H, V = llm.hidden_size, llm.vocab_size
    inv: dict[str, tuple[tuple[int, ...], str]] = {}
    lm = "language_model.backbone."
    inv[lm + "embeddings.weight"] = ((V, H), "bfloat16")
    gn = llm.n_groups * llm.ssm_state_size
    di = llm.mamba_num_heads * llm.mamba_head_dim
    for i, kind in enumerate(llm.layer_types):
        p = f"{lm}layers.{i}."
        inv[p + "norm.weight"] = ((H,), "bfloat16")
        m = p + "mixer."
        if kind == "mamba":
            inv[m + "in_proj.weight"] = ((2 * di + 2 * gn + llm.mamba_num_heads, H), "bfloat16")
            inv[m + "conv1d.weight"] = ((di + 2 * gn, 1, llm.conv_kernel), "bfloat16")
            if llm.use_conv_bias:
                inv[m + "conv1d.bias"] = ((di + 2 * gn,), "bfloat16")
            inv[m + "A_log"] = ((llm.mamba_num_heads,), "float32")
            inv[m + "D"] = ((llm.mamba_num_heads,), "float32")
            inv[m + "dt_bias"] = ((llm.mamba_num_heads,), "bfloat16")
            inv[m + "norm.weight"] = ((di,), "bfloat16")
            inv[m + "out_proj.weight"] = ((H, di), "bfloat16")
        elif kind == "attention":
            q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
            inv[m + "q_proj.weight"] = ((q, H), "bfloat16")
            inv[m + "k_proj.weight"] = ((kv, H), "bfloat16")
            inv[m + "v_proj.weight"] = ((kv, H), "bfloat16")
            inv[m + "o_proj.weight"] = ((H, q), "bfloat16")
        else:
            inv[m + "up_proj.weight"] = ((llm.intermediate_size, H), "bfloat16")
            inv[m + "down_proj.weight"] = ((H, llm.intermediate_size), "bfloat16")
    inv[lm + "norm_f.weight"] = ((H,), "bfloat16")
    inv["language_model.lm_head.weight"] = ((V, H), "bfloat16")
    r = "vision_model.radio_model."
    D, pg = vis.hidden_size, r + "model.patch_generator."
    inv[r + "input_conditioner.norm_mean"] = ((3, 1, 1), "float32")
    inv[r + "input_conditioner.norm_std"] = ((3, 1, 1), "float32")
    inv[pg + "cls_token.token"] = ((vis.num_prefix_tokens, D), "bfloat16")
    inv[pg + "pos_embed"] = ((1, vis.max_grid**2, D), "bfloat16")
    inv[pg + "embedder.weight"] = ((D, vis.num_channels * vis.patch_size**2), "bfloat16")
    for i in range(vis.num_layers):
        b = f"{r}model.blocks.{i}."
        for n, s in (("norm1.weight", (D,)), ("norm1.bias", (D,)), ("attn.qkv.weight", (3 * D, D)),
                     ("attn.qkv.bias", (3 * D,)), ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)),
                     ("norm2.weight", (D,)), ("norm2.bias", (D,)), ("mlp.fc1.weight", (vis.intermediate_size, D)),
                     ("mlp.fc1.bias", (vis.intermediate_size,)), ("mlp.fc2.weight", (D, vis.intermediate_size)),
                     ("mlp.fc2.bias", (D,))):
            inv[b + n] = (s, "bfloat16")
    P = cfg.projector_input_size
    inv["mlp1.0.weight"] = ((P,), "bfloat16")
    inv["mlp1.1.weight"] = ((cfg.projector_hidden_size, P), "bfloat16")
    inv["mlp1.3.weight"] = ((H, cfg.projector_hidden_size), "bfloat16")
    return inv


def write_fast_toy(out: Path, size: str, seed: int, shard_size: int) -> Path:
    """The toy's files and keys, values from a random pool (see the module docstring)."""
    import torch

    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import _side_files, num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer
    from nvlcore.checkpoint import atomic_output_dir
    from nvlcore.convert.safetensors_io import ShardedSafetensorsWriter

    with atomic_output_dir(out, overwrite=True, what="toy") as tmp:
        ids = write_toy_tokenizer(tmp)
        raw = toy_config(size, ids)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for name, content in _side_files(raw, ids).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        cfg = NemotronVLConfig.from_dict(raw, source=str(out / "config.json"),
                                         num_prefix_tokens=num_prefix_tokens(size))
        inv = hf_inventory(cfg)
        g = torch.Generator().manual_seed(seed)
        pool = {torch.bfloat16: (0.02 * torch.randn(128 * 2**20, generator=g)).to(torch.bfloat16),
                torch.float32: torch.rand(16 * 2**20, generator=g) + 0.5}
        plan = [(k, s, getattr(torch, d)) for k, (s, d) in inv.items()]
        w = ShardedSafetensorsWriter(tmp, plan, max_shard_size=shard_size)
        done = 0
        for i, (k, shape, dtype) in enumerate(plan):
            n = 1
            for s in shape:
                n *= s
            if k.endswith("norm_mean"):
                t = torch.tensor(cfg.norm_mean, dtype=torch.float32).view(3, 1, 1)
            elif k.endswith("norm_std"):
                t = torch.tensor(cfg.norm_std, dtype=torch.float32).view(3, 1, 1)
            else:
                src = pool[dtype]
                off = int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "little") % len(src)
                reps = -(-(off + n) // len(src))
                t = (src if reps == 1 else src.repeat(reps))[off : off + n].view(shape)
            w.write(k, t)
            done += t.numel() * t.element_size()
            if i % 100 == 0:
                log(f"toy: {done / GB:.1f} GB written")
        w.finish()
    return out


# --------------------------------------------------------------------------------------------- disk


def disk_speed(workdir: Path, nbytes: int) -> dict:
    """Sequential write then read of one file, O_DIRECT when the file system allows it."""
    path = workdir / "disk_speed_test.bin"
    chunk = 64 * 2**20
    nbytes = max(chunk, nbytes // chunk * chunk)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(2**20) * (chunk // 2**20))
    res: dict = {"bytes": nbytes}
    direct = hasattr(os, "O_DIRECT")
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o600)
        except OSError:
            direct = False
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t = time.perf_counter()
        try:
            for _ in range(nbytes // chunk):
                os.write(fd, buf)
        except OSError:
            if not direct:
                raise
            os.close(fd)
            direct = False
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            t = time.perf_counter()
            for _ in range(nbytes // chunk):
                os.write(fd, buf)
        os.fsync(fd)
        res["write_s"] = time.perf_counter() - t
        os.close(fd)
        evict([path])
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        t = time.perf_counter()
        got = 0
        while True:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            got += n
        res["read_s"] = time.perf_counter() - t
        os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    res["method"] = "O_DIRECT" if direct else "buffered + fsync, read after fadvise(DONTNEED)"
    res["write_GBps"] = nbytes / GB / res["write_s"]
    res["read_GBps"] = nbytes / GB / res["read_s"]
    return res


def evict(paths) -> None:
    """Drop the files' clean pages from the page cache, so the next read comes from the disk."""
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                except OSError:
                    pass
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            except (OSError, AttributeError):
                pass


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------- children


def child(argv: list[str]) -> None:
    """``_child import HF OUT`` / ``_child export HF CKPT OUT``: one conversion, its summary JSON on the
    last stdout line."""
    from nvlcore.convert.engine import export_hf_checkpoint, import_hf_checkpoint

    mode = argv[0]
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    bridge = NemotronVLBridge.from_hf_dir(argv[1])
    if mode == "import":
        s = import_hf_checkpoint(bridge, argv[1], argv[2], progress=True)
    else:
        s = export_hf_checkpoint(bridge, argv[1], argv[2], argv[3], progress=True)
    print(s.format(), file=sys.stderr)
    print(json.dumps(s.as_dict()))


def run_child(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", *args]
    timer = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
    full = [timer, "-v", *cmd] if timer else cmd
    t = time.perf_counter()
    r = subprocess.run(full, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t
    sys.stderr.write("\n".join(line for line in r.stderr.splitlines() if "\t" not in line) + "\n")
    if r.returncode != 0:
        raise SystemExit(f"child {args[0]} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if m:
        out["time_v_max_rss_bytes"] = int(m.group(1)) * 1024
    out["rss_source"] = "/usr/bin/time -v" if m else "getrusage(RUSAGE_SELF) in the child"
    return out


# --------------------------------------------------------------------------------------------- main


def hash_tensors(hf_dir: Path, keys: list[str]) -> dict[str, str]:
    from nvlcore.convert.safetensors_io import SafetensorsReader

    r = SafetensorsReader(hf_dir)
    out = {}
    for k in keys:
        t = r.read([k])[k]
        out[k] = hashlib.sha256(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
    return out


def sample_keys(inv: dict, total: int) -> list[str]:
    keys = list(inv)
    if total < 2 * GB:
        return keys
    want = [k for k in keys if k.endswith(("norm_mean", "norm_std"))]
    for suffix in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                   "attn.qkv.weight", "attn.qkv.bias", "A_log", "dt_bias", "cls_token.token", "pos_embed"):
        hits = [k for k in keys if k.endswith(suffix)]
        want += hits[:1] + hits[-1:]
    want += ["language_model.backbone.embeddings.weight", "language_model.lm_head.weight", "mlp1.1.weight"]
    return list(dict.fromkeys(k for k in want if k in inv))


def fs_type(path: Path) -> str:
    """The file-system type holding ``path`` (longest mount-point prefix in /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        for line in open("/proc/mounts"):
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def check_deps() -> None:
    missing = []
    for mod in ("torch", "safetensors", "tokenizers", "tqdm", "yaml", "pluggy"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        names = " ".join("pyyaml" if m == "yaml" else m for m in missing)
        raise SystemExit(f"missing Python packages: {', '.join(missing)}; install them first, e.g. "
                         f"`pip install --no-index --find-links <wheel dir> {names}`")


def machine_facts() -> dict:
    import torch

    facts = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
             "torch": torch.__version__, "cpus": os.cpu_count(),
             "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        facts["mem_total_GB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)
    except (ValueError, OSError):
        pass
    try:
        facts["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                  if "model name" in line)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return facts


def markdown(rec: dict) -> str:
    m, d, imp, exp = rec["machine"], rec["disk"], rec["import"], rec["export"]
    rss = lambda r: r.get("time_v_max_rss_bytes", r["peak_rss_bytes"]) / GB  # noqa: E731
    lines = [
        f"# nvl convert on the `{rec['size']}` toy ({m['date_utc']} UTC)",
        "",
        f"Machine: {m.get('cpu_model', '?')} ({m['cpus']} CPUs), {m.get('mem_total_GB', '?')} GB RAM"
        + (f", GPUs: {', '.join(m['gpus'])}" if m.get("gpus") else "") + f"; {m['platform']}; Python {m['python']},"
        f" torch {m['torch']}. Work dir `{rec['workdir']}`.",
        f"Command: `{rec['command']}`",
        "",
        f"Toy: {rec['toy']['bytes'] / GB:.2f} GB of weights, {rec['toy']['tensors']} tensors, written by "
        f"`--toy {rec['toy']['kind']}` in {rec['toy']['seconds']:.1f} s. Largest tensor group (HF side): "
        f"{rec['largest_group_bytes'] / GB:.3f} GB (`{rec['largest_group']}`).",
        "",
        "| step | seconds | GB moved | GB/s | peak RSS (GB) |",
        "|---|---|---|---|---|",
        f"| disk sequential write ({d['method']}) | {d['write_s']:.2f} | {d['bytes'] / GB:.2f} | {d['write_GBps']:.2f} "
        "| |",
        f"| disk sequential read | {d['read_s']:.2f} | {d['bytes'] / GB:.2f} | {d['read_GBps']:.2f} | |",
        f"| baseline: same import of the tiny toy (interpreter + code) | | | | {rec['baseline_rss_bytes'] / GB:.3f} |",
        f"| `nvl convert import` (cold source) | {imp['seconds']:.2f} | {imp['bytes_written'] / GB:.2f} | "
        f"{imp['gb_per_s']:.2f} | {rss(imp):.3f} |",
        f"| `nvl convert export` (cold checkpoint) | {exp['seconds']:.2f} | {exp['bytes_written'] / GB:.2f} | "
        f"{exp['gb_per_s']:.2f} | {rss(exp):.3f} |",
        "",
        f"Seconds are the conversion itself (after Python imports); whole child processes took {imp['wall_s']:.1f} s "
        f"(import) and {exp['wall_s']:.1f} s (export). Load average at the end: {os.getloadavg()[0]:.1f} on "
        f"{m['cpus']} CPUs.",
        "",
        f"Import peak RSS above the interpreter: {(rss(imp) - rec['baseline_rss_bytes'] / GB):.3f} GB = "
        f"{(rss(imp) * GB - rec['baseline_rss_bytes']) / rec['largest_group_bytes']:.2f} x the largest tensor group "
        "(bound: about 2x).",
        f"Export peak RSS above the interpreter: {(rss(exp) - rec['baseline_rss_bytes'] / GB):.3f} GB.",
        f"Import/export speed relative to the disk: import {imp['gb_per_s'] / d['write_GBps']:.2f} x disk write, "
        f"export {exp['gb_per_s'] / d['write_GBps']:.2f} x disk write (each reads as much as it writes).",
        "",
        f"Verification: {rec['verify']['summary']}",
        f"Export mode: {rec['export_mode']}. Peak RSS from {imp['rss_source']}.",
        f"Total bench wall time: {rec['wall_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="12b-shape", choices=("tiny", "small", "12b-shape"))
    ap.add_argument("--toy", choices=("fast", "model"), default=None, help="default: fast for 12b-shape, else model")
    ap.add_argument("--workdir", type=Path, default=None, help="default: the largest-free of /tmp and ./bench_work")
    ap.add_argument("--out", type=Path, required=True, help="markdown record (a .json is written beside it)")
    ap.add_argument("--disk-test-gb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--low-disk", action="store_true", help="delete the toy weights after import (auto when short)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    a = ap.parse_args()
    t_all = time.perf_counter()
    check_deps()
    import torch

    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvlcore.convert.safetensors_io import SafetensorsReader, read_header

    toy_kind = a.toy or ("fast" if a.size == "12b-shape" else "model")
    if a.workdir is None:
        # A RAM-backed file system would report memory speed as "disk" speed: use it only as a last resort.
        (REPO / "bench_work").mkdir(exist_ok=True)
        cands = [Path("/tmp"), REPO / "bench_work"]
        real = [p for p in cands if fs_type(p.resolve()) not in ("tmpfs", "ramfs")] or cands
        a.workdir = max(real, key=lambda p: shutil.disk_usage(p).free) / "nvl_convert_bench"
    work = a.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rec: dict = {"size": a.size, "workdir": f"{work} ({fs_type(work.resolve())})",
                 "command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "machine": machine_facts()}
    # expected toy size from the inventory
    ids = {"vocab_size": 300, "<image>": 1, "<video>": 2, "bos": 0, "eos": 0, "pad": 0}  # only sizes matter here
    raw = toy_config(a.size, ids)
    est_cfg = NemotronVLConfig.from_dict(raw, source="estimate", num_prefix_tokens=num_prefix_tokens(a.size))
    est = sum(torch.Size(s).numel() * (2 if d == "bfloat16" else 4) for s, d in hf_inventory(est_cfg).values())
    free = shutil.disk_usage(work).free
    need_full = 3 * est + a.disk_test_gb * GB + 2 * GB
    need_low = 2 * est + 2 * GB
    low = a.low_disk or free < need_full
    log(f"toy ~{est / GB:.1f} GB; free {free / GB:.1f} GB in {work}; {'low-disk mode' if low else 'full mode'}")
    if free < need_low:
        raise SystemExit(f"{work} has {free / GB:.1f} GB free; the {a.size} run needs {need_low / GB:.1f} GB. "
                         "Pass --workdir on a larger disk.")

    log("disk speed test")
    rec["disk"] = disk_speed(work, int(a.disk_test_gb * GB))
    log(f"disk: write {rec['disk']['write_GBps']:.2f} GB/s, read {rec['disk']['read_GBps']:.2f} GB/s "
        f"({rec['disk']['method']})")

    toy = work / "toy"
    log(f"writing the {a.size} toy ({toy_kind})")
    t = time.perf_counter()
    if toy_kind == "model":
        from nvl_nemotron_vl.toy import write_toy_checkpoint

        write_toy_checkpoint(toy, a.size, seed=a.seed, progress=log)
    else:
        write_fast_toy(toy, a.size, a.seed, 4 * 2**30)
    reader = SafetensorsReader(toy)
    inv = {k: (t_.shape, str(t_.dtype)[6:]) for k, t_ in reader.tensors.items()}
    rec["toy"] = {"kind": toy_kind, "seconds": time.perf_counter() - t, "bytes": reader.total_bytes,
                  "tensors": len(inv)}
    cfg = NemotronVLConfig.from_hf_dir(toy)
    expect = hf_inventory(cfg)
    rec["toy"]["inventory_matches_reference_layout"] = {k: (tuple(s), d) for k, (s, d) in expect.items()} == {
        k: (tuple(s), d) for k, (s, d) in inv.items()}

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.checkpoint import TensorSpec

    specs = {k: TensorSpec(t_.shape, t_.dtype) for k, t_ in reader.tensors.items()}
    groups = NemotronVLBridge.from_hf_dir(toy).conversion_groups(specs)
    sizes = {g.name or g.hf_keys[0]: sum(reader.tensors[k].nbytes for k in g.hf_keys) for g in groups}
    rec["largest_group"] = max(sizes, key=sizes.__getitem__)
    rec["largest_group_bytes"] = sizes[rec["largest_group"]]

    sample = sample_keys(inv, reader.total_bytes)
    log(f"hashing {len(sample)} source tensors")
    src_hash = hash_tensors(toy, sample)

    # The baseline is the same code path on a model with almost no bytes: the interpreter, every
    # import, the plan and the writers, so that (import RSS - baseline) is what the tensors cost.
    tiny = work / "baseline_tiny"
    write_fast_toy(tiny, "tiny", a.seed, 4 * 2**30)
    base = run_child(["import", str(tiny), str(work / "baseline_ckpt")])
    rec["baseline_rss_bytes"] = base.get("time_v_max_rss_bytes") or base["peak_rss_bytes"]
    shutil.rmtree(work / "baseline_ckpt", ignore_errors=True)

    ck = work / "ckpt"
    evict([toy])
    log("import")
    rec["import"] = run_child(["import", str(toy), str(ck)])
    rec["checkpoint_bytes_on_disk"] = dir_bytes(ck)
    if low:
        for f in list(toy.glob("*.safetensors")) + [toy / "model.safetensors.index.json"]:
            f.unlink(missing_ok=True)
        rec["export_mode"] = ("low-disk: toy weights deleted after import; "
                              "export used the inventory recorded in the checkpoint")
    else:
        rec["export_mode"] = "full: export read the reference toy directory's headers"
    out_hf = work / "export"
    evict([ck])
    log("export")
    rec["export"] = run_child(["export", str(toy), str(ck), str(out_hf)])

    log("verifying")
    got = SafetensorsReader(out_hf)
    got_inv = {k: (t_.shape, str(t_.dtype)[6:]) for k, t_ in got.tensors.items()}
    same_layout = got_inv == inv
    got_hash = hash_tensors(out_hf, sample)
    bad = [k for k in sample if got_hash[k] != src_hash[k]]
    index = json.loads((out_hf / "model.safetensors.index.json").read_text())
    hdr_total = sum(got.tensors[k].nbytes for k in got.tensors)
    ok = same_layout and not bad and index["metadata"]["total_size"] == hdr_total
    rec["verify"] = {
        "ok": ok, "key_set_shapes_dtypes_equal": same_layout, "sampled": len(sample), "hash_mismatches": bad[:10],
        "shards": len(set(index["weight_map"].values())), "first_shard_header_keys": len(read_header(
            out_hf / sorted(set(index["weight_map"].values()))[0])) - 1,
        "summary": (f"{'PASS' if ok else 'FAIL'}: {len(got_inv)} exported tensors vs {len(inv)} source, key set/shapes/"
                    f"dtypes {'equal' if same_layout else 'DIFFER'}; {len(sample) - len(bad)}/{len(sample)} sampled "
                    f"tensors byte-identical (sha256); {len(set(index['weight_map'].values()))} shards, index "
                    f"total_size {'consistent' if index['metadata']['total_size'] == hdr_total else 'WRONG'}"),
    }
    log(rec["verify"]["summary"])
    rec["wall_s"] = time.perf_counter() - t_all
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(markdown(rec))
    a.out.with_suffix(".json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    print(markdown(rec))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
