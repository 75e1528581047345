"""Stop one local Ray head (the one `make cluster-up` started with `--temp-dir DIR`) and nothing else.

    python -m rayfoundry.local_head stop /tmp/rayfoundry-head-6379      # what `make cluster-down` runs

`ray stop` has no option to stop one head: it kills every Ray process of the user on the machine,
including a test session's or another project's. A head's processes are the Ray processes
(gcs_server, raylet, python running a module or script of the ray package: dashboard, monitor, log
monitor, Ray Client server; or a `ray::` process) whose command line or open files name its temp
dir, and all their descendants: the dashboard and runtime-env agents, workers, job drivers and the
dashboard's module processes carry no path in their command line, and the Ray Client server names
it only in its open log files. They get SIGTERM in `ray stop`'s order (raylet first, GCS last) and
SIGKILL after 10 s; the command fails if any is left.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import psutil


class HeadProcesses:
    def __init__(self, temp_dir: str):
        self.root = os.path.abspath(temp_dir)
        self.roots = {self.root, os.path.realpath(temp_dir)}
        self.ray_pkg = importlib.util.find_spec("ray").submodule_search_locations[0] + os.sep
        self.spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}

    def names_root(self, arg: str) -> bool:
        path = arg.split("=", 1)[-1]
        return any(path == r or path.startswith(r + os.sep) for r in self.roots)

    def is_ray(self, cmd: list[str]) -> bool:
        cmd = [*cmd, "", "", ""]
        return (any(a.startswith(self.ray_pkg) for a in cmd[:3]) or (cmd[1] == "-m" and cmd[2].startswith("ray."))
                or cmd[0].startswith(("ray::", "ray-dashboard-")))

    def opens_root(self, pid: int) -> bool:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            try:
                if self.names_root(os.readlink(f"/proc/{pid}/fd/{fd}")):
                    return True
            except OSError:
                pass
        return False

    def find(self) -> list[psutil.Process]:
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if p.pid in self.spared or not self.is_ray(cmd):
                continue
            if not (any(map(self.names_root, cmd)) or self.opens_root(p.pid)):
                continue
            try:
                found.update({q.pid: q for q in [p, *p.children(recursive=True)] if q.pid not in self.spared})
            except psutil.Error:
                pass
        return [p for p in found.values() if _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _stop(procs: list[psutil.Process], grace: float) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    alive = [p for p in psutil.wait_procs(procs, timeout=grace)[1] if _running(p)]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_head(temp_dir: str) -> int:
    """Stop the head whose session lives in `temp_dir`; 0 when none is left running, 1 otherwise."""
    head = HeadProcesses(temp_dir)
    procs = head.find()
    if not procs:
        print(f"No Ray process of the head in {head.root} is running.")
        return 0
    names = {p.pid: _name(p) for p in procs}
    print(f"Stopping {len(procs)} processes of the Ray head in {head.root}: " + ", ".join(sorted(set(names.values()))))
    _stop([p for p in procs if names[p.pid] == "raylet"], 10)
    _stop([p for p in procs if names[p.pid] not in ("raylet", "gcs_server")], 10)
    _stop([p for p in procs if names[p.pid] == "gcs_server"], 10)
    for _ in range(3):
        left = head.find()
        if left:
            _stop(left, 5)
    left = head.find()
    if left:
        print(f"still running: {', '.join(f'{_name(p)} ({p.pid})' for p in left)}", file=sys.stderr)
        return 1
    print(f"Stopped all {len(procs)} processes; other Ray processes were left alone.")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "stop":
        sys.exit("usage: python -m rayfoundry.local_head stop TEMP_DIR")
    sys.exit(stop_head(sys.argv[2]))
