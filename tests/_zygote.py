"""Rank processes forked from one process that has already imported torch, DeepSpeed,
transformers and splitlora_ds: multi-rank tests without paying those imports in every rank
(about 6 s of CPU per rank, which is most of a tiny test run on 2 cores).

The zygote is spawned once per test session, sets the thread settings every rank gets
(OMP_NUM_THREADS=1, as the launcher tests always ran, and OMP_WAIT_POLICY) before torch loads,
imports, and then only forks: it never runs a torch op itself, so no OpenMP or autograd thread
exists to be lost across fork. Each request forks one child per rank with the deepspeed
launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), runs
`splitlora_ds.train` (or a script) with the given arguments, and returns the ranks' exit codes
and their stdout/stderr, rank after rank, as a CompletedProcess (whose `ranks` holds each rank's
own CompletedProcess: its exit code, stdout and stderr)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional


def _serve(conn, root: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(Path(root) / "tests"))
    import deepspeed  # noqa: F401 - the point is to import once, before forking
    import transformers  # noqa: F401

    import splitlora_ds.prepare  # noqa: F401
    import splitlora_ds.train  # noqa: F401
    import splitlora_ds.trainer  # noqa: F401

    while True:
        request = conn.recv()
        if request is None:
            return
        conn.send(_run(*request))


def _run(nprocs: int, args: list[str], script: Optional[str], timeout: float, cwd: str, env: dict,
         ranks_env: bool) -> tuple[int, str, str, list]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        pids = []
        for rank in range(nprocs):
            pid = os.fork()
            if pid == 0:  # the rank
                _child(rank, nprocs, port, args, script, cwd, env, ranks_env, Path(tmp))
            pids.append(pid)
        codes = _wait(pids, timeout)
        outs = [(Path(tmp) / f"{r}.out").read_text(errors="replace") for r in range(nprocs)]
        errs = [(Path(tmp) / f"{r}.err").read_text(errors="replace") for r in range(nprocs)]
    ranks = list(zip(codes, outs, errs))
    out, err = "".join(outs), "".join(errs)
    if any(c is None for c in codes):
        return 124, out, err + f"\nzygote: ranks still running after {timeout} s were killed\n", ranks
    return next((c for c in codes if c != 0), 0), out, err, ranks


def _child(rank: int, world: int, port: int, args: list[str], script: Optional[str], cwd: str, env: dict,
           ranks_env: bool, tmp: Path) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        for stream, name in ((1, "out"), (2, "err")):
            fd = os.open(tmp / f"{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, stream)
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        os.environ.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        if ranks_env:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if script is None:
            from splitlora_ds.train import main

            code = main(list(args))
        else:
            import runpy

            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the rank's stderr, as a real process would
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pids: list[int], timeout: float) -> list[Optional[int]]:
    codes: dict[int, Optional[int]] = {pid: None for pid in pids}
    deadline = time.monotonic() + timeout
    while any(c is None for c in codes.values()) and time.monotonic() < deadline:
        for pid, code in codes.items():
            if code is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid, code in codes.items():
        if code is None:  # past the timeout: the rank and anything it started
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
    return [codes[pid] for pid in pids]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Zygote:
    def __init__(self, root: Path):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, str(root)), daemon=True)
        self._proc.start()

    def run(self, nprocs: int, args: list[str], script: Optional[str] = None, timeout: float = 300,
            cwd: Optional[Path] = None, env: Optional[dict] = None, ranks_env: bool = True) -> subprocess.CompletedProcess:
        self._conn.send((nprocs, list(args), script, timeout, str(cwd), dict(env or os.environ), ranks_env))
        code, out, err, ranks = self._conn.recv()
        proc = subprocess.CompletedProcess(["zygote", str(nprocs), *args], code, out, err)
        proc.ranks = [subprocess.CompletedProcess([str(r)], c, o, e) for r, (c, o, e) in enumerate(ranks)]
        return proc

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=10)
