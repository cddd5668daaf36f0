"""A library that catches misuse, tried as a new user would: a call made but never yielded, a
script started two ways, lambdas, and a workflow body bug fixed and retried."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from wf_helpers import SAFETY_TIMEOUT_S, open_store, worker_env

from store import PromiseConflictError, State
from workflow import CallNotYieldedError, Context, Runner, StepError, current_step, register

ROOT = "misuse"


@register(name="misuse.double")
def double(n: int) -> int:
    current_step().dependency("ran").append(n)
    return 2 * n


@register(name="misuse.forgets_yield")
def forgets_yield(ctx: Context) -> Generator[Any, Any, Any]:
    first = yield ctx.run(double, 1)
    second = ctx.run(double, 2)  # the bug: no yield
    return [first, second]


@register(name="misuse.forgets_then_yields")
def forgets_then_yields(ctx: Context) -> Generator[Any, Any, Any]:
    ctx.run(double, 1)  # the bug: no yield
    return (yield ctx.run(double, 2))


@pytest.mark.parametrize(
    ("workflow", "unyielded"), [(forgets_yield, f"{ROOT}.1"), (forgets_then_yields, f"{ROOT}.0")]
)
def test_a_call_made_but_never_yielded_is_an_error_naming_it(
    tmp_path: Path, workflow: Any, unyielded: str
) -> None:
    ran: list[int] = []
    with open_store(tmp_path / "store.jsonl") as store:
        with pytest.raises(CallNotYieldedError, match=rf"{unyielded} \(double\) was made but never yielded"):
            Runner(store, dependencies={"ran": ran}).run(ROOT, workflow)
        assert store.get(unyielded) is None  # never created, never run
        assert store.get(ROOT).state is State.PENDING  # a bug in the code does not fail the run
    assert 2 not in ran


def test_an_unregistered_lambda_is_refused_with_how_to_name_it(tmp_path: Path) -> None:
    @register(name="misuse.lambda_user")
    def uses_lambda(ctx: Context) -> Generator[Any, Any, Any]:
        return (yield ctx.run(lambda: 1))

    with open_store(tmp_path / "store.jsonl") as store, pytest.raises(
        TypeError, match=r"<lambda> .* has no name of its own.*register"
    ):
        Runner(store).run(ROOT, uses_lambda)


SCRIPT = textwrap.dedent('''
    import json, sys
    from store import JsonlStore
    from workflow import Runner

    def greet(name):
        return f"hello {name}"

    def hello_all(ctx, names):
        greetings = []
        for name in names:
            greetings.append((yield ctx.run(greet, name)))
        return greetings

    with JsonlStore(sys.argv[1], exclusive=True) as store:
        print(json.dumps(Runner(store).run("hello", hello_all, ["ann", "bob"])))
''')


@pytest.mark.parametrize("package", [False, True])
def test_a_script_run_as_a_file_and_as_a_module_records_the_same_names(
    tmp_path: Path, package: bool
) -> None:
    """`python script.py` then `python -m script`: the second run replays the first one's result."""
    folder = tmp_path / "pkg" if package else tmp_path
    folder.mkdir(exist_ok=True)
    if package:
        (folder / "__init__.py").write_text("")
    (folder / "hello.py").write_text(SCRIPT)
    store = tmp_path / "store.jsonl"
    module = "pkg.hello" if package else "hello"
    runs = [[sys.executable, str(folder / "hello.py"), str(store)],
            [sys.executable, "-m", module, str(store)]]
    for argv in runs:
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=worker_env(),
                              timeout=SAFETY_TIMEOUT_S, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == ["hello ann", "hello bob"]
    records = [json.loads(line) for line in store.read_text().splitlines()]
    names = {r["param"]["fn"] for r in records if "param" in r}
    assert names == {f"{module}.hello_all", f"{module}.greet"}


BODY_FIXED = {"yes": False}  # stands in for a deploy of fixed code


@register(name="misuse.buggy_body")
def buggy_body(ctx: Context) -> Generator[Any, Any, Any]:
    first = yield ctx.run(double, 1)
    if not BODY_FIXED["yes"]:
        raise KeyError("a bug in the workflow body")
    return first + (yield ctx.run(double, 2))


def test_a_body_bug_fails_the_workflow_and_runner_retry_resumes_it_after_the_fix(
    tmp_path: Path,
) -> None:
    ran: list[int] = []
    with open_store(tmp_path / "store.jsonl") as store:
        runner = Runner(store, dependencies={"ran": ran})
        with pytest.raises(StepError, match="a bug in the workflow body"):
            runner.run(ROOT, buggy_body)
        BODY_FIXED["yes"] = True
        with pytest.raises(StepError):  # failed for good: a plain rerun replays the failure
            runner.run(ROOT, buggy_body)
        assert runner.retry(ROOT) == [ROOT]
        assert runner.run(ROOT, buggy_body) == 6
        with pytest.raises(PromiseConflictError, match="only a failed"):
            runner.retry(ROOT)
    assert ran == [1, 2]  # the resolved step did not run again
