"""``curate.quick_exit``: exit hooks still run, open files are still flushed, the collector is frozen last."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120)


def test_the_collector_is_frozen_after_every_other_exit_hook(tmp_path):
    out = tmp_path / "log.txt"
    done = _run("""
        import atexit, gc, os, sys
        # registered before: runs after the freeze
        atexit.register(lambda: os.write(1, f"frozen {gc.get_freeze_count()}\\n".encode()))
        from curate.quick_exit import skip_exit_collection
        skip_exit_collection(); skip_exit_collection()  # once per process
        # registered after: runs before the freeze, as exit hooks of libraries do
        atexit.register(lambda: os.write(1, f"hook {gc.get_freeze_count()}\\n".encode()))
        unflushed = open(sys.argv[1], "w", buffering=1 << 20)  # a module global: freed when modules are cleared
        unflushed.write("written at exit")
    """, str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[:2] == ["hook", "0"]
    assert lines[2] == "frozen" and int(lines[3]) > 1000
    assert out.read_text() == "written at exit"


def test_the_curate_command_registers_it():
    done = _run("""
        import atexit, gc, os, sys
        atexit.register(lambda: os.write(2, f"frozen {gc.get_freeze_count()}\\n".encode()))
        sys.argv = ["curate", "stages"]
        from curate.cli import main
        main()
    """)
    assert done.returncode == 0, done.stderr
    assert "utk" in done.stdout
    count = int(done.stderr.split("frozen")[-1].split()[0])
    assert count > 1000
