"""The code reward's sandbox against hostile completions.

Every attack is written so that the completion passes its unit test only if the attack
worked: a score of 0 means it was stopped or contained. Each also checks the host side
(files, sockets, leftover processes). Limits are small so the suite stays fast; the fork
bomb runs under max_processes=4, which was checked with a bounded fork loop first.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from pathlib import Path

import pytest

from rlkit.rewards.code import code_tests_reward, program_source
from rlkit.rewards.sandbox import SandboxLimits, SandboxUnavailable, check_sandbox, run_python

try:
    check_sandbox()
    SANDBOX_ERROR = None
except SandboxUnavailable as error:  # no bubblewrap here: nothing below may run unsandboxed
    SANDBOX_ERROR = str(error)
pytestmark = pytest.mark.skipif(SANDBOX_ERROR is not None, reason=f"no sandbox: {SANDBOX_ERROR}")

PROMPT = 'def add(a, b):\n    """The sum of a and b."""\n'
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
LIMITS = dict(wall_seconds=4, cpu_seconds=2, memory_mb=256, max_processes=4)


def score(body: str) -> float:
    """The code reward of a completion that continues ``PROMPT`` with ``body``."""
    return code_tests_reward(
        [PROMPT], ["    " + body.replace("\n", "\n    ") + "\n"], [PROMPT], [TESTS], ["add"], **LIMITS
    )[0]


def sandbox_processes() -> list[str]:
    """Live (non-zombie) processes of the sandbox user."""
    uid = SandboxLimits().uid if os.geteuid() == 0 else os.getuid()
    user = pwd.getpwuid(uid).pw_name
    listed = subprocess.run(["ps", "-u", user, "-o", "stat=,cmd="], capture_output=True, text=True).stdout.splitlines()
    return [
        line for line in listed if not line.strip().startswith("Z") and ("bwrap" in line or "python3 -I -S" in line)
    ]


def test_correct_and_wrong_completions_score_one_and_zero():
    assert score("return a + b") == 1.0
    assert score("return a - b") == 0.0
    assert score("return a +") == 0.0  # syntax error


def test_exiting_early_with_status_zero_does_not_pass():
    module_level_exit = "    return a + b\nimport sys\nsys.exit(0)\n"  # the tests never run
    assert code_tests_reward([PROMPT], [module_level_exit], [PROMPT], [TESTS], ["add"], **LIMITS) == [0.0]
    assert score("import os\nos._exit(0)") == 0.0


def test_infinite_loop_is_stopped_at_its_limits():
    started = time.perf_counter()
    assert score("while True:\n    pass") == 0.0
    assert time.perf_counter() - started < LIMITS["wall_seconds"] + 3
    sleeping = run_python("import time\ntime.sleep(60)", SandboxLimits(wall_seconds=1.5))
    assert sleeping.timed_out and sleeping.seconds < 4  # no CPU used: the wall clock stops it


def test_fork_bomb_is_contained_and_leaves_no_process():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.perf_counter()
    assert score(bomb + "\nreturn a + b") == 0.0
    assert time.perf_counter() - started < LIMITS["wall_seconds"] + 3
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sandbox_processes() == []
    counted = run_python(
        "import os\nn = 0\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n            import time; time.sleep(2); os._exit(0)\n"
        "        n += 1\n    except OSError:\n        pass\nprint(n)",
        SandboxLimits(max_processes=6),
    )
    assert 0 < int(counted.stdout) < 6  # the process limit holds (bwrap's init and the program count too)


def test_huge_allocation_fails_fast():
    started = time.perf_counter()
    assert score("x = bytearray(50 * 2**30)\nreturn a + b") == 0.0
    assert time.perf_counter() - started < 3  # refused by RLIMIT_AS, not swapped in
    result = run_python("x = bytearray(50 * 2**30)", SandboxLimits(memory_mb=256))
    assert "MemoryError" in result.stderr


def test_host_files_can_be_neither_read_deleted_nor_written(tmp_path: Path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    target.chmod(0o666)
    tmp_path.chmod(0o777)  # even world-writable host directories stay out of reach
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("s3cret-file")
    secret_file.chmod(0o644)
    assert score(f"import os\nos.remove({str(target)!r})\nreturn a + b") == 0.0
    assert score(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\nreturn a + b") == 0.0
    assert score("open('/usr/pwned', 'w').write('x')\nreturn a + b") == 0.0
    assert score("open('/tmp/pwned', 'w').write('x')\nreturn a + b") == 0.0
    assert score(f"return a + b if 's3cret' in open({str(secret_file)!r}).read() else 0") == 0.0
    assert (
        score(
            "import shutil\nshutil.rmtree('/usr/lib/python3', ignore_errors=True)\nimport os\nreturn a + b if not os.path.exists('/usr/lib/python3') else 0"
        )
        == 0.0
    )
    assert target.read_text() == "keep me"
    assert not (tmp_path / "pwned").exists() and not Path("/usr/pwned").exists() and not Path("/tmp/pwned").exists()
    assert Path("/usr/lib/python3").exists()
    listing = run_python("import os\nprint(sorted(os.listdir('/')))").stdout
    assert "work" in listing and "root" not in listing and "home" not in listing and "etc" not in listing


def test_the_working_directory_is_writable_but_thrown_away():
    first = run_python("open('note.txt', 'w').write('hi')\nimport os\nprint(os.getcwd(), os.listdir('.'))")
    assert first.returncode == 0 and "note.txt" in first.stdout
    assert "note.txt" not in run_python("import os\nprint(os.listdir('.'))").stdout  # a fresh directory every run
    big = run_python("open('big', 'wb').write(b'x' * (64 << 20))", SandboxLimits(file_size_mb=8))
    assert big.returncode != 0  # RLIMIT_FSIZE (and the tmpfs size) cap what a program can write


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("RLKIT_TEST_SECRET", "hunter2-env")
    attack = (
        "import os, glob\nseen = str(dict(os.environ))\nfor path in glob.glob('/proc/*/environ'):\n    try:\n        seen += open(path, 'rb').read().decode(errors='ignore')\n"
        "    except OSError:\n        pass\nreturn a + b if 'hunter2' in seen else 0"
    )
    assert score(attack) == 0.0
    assert "hunter2" not in run_python("import os\nprint(dict(os.environ))").stdout


def test_network_is_unreachable_even_on_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        attack = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nreturn a + b"
        assert score(attack) == 0.0
        assert score("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nreturn a + b") == 0.0
        with pytest.raises(socket.timeout):
            server.accept()  # nothing connected to the host
    finally:
        server.close()


def test_output_flood_is_capped():
    result = run_python(
        "while True:\n    print('x' * 100000)", SandboxLimits(wall_seconds=3, file_size_mb=4, output_bytes=1000)
    )
    assert len(result.stdout) == 1000  # the caller keeps only output_bytes; the file was capped at 4 MB


# Completions that try to forge a pass instead of computing the answer: each must score 0.
FORGERIES = {
    "an object equal to everything": "class Any:\n    __eq__ = lambda self, other: True\nreturn Any()",
    "an int whose == is always true": "class Yes(int):\n    __eq__ = lambda self, other: True\nreturn Yes(0)",
    "a list subclass equal to everything": "class L(list):\n    __eq__ = lambda self, other: True\nreturn L()",
    "builtins patched for the tests": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = None\nreturn -1",
    "the pass marker read from its own code and printed": (
        "import gc, os, sys\n"
        "texts = [c for o in gc.get_objects() if type(o).__name__ == 'code' for c in o.co_consts if isinstance(c, str)]\n"
        "frame = sys._getframe()\n"
        "while frame:\n"
        "    texts += [c for c in frame.f_code.co_consts if isinstance(c, str)]\n"
        "    frame = frame.f_back\n"
        "print(*[t for t in texts if 'passed' in t], flush=True)\n"
        "os._exit(0)"
    ),
    "an exit hook that claims success": (
        "import atexit, os, sys\n"
        "atexit.register(lambda: (print('all tests passed', flush=True), os._exit(0)))\n"
        "sys.excepthook = lambda *a: None\n"
        "return -1"
    ),
    "a fake result written to every pipe before any call": (
        "import os\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        "        os.write(fd, b'{\"return\": true}\\n' * 10)\n"
        "    except OSError:\n"
        "        pass\n"
        "return -1"
    ),
    "the test process killed": "import os, signal\nfor pid in range(1, 200):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nreturn -1",
}


@pytest.mark.parametrize("attack", FORGERIES, ids=list(FORGERIES))
def test_a_completion_cannot_forge_a_pass(attack: str):
    assert score(FORGERIES[attack]) == 0.0


def test_results_cross_as_plain_data_with_exact_types():
    assert score("return float(a + b)") == 1.0  # 5.0 == 5: values compare as the tests wrote them
    exact = "assert add((1,), (2,)) == (1, 2) and type(add((1,), (2,))) is tuple\nassert add({1}, set()) == {1}\n"
    assert code_tests_reward(
        [PROMPT], ["    return a + b if type(a) is tuple else a | b\n"], [PROMPT], [exact], ["add"], **LIMITS
    ) == [1.0]
    raises = "try:\n    add(1, 'x')\nexcept TypeError:\n    pass\nelse:\n    raise AssertionError\n"
    assert code_tests_reward([PROMPT], ["    return a + b\n"], [PROMPT], [raises], ["add"], **LIMITS) == [1.0]


def test_rows_without_an_entry_point_run_program_and_tests_in_one_process():
    assert code_tests_reward([PROMPT], ["    return a + b\n"], [PROMPT], [TESTS], [""], **LIMITS) == [1.0]
    assert code_tests_reward([PROMPT], ["    return a - b\n"], [PROMPT], [TESTS], [""], **LIMITS) == [0.0]


def test_program_source_continues_the_prompt_or_takes_a_fenced_function():
    assert (
        program_source(PROMPT, "    return a + b\n\ndef extra(): pass\nprint(1)") == PROMPT + "    return a + b\n"
    )  # HumanEval stop sequences
    fenced = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert program_source(PROMPT, fenced, "add") == "def add(a, b):\n    return a + b\n"
    assert program_source(PROMPT, "```python\n    return a + b\n```", "add") == PROMPT + "    return a + b\n"
