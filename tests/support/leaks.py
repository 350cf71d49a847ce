"""The check every test runs under (a pytest plugin, loaded by tests/conftest.py):
a test must leave no asyncio task, no pending timer and no thread behind.

Home Assistant's ``verify_cleanup`` is the model. The check runs at the test's
teardown, after the test's own fixtures cleaned up, so what it finds was started by the
test or by the code under test and not stopped by either: a background task nobody
awaits, a ``call_later`` nobody cancels, an executor nobody shuts down. Each of those is
a leak in the product once it runs for weeks, which is why it fails the test rather
than warning.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_asyncio import is_async_test

# Threads a library starts once, on first use, and keeps for the life of the process:
# the test that happened to start one did not leak it. Name prefix -> why.
PROCESS_THREADS: dict[str, str] = {}
THREAD_GRACE_S = 2.0  # how long a new thread may take to finish after its owner stopped it


@pytest.fixture(autouse=True)
def _leaves_nothing_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test (at teardown, after its own fixtures cleaned up) that leaves behind an
    asyncio task, a pending timer (``loop.call_later``) or a thread it started.

    Async tests: the check runs on the test's own loop, after every async fixture's
    teardown and before pytest-asyncio closes the loop (which would otherwise cancel
    leftovers silently). Lingering tasks and timers are reported, then cancelled so the
    loop closes clean. Timers are visible on asyncio's own loop only (uvloop keeps them
    in C): the default-loop run of the same tests catches those. The loop's default
    executor is shut down before threads are counted: its idle workers are the loop's,
    not leaks (a loop shared by several tests keeps its executor, whose workers are then
    not counted). Threads: any thread started during the test and still alive after a short
    grace fails it, daemon or not, except the process-lifetime ones in PROCESS_THREADS.
    Native threads (ONNX Runtime's and OpenMP's pools) are not Python threads and are
    not seen here.
    """
    loop: asyncio.AbstractEventLoop | None = None
    own_loop = False  # the loop lives and dies with this test
    if is_async_test(request.node):
        # Requesting pytest-asyncio's runner here makes it set up before, and torn down
        # after, this fixture (pytest-asyncio 1.x; the version is pinned).
        scope = request.node._loop_scope
        loop = request.getfixturevalue(f"_{scope}_scoped_runner").get_loop()
        own_loop = scope == "function"
    threads_before = set(threading.enumerate())
    tasks_before = asyncio.all_tasks(loop) if loop is not None else set()
    timers_before = set(_pending_timers(loop)) if loop is not None else set()
    yield
    problems: list[str] = []
    if loop is not None:
        problems += _stop_lingering_tasks(loop, tasks_before)
        problems += _cancel_lingering_timers(loop, timers_before)
        if own_loop:  # a loop shared with later tests keeps its executor
            loop.run_until_complete(loop.shutdown_default_executor())
    problems += _lingering_threads(threads_before, allow_executor=not own_loop)
    if problems:
        pytest.fail("left behind by the test:\n" + "\n".join(problems), pytrace=False)


def _stop_lingering_tasks(
    loop: asyncio.AbstractEventLoop, before: set[asyncio.Task[Any]]
) -> list[str]:
    tasks = [t for t in asyncio.all_tasks(loop) - before if not t.done()]
    found = [f"task {t.get_name()}: {t.get_coro()!r}\n{_task_stack(t)}" for t in tasks]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=5))
    return found


def _task_stack(task: asyncio.Task[Any]) -> str:
    """Where the task is suspended, outermost frame first."""
    return "".join(
        f'  File "{f.f_code.co_filename}", line {f.f_lineno}, in {f.f_code.co_name}\n'
        for f in task.get_stack(limit=8)
    )


def _pending_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    # asyncio's own loop keeps its timers in a heap; cancelled ones leave it lazily.
    scheduled: list[asyncio.TimerHandle] = getattr(loop, "_scheduled", [])
    return [h for h in scheduled if not h.cancelled()]


def _cancel_lingering_timers(
    loop: asyncio.AbstractEventLoop, before: set[asyncio.TimerHandle]
) -> list[str]:
    timers = [h for h in _pending_timers(loop) if h not in before]
    found = [f"timer {h!r}" for h in timers]
    for h in timers:
        h.cancel()
    return found


def _lingering_threads(before: set[threading.Thread], allow_executor: bool) -> list[str]:
    deadline = time.monotonic() + THREAD_GRACE_S
    allowed = tuple(PROCESS_THREADS) + (("asyncio_",) if allow_executor else ())
    found = []
    for t in set(threading.enumerate()) - before:
        if isinstance(t, threading._DummyThread) or t.name.startswith(allowed):
            # A native thread that called into Python; a process-lifetime one; the
            # default executor's workers of a loop that outlives the test.
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            frame = sys._current_frames().get(t.ident or -1)
            stack = "".join(traceback.format_stack(frame, limit=8)) if frame else ""
            target = getattr(t, "_target", None)
            found.append(f"thread {t.name!r} (daemon={t.daemon}, target={target!r})\n{stack}")
    return found
