"""Misusing the engine under `supervisor exec` is one fatal line, never a crash loop: a FUNCTION
that is no workflow, arguments it does not take, a yield of something else, an unnamed lambda."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from test_sup_exec import supervisor

MISUSE = textwrap.dedent('''
    from workflow import register

    def add(a, b):
        return a + b

    def two_args(ctx, a, b):
        return (yield ctx.run(add, a, b))

    def yields_a_number(ctx):
        yield 42

    def runs_a_lambda(ctx):
        return (yield ctx.run(lambda: 1))

    def calls_a_sub_workflow_wrongly(ctx):
        return (yield ctx.run(two_args, 1))
''')

CASES = {
    "add": ((), "misuse.add is not a workflow: a workflow is a generator function"),
    "two_args": (("--arg", "1"), "workflow misuse.two_args (m): two_args() missing 1 required positional"),
    "yields_a_number": ((), "workflow misuse.yields_a_number (m) yielded 42; yield ctx.run(...)"),
    "runs_a_lambda": ((), "<lambda> (in misuse) has no name of its own"),
    "calls_a_sub_workflow_wrongly": ((), "workflow misuse.two_args (m.0): two_args() missing 1"),
}


@pytest.mark.parametrize("function", sorted(CASES))
def test_misuse_is_one_fatal_line_and_no_restart(tmp_path: Path, function: str) -> None:
    (tmp_path / "misuse.py").write_text(MISUSE)
    args, message = CASES[function]

    done = supervisor(tmp_path, "exec", f"misuse:{function}", "--id", "m", *args, "--json")

    assert done.returncode == 1, done.describe()
    assert message in done.last_error_line, done.describe()
    assert "Traceback" not in done.stderr and "restarting" not in done.stderr
    assert done.report["restarts"] == 0 and len(done.report["children"]) == 1
