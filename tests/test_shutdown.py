"""A command freezes its heap at exit: after the exit handlers registered later, once."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_heap_is_frozen_at_exit_after_later_handlers_and_only_once():
    script = textwrap.dedent(
        """
        import atexit, gc
        atexit.register(lambda: print("frozen at the end:", gc.get_freeze_count() > 0))
        from ssl_mt.shutdown import freeze_heap_at_exit
        freeze_heap_at_exit()
        freeze_heap_at_exit()
        atexit.register(lambda: print("frozen for a later handler:", gc.get_freeze_count() > 0))
        print("frozen while running:", gc.get_freeze_count() > 0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "frozen while running: False",
        "frozen for a later handler: False",
        "frozen at the end: True",
    ]


def test_every_command_registers_it():
    from pathlib import Path

    import ssl_mt

    package = Path(ssl_mt.__file__).parent
    commands = [
        package / name
        for name in (
            "finetune.py",
            "pretrain.py",
            "predict.py",
            "probe.py",
            "export.py",
            "compare/__main__.py",
            "data/__main__.py",
        )
    ]
    for path in commands:
        guard = path.read_text().split('if __name__ == "__main__":', 1)[1]
        assert guard.lstrip().startswith("freeze_heap_at_exit()"), path
