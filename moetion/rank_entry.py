"""A launched rank's first code: installs the hooks its launcher asked for, then runs the user's
script as ``__main__`` (``runpy`` semantics: ``sys.argv`` and ``sys.path[0]`` as ``python script``
would set them).

Usage (by the launcher): ``python -m moetion.rank_entry script.py [args...]``.
"""
from __future__ import annotations

import os
import runpy
import sys


def install_hooks() -> None:
    """Under the fault harness, each rank leaves its final state when its engine closes."""
    from moetion import env
    from moetion.harness.final_state import record_final_state

    if env.harness_out():
        from moetion.engine import on_close

        on_close(record_final_state)


def main(argv: list[str]) -> None:
    script = argv[0]
    install_hooks()
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
