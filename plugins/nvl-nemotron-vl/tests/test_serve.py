"""``nvl serve`` on the tiny toy: a real server (a subprocess on a free port) and the ``openai`` client.

* text, image (data URL and a local path), multi-image and video answers equal the in-process
  generator's greedy output (what ``nvl generate`` prints; the text case through ``nvl generate --json``);
* streamed chunks join to the non-streamed answer, with usage;
* requests in flight share a batch and each answer equals the request alone (over HTTP, and in-process
  with the three jobs queued before the worker starts, so they must share one batch);
* bad bodies, unsupported fields, unknown models and prompts past the context get OpenAI error bodies
  with a 4xx, and the server answers the next request;
* ``nvl eval --endpoint`` against the server gives in-process ``nvl eval``'s predictions and metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from nvlcore.generation import build_conversation  # noqa: E402
from nvlcore.serve.client import conversation_to_messages  # noqa: E402

pytestmark = pytest.mark.usefixtures("own_process_group")
NEW = 12
CONTEXT = 4096  # the served toy's context, small enough to overrun with a prompt
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SHAPES = ["dataset.maker_name=synthetic_shapes", 'dataset.maker_kwargs={"num_examples": 6}']


def _liven(hf_dir: Path) -> None:
    """Scale the toy's LM matrices and Mamba time steps so its answers depend on the prompt (and on padding
    or a stale state, were they visible), as the generation tests do."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(path)
    for name, t in sd.items():
        if name.startswith("language_model.") and t.ndim == 2 and "embeddings" not in name:
            sd[name] = (t.float() * 8.0).to(t.dtype)
        elif name.endswith("mixer.dt_bias"):
            sd[name] = (t.float() + 3.0).to(t.dtype)
    save_file(sd, path, metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = CONTEXT
    (hf_dir / "config.json").write_text(json.dumps(config))


def _noise_image(path: Path, w: int, h: int, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _noise_video(path: Path, frames: int = 12) -> Path:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    out = Path(write_toy_checkpoint(tmp_path_factory.mktemp("serve") / "toy", "tiny", seed=3))
    _liven(out)
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    return {"root": root, "wide": _noise_image(root / "wide.png", 150, 70, 1),
            "square": _noise_image(root / "square.png", 64, 64, 2), "video": _noise_video(root / "clip.mp4")}


@pytest.fixture(scope="module")
def server(toy, media, tmp_path_factory):
    """``nvl serve`` in a subprocess on a free port; yields (base URL, its log file)."""
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "nvlcore", "serve", "--hf-model-path", str(toy), "--port", "0",
                                 "--device", "cpu", "--served-model-name", "toy", "--max-batch-size", "4",
                                 "--allowed-local-media-path", str(media["root"])], stdout=fh, stderr=fh, env=ENV)
    try:
        deadline = time.time() + 180
        while not (m := re.search(r"ready at (http://\S+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        yield m.group(1), log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def generator(toy):
    from nvl_nemotron_vl import load_generator

    return load_generator(toy, device="cpu")


def _alone(generator, conv, new=NEW):
    return generator.generate([conv], max_new_tokens=new)[0]


def _ask(client, messages, **kw):
    return client.chat.completions.create(model="toy", messages=messages, max_tokens=kw.pop("max_tokens", NEW), **kw)


def test_models_and_health(server, client) -> None:
    import httpx

    assert [m.id for m in client.models.list()] == ["toy"]
    assert httpx.get(server[0].removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_text_equals_nvl_generate(toy, client) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["generate", "--hf-model-path", str(toy), "--prompt", "Tell me about cats.",
                                           "--max-new-tokens", str(NEW), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    want = json.loads(res.stdout)
    # no system message: the server adds nvl generate's default /no_think
    got = _ask(client, [{"role": "user", "content": "Tell me about cats."}])
    assert got.choices[0].message.content == want["text"]
    assert got.usage.prompt_tokens == len(want["prompt_token_ids"])
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.choices[0].finish_reason == want["finish_reason"]


@pytest.mark.parametrize("kind", ["image", "image_path", "multi_image", "video"])
def test_media_answers_equal_the_generator(generator, client, media, kind) -> None:
    images = {"image": [media["wide"]], "image_path": [media["square"]],
              "multi_image": [media["wide"], media["square"]]}.get(kind, [])
    conv = build_conversation("Describe it.", images=images, video=media["video"] if kind == "video" else None,
                              system_prompt="/no_think")
    messages = conversation_to_messages(conv)  # images and the video as data URLs
    if kind == "image_path":
        messages[1]["content"][0] = {"type": "image_url", "image_url": {"url": f"file://{media['square']}"}}
    want = _alone(generator, conv)
    got = _ask(client, messages)
    assert len(set(want.token_ids)) >= 3  # the toy's answer is not one repeated token
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_stream_chunks_join_to_the_answer(client) -> None:
    messages = [{"role": "user", "content": "Count to ten."}]
    whole = _ask(client, messages, max_tokens=20)
    chunks = list(_ask(client, messages, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # really piece by piece
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_ends_the_answer_before_it(generator, client) -> None:
    """A stop string cuts the greedy answer where it first occurs (not included), streamed or not."""
    want = _alone(generator, build_conversation("Tell me a story.", system_prompt="/no_think"), 24)
    pieces = [generator.tokenizer.decode([t]) for t in want.token_ids]
    pairs = [a + b for a, b in zip(pieces[2:], pieces[3:], strict=False)
             if a and b and "\ufffd" not in a + b and a + b in want.text]
    assert pairs, pieces
    stop = pairs[0]  # two tokens' text: a stream must hold the first back until it sees the second
    cut = want.text.find(stop)
    messages = [{"role": "user", "content": "Tell me a story."}]
    got = _ask(client, messages, max_tokens=200, stop=[stop, "never-seen-stop"])
    assert got.choices[0].message.content == want.text[:cut] and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < len(want.token_ids)  # it stopped at the string, not at the budget
    chunks = list(_ask(client, messages, max_tokens=200, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text[:cut]


def test_concurrent_requests_each_equal_the_request_alone(generator, client, server) -> None:
    prompts = ["Hi!", "Tell me a long story about a lighthouse keeper.", "What is two plus two?"]
    wants = [_alone(generator, build_conversation(p, system_prompt="/no_think"), 16).text for p in prompts]
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(_ask, client, [{"role": "user", "content": "Go on."}], max_tokens=120)
        time.sleep(0.3)  # the three below queue while the worker decodes the first: they share a batch
        got = list(pool.map(lambda p: _ask(client, [{"role": "user", "content": p}], max_tokens=16), prompts))
        blocker.result()
    assert [g.choices[0].message.content for g in got] == wants
    batches = [int(b) for b in re.findall(r"batch of (\d+)", server[1].read_text())]
    assert max(batches) >= 2, batches


def test_queued_jobs_share_one_batch_and_equal_each_alone(generator, media) -> None:
    """In-process: three jobs (different prompt lengths, an image among them) queued before the worker
    starts are decoded as one left-padded batch; each answer equals its request alone."""
    import asyncio

    from nvlcore.serve import BatchEngine, ChatRequest

    convs = [build_conversation("Hi!", system_prompt="/no_think"),
             build_conversation("Describe it.", images=[media["wide"]], system_prompt="/no_think"),
             build_conversation("What is the capital of France? Answer briefly.", system_prompt="/no_think")]
    wants = [_alone(generator, c) for c in convs]
    sizes = []

    async def run():
        engine = BatchEngine(generator, max_batch_size=4, on_batch=sizes.append)
        jobs = [engine.submit(ChatRequest(model=None, conversation=c, max_tokens=NEW)) for c in convs]
        engine.start()
        try:
            return await asyncio.gather(*(j.future for j in jobs))
        finally:
            engine.stop()

    got = asyncio.run(run())
    assert sizes == [3]
    assert len({len(w.prompt_token_ids) for w in wants}) == 3  # rows padded differently
    assert [(a.text, a.token_ids, a.finish_reason) for a in got] == [(w.text, w.token_ids, w.finish_reason)
                                                                      for w in wants]


BAD = [
    ("not json", 400, None),
    ([1, 2], 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}], "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_p": 0.5}, 400, "top_p"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                     "AAAA"}}]}]},
     400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]},
     400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]},
     400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": {}}]}]}, 400, "messages[0].content[0].type"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}], "max_tokens": 4}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}], "max_tokens": 4, "stream": True}, 400, "messages"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=range(len(BAD)))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, param) -> None:
    import httpx

    raw = body if isinstance(body, str) else json.dumps(body)
    res = httpx.post(server[0] + "/chat/completions", content=raw, headers={"content-type": "application/json"},
                     timeout=60)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param, err
    if param == "max_tokens" or (param == "messages" and "word" in raw):  # past the context
        assert err["code"] == "context_length_exceeded", err
    ok = _ask(client, [{"role": "user", "content": "Still there?"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


@pytest.mark.slow
def test_eval_endpoint_equals_in_process_eval(toy, server, tmp_path) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    common = [*SHAPES, "--max-new-tokens", "6", "--batch-size", "3", "--json"]
    local = CliRunner().invoke(build_cli(), ["eval", "--hf-model-path", str(toy), "--device", "cpu", *common,
                                             "--output", str(tmp_path / "local.jsonl")])
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(build_cli(), ["eval", "--endpoint", server[0], *common,
                                              "--output", str(tmp_path / "remote.jsonl")])
    assert remote.exit_code == 0, remote.output
    rows = {n: [json.loads(x) for x in (tmp_path / n).read_text().splitlines()]
            for n in ("local.jsonl", "remote.jsonl")}
    assert len({r["prediction"] for r in rows["local.jsonl"]}) > 1  # answers depend on the image and question
    assert rows["remote.jsonl"] == rows["local.jsonl"]
    s_local, s_remote = (json.loads(r.stdout.splitlines()[-1]) for r in (local, remote))
    assert s_remote["metrics"] == s_local["metrics"] and s_remote["num_samples"] == 6
    assert s_remote["generated_tokens"] == s_local["generated_tokens"]


def test_eval_endpoint_refuses_model_options(toy) -> None:
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["eval", "--endpoint", "http://127.0.0.1:9/v1", "--hf-model-path", str(toy),
                                           *SHAPES])
    assert res.exit_code == 2 and "drop --hf-model-path" in res.output


def test_serve_takes_the_video_options_of_nvl_generate(toy) -> None:
    """--num-frames / --fps / --video-pruning-rate reach the generator as in nvl generate (no video path needed:
    they apply to every request's videos); --tp > 1 is refused in one line."""
    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    cmd = build_cli().commands["serve"]
    ctx = cmd.make_context("serve", ["--hf-model-path", str(toy), "--num-frames", "3", "--video-pruning-rate", "0"])
    options = {}
    for obj, values in cmd.split_values(dict(ctx.params), ctx):
        options.update(obj.generator_options("serve", values, ctx.params))
    assert options == {"processor_options": {"video_num_frames": 3}, "video_pruning_rate": 0.0}
    res = CliRunner().invoke(build_cli(), ["serve", "--hf-model-path", str(toy), "--tp", "2"])
    assert res.exit_code == 2 and "tensor parallelism is not supported yet" in res.output


def test_a_port_in_use_is_refused_before_the_model_loads(toy) -> None:
    import socket

    from click.testing import CliRunner

    from nvlcore.cli import build_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(build_cli(), ["serve", "--hf-model-path", str(toy), "--port", str(port)])
    assert res.exit_code == 1 and f"--port {port}: cannot listen there" in res.output, res.output
    assert "loading" not in res.output
