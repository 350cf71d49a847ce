"""The autouse leak check (tests/support/leaks.py) is not dead: small test files that
leave a task, a timer or a thread behind fail through it, on asyncio's loop and on
uvloop, and tests that clean up pass."""

from __future__ import annotations

from pathlib import Path

import pytest

import tests.support.leaks

SAMPLES = """
import asyncio, threading, time

import pytest


async def test_clean_async():
    print("running on", type(asyncio.get_running_loop()).__module__)
    task = asyncio.create_task(asyncio.sleep(10))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.to_thread(time.sleep, 0.01)  # the loop's executor is not a leak


def test_clean_thread():
    t = threading.Thread(target=time.sleep, args=(0.2,))
    t.start()  # finishes within the grace


async def test_leaks_task():
    asyncio.create_task(asyncio.sleep(10), name="forgotten")


async def test_leaks_timer():
    asyncio.get_running_loop().call_later(10, print, "late")


def test_leaks_thread():
    stop = threading.Event()
    threading.Thread(target=stop.wait, name="forgotten-thread", daemon=True).start()


@pytest.fixture
async def leaky_fixture():
    yield
    asyncio.create_task(asyncio.sleep(10), name="from-a-fixture")


async def test_leaks_from_a_fixture(leaky_fixture):
    pass
"""

UVLOOP = """

def pytest_asyncio_loop_factories(config, item):
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_leaks_fail_the_test_and_clean_tests_pass(pytester: pytest.Pytester, loop: str) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    # The plugin's own source as the sample run's conftest (a subprocess cannot import
    # the tests package: the repo is not on sys.path, by design).
    conftest = Path(tests.support.leaks.__file__).read_text()
    conftest += "\nTHREAD_GRACE_S = 0.5\n"  # the leaked thread never ends: wait less for it
    pytester.makeconftest(conftest + (UVLOOP if loop == "uvloop" else ""))
    pytester.makepyfile(test_samples=SAMPLES)
    result = pytester.runpytest_subprocess("-s")
    outcomes = result.parseoutcomes()
    errors = {
        line.split("::")[1].split()[0]
        for line in result.outlines
        if line.startswith("ERROR test_samples.py::")
    }
    expected = {"test_leaks_task", "test_leaks_thread", "test_leaks_from_a_fixture"}
    if loop == "asyncio":
        expected.add("test_leaks_timer")  # uvloop's timers are not visible from Python
    assert errors == expected, result.stdout.str()
    assert outcomes["passed"] == 6, outcomes  # every test body passed; teardown failed
    out = result.stdout.str()
    assert f"running on {'uvloop' if loop == 'uvloop' else 'asyncio.'}" in out
    assert "task forgotten" in out and "task from-a-fixture" in out
    assert "thread 'forgotten-thread' (daemon=True" in out
    if loop == "asyncio":
        assert "timer <TimerHandle" in out
