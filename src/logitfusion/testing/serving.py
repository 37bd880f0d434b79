"""Helpers for tests that start a server or need vLLM: one place for the free port, the wait for
`/health` with the server's log on failure, the clean stop of the server's whole process group,
and the guard that skips a vLLM test module (or fails it, where vLLM is required)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

REQUIRE_VLLM = "LOGITFUSION_REQUIRE_VLLM"  # set by `make test-vllm` (CI): a broken install fails, never skips
NO_VLLM = ("vLLM is not installed (pip install 'logitfusion[vllm]', then "
           "pip uninstall -y torchvision torchaudio torchcodec)")


def require_vllm():
    """The vllm module; at a test module's import, a skip of that module when vLLM is missing,
    unless LOGITFUSION_REQUIRE_VLLM asks for the import error instead."""
    __tracebackhide__ = True  # pytest reports the skip at the test module's line, not here
    if os.environ.get(REQUIRE_VLLM):
        import vllm
        return vllm
    import pytest
    return pytest.importorskip("vllm", reason=NO_VLLM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(argv: Callable[[int], list[str]], log: Path, env: Mapping[str, str] | None = None,
                   timeout: float = 180.0) -> Iterator[str]:
    """Run `argv(port)` on a free loopback port in its own session, wait until its /health answers,
    yield its base URL; stop it afterwards (SIGINT, then SIGKILL to the session: a server and the
    engine process it spawned). A server that exits or stays silent for `timeout` seconds fails
    with the tail of its log."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv(port), stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server did not come up in {timeout:g} s:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
