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

import dataclasses
import functools
import os
import shutil
import subprocess
import tempfile
import time

LAUNCHER = """
import resource, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
exec(compile(sys.stdin.read(), "solution.py", "exec"), {{"__name__": "__main__"}})
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


def bwrap_command(limits: SandboxLimits) -> list[str]:
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
        LAUNCHER.format(limits=limits.rlimits()),
    ]


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as a Python program in a fresh sandbox. Whatever the program does
    (crash, hang, fork bomb, huge allocation or output) comes back as a result; the
    output goes to files capped by RLIMIT_FSIZE, never into the caller's memory."""
    as_root = os.geteuid() == 0
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            bwrap_command(limits),
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
            env={},
            start_new_session=True,
            user=limits.uid if as_root else None,
            group=limits.uid if as_root else None,
            extra_groups=[] if as_root else None,
        )
        try:
            process.communicate(source.encode(), timeout=limits.wall_seconds)
            returncode = process.returncode
        except subprocess.TimeoutExpired:
            process.kill()  # bwrap's PID-namespace init dies with it (--die-with-parent), and with it every process inside
            process.wait()
            returncode = None
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
