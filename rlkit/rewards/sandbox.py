"""Run untrusted Python (model completions) in a throw-away sandbox.

Each call starts one process tree under bubblewrap (``bwrap``): new user, PID,
network, IPC, UTS and cgroup namespaces (``--unshare-all``: no network at all), a
root file system holding only ``/usr`` read-only plus a size-capped tmpfs as the
working directory, an empty environment, and resource limits set inside the
sandbox before the code runs: CPU seconds, address space, processes, file size
and open files. The parent kills the tree after ``wall_seconds``; ``--die-with-parent``
and the PID namespace make every process of the tree die with it.

Started as root, bwrap runs as the unprivileged ``uid`` (the process-count limit,
RLIMIT_NPROC, does not bind root). The count is kept per user namespace, so
concurrent sandboxes with the same uid do not share it. docs/tasks-and-rewards.md
lists what is and is not guaranteed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rlkit.rewards import harness

HARNESS_SOURCE = Path(harness.__file__).read_text()

LAUNCHER = """
import resource, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
exec(compile(sys.stdin.read(), "solution.py", "exec"), {{"__name__": "__main__"}})
"""
# One side of the two-process test harness (rlkit/rewards/harness.py, whose source comes with the payload).
HARNESS_LAUNCHER = """
import json, resource, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
payload = json.loads(sys.stdin.read())
harness = {{"__name__": "rlkit_harness"}}
exec(compile(payload.pop("harness"), "harness.py", "exec"), harness)
harness["main"](payload)
"""


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    wall_seconds: float = 10.0  # the whole tree is killed after this long
    cpu_seconds: int = 5  # RLIMIT_CPU per process
    memory_mb: int = 512  # RLIMIT_AS per process (address space, so a 50 GB allocation fails at once)
    max_processes: int = 8  # RLIMIT_NPROC inside the sandbox's user namespace (threads count too)
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file a process may write
    open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of the writable working directory (RAM-backed)
    uid: int = 65534  # the user bwrap runs as when started by root (nobody)
    output_bytes: int = 65536  # stdout/stderr kept for the caller

    def rlimits(self) -> list[tuple[str, int]]:
        mb = 1 << 20
        return [
            ("RLIMIT_CPU", self.cpu_seconds),
            ("RLIMIT_AS", self.memory_mb * mb),
            ("RLIMIT_NPROC", self.max_processes),
            ("RLIMIT_FSIZE", self.file_size_mb * mb),
            ("RLIMIT_NOFILE", self.open_files),
            ("RLIMIT_CORE", 0),
        ]


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None  # None when killed at the wall-time limit
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def sandbox_interpreter() -> str:
    """A Python inside ``/usr`` (the only host tree the sandbox sees)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise SandboxUnavailable("no python3 under /usr/bin or /usr/local/bin for the sandbox")


def bwrap_command(limits: SandboxLimits, launcher: str = LAUNCHER) -> list[str]:
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    system = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{name}"):
            system += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
        elif os.path.isdir(f"/{name}"):
            system += ["--ro-bind", f"/{name}", f"/{name}"]
    return [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/work",
        "--setenv",
        "PYTHONDONTWRITEBYTECODE",
        "1",
        *system,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(limits.tmpfs_mb << 20),
        "--tmpfs",
        "/work",
        "--chdir",
        "/work",
        sandbox_interpreter(),
        "-I",
        "-S",
        "-c",
        launcher.format(limits=limits.rlimits()),
    ]


def start_sandbox(
    limits: SandboxLimits, launcher: str, stdin: bytes, stdout, stderr, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen:
    """One sandboxed interpreter running ``launcher``, fed ``stdin`` (then closed)."""
    as_root = os.geteuid() == 0
    process = subprocess.Popen(
        bwrap_command(limits, launcher),
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
        env={},
        pass_fds=pass_fds,
        start_new_session=True,
        user=limits.uid if as_root else None,
        group=limits.uid if as_root else None,
        extra_groups=[] if as_root else None,
    )
    with contextlib.suppress(BrokenPipeError):  # a process that exits before reading its input
        process.stdin.write(stdin)
        process.stdin.close()
    return process


def wait_or_kill(process: subprocess.Popen, deadline: float) -> int | None:
    """The exit status, or None if it was still running at ``deadline`` (then killed: bwrap's
    PID-namespace init dies with it, --die-with-parent, and with it every process inside)."""
    try:
        return process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as a Python program in a fresh sandbox. Whatever the program does
    (crash, hang, fork bomb, huge allocation or output) comes back as a result; the
    output goes to files capped by RLIMIT_FSIZE, never into the caller's memory."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = start_sandbox(limits, LAUNCHER, source.encode(), stdout, stderr)
        returncode = wait_or_kill(process, time.monotonic() + limits.wall_seconds)
        return SandboxResult(
            returncode,
            read_head(stdout, limits.output_bytes),
            read_head(stderr, limits.output_bytes),
            time.perf_counter() - started,
        )


def run_tested(
    program: str, prompt: str, tests: str, entry_point: str, limits: SandboxLimits = SandboxLimits()
) -> SandboxResult:
    """Run the row's ``tests`` against ``entry_point`` of ``program`` in two sandboxes joined by
    two pipes (see :mod:`rlkit.rewards.harness`); the result is the tester's: exit status 0
    means every test passed. Both are killed after ``limits.wall_seconds``."""
    started = time.perf_counter()
    calls_read, calls_write = os.pipe()
    results_read, results_write = os.pipe()
    common = {"harness": HARNESS_SOURCE, "entry_point": entry_point}
    solver_payload = {**common, "role": "solver", "program": program, "calls": calls_read, "results": results_write}
    tester_payload = {**common, "role": "tester", "prompt": prompt, "tests": tests}
    tester_payload.update(calls=calls_write, results=results_read)
    deadline = time.monotonic() + limits.wall_seconds
    with contextlib.ExitStack() as stack:
        stdout, stderr = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
        try:
            solver = start_sandbox(
                limits,
                HARNESS_LAUNCHER,
                json.dumps(solver_payload).encode(),
                subprocess.DEVNULL,
                subprocess.DEVNULL,
                (calls_read, results_write),
            )
            stack.callback(wait_or_kill, solver, 0.0)  # the solver ends with the tester
            tester = start_sandbox(
                limits,
                HARNESS_LAUNCHER,
                json.dumps(tester_payload).encode(),
                stdout,
                stderr,
                (calls_write, results_read),
            )
        finally:
            for fd in (calls_read, calls_write, results_read, results_write):
                os.close(fd)
        returncode = wait_or_kill(tester, deadline)
        return SandboxResult(
            returncode,
            read_head(stdout, limits.output_bytes),
            read_head(stderr, limits.output_bytes),
            time.perf_counter() - started,
        )


def read_head(file, size: int) -> str:
    file.seek(0)
    return file.read(size).decode(errors="replace")


@functools.cache
def check_sandbox() -> None:
    """Raise :class:`SandboxUnavailable` unless a trivial program runs in the sandbox (checked once)."""
    result = run_python("print('ok')", SandboxLimits(wall_seconds=30))
    if result.returncode != 0 or result.stdout.strip() != "ok":
        raise SandboxUnavailable(
            f"the sandbox cannot run here: {(result.stderr.strip().splitlines() or ['no output'])[0]}"
        )
