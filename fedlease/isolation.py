"""Client calls in their own process (`orchestration.fresh_process`), or in this one.

A long-lived worker keeps its memory flat on a CPU (benchmarks/README.md), but a GPU's memory
(CUDA context, allocator caches, fragmentation) is only ever fully given back when the process ends.
With `fresh_process: true` every client call (warm-up, each local round, each evaluation) runs in a
new spawned process that exits when the call returns. That also makes `task_timeout_s` enforceable
under every task runner (a hung call is killed), and a client that crashes its process (a hard
out-of-memory abort, a segfault in a kernel) becomes a failed call instead of a dead worker. The
price is the start-up per call: importing torch and DeepSpeed and loading the base model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.process
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

ClientFn = Callable[..., dict[str, Any]]


class ClientProcessDied(ChildProcessError):
    """The process running a client call ended without returning (killed, crashed, out of memory)."""


def run_client_call(fn: ClientFn, call: dict[str, Any]) -> dict[str, Any]:
    """`fn(**call)`, in a fresh process when the call's config asks for one."""
    orchestration = call["cfg"].orchestration
    if not orchestration.fresh_process:
        return fn(**call)
    return run_in_fresh_process(fn, call, orchestration.task_timeout_s)


def run_in_fresh_process(fn: ClientFn, call: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run `fn(**call)` in a spawned process (spawn, never fork: CUDA cannot be forked); its exception
    is raised here; past `timeout_s` the process is killed and TimeoutError raised."""
    who = f"client {call.get('client_id', '?')}"
    # a daemonic process may not start children: a call that spawns its rank group (fedlease/ranks.py) runs
    # in a non-daemonic one (await_processes still kills it on failure)
    spawns = call["cfg"].training.deepspeed.ranks_per_client > 1
    return await_processes([start_process(fn, call, who, daemon=not spawns)], timeout_s)[0]


@dataclass
class StartedCall:
    """A client call running in its own process, and the pipe its result comes back on."""

    who: str
    proc: multiprocessing.process.BaseProcess
    receive: Connection


def start_process(fn: ClientFn, call: dict[str, Any], who: str, env: dict[str, str] | None = None,
                  daemon: bool = True) -> StartedCall:
    """Start `fn(**call)` in a spawned process, with `env` set in it before `fn` runs."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, call, env or {}), name=f"fedlease-{who.replace(' ', '-')}",
                       daemon=daemon)
    proc.start()
    send.close()  # the child holds the only writer: its exit shows here as EOF
    return StartedCall(who, proc, receive)


def await_processes(started: list[StartedCall], timeout_s: float) -> list[Any]:
    """Every started call's result, in order. The first failure (an exception, a process that died, the
    timeout) kills the others and is raised, naming the call; nothing is left running either way."""
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    pending = {s.receive: i for i, s in enumerate(started)}
    try:
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                who = ", ".join(started[i].who for i in pending.values())
                raise TimeoutError(f"{who}: no result after {timeout_s:g} s (orchestration.task_timeout_s); "
                                   "its process was killed")
            for conn in ready:
                i = pending.pop(conn)  # type: ignore[call-overload]
                call = started[i]
                try:
                    status, payload = call.receive.recv()
                except EOFError:
                    call.proc.join()
                    raise ClientProcessDied(f"{call.who}: its process ended (exit code {call.proc.exitcode}) "
                                            "without a result") from None
                if status == "error":
                    payload.add_note(f"(in {call.who})")  # a group's failure names its process
                    raise payload
                results[i] = payload
    finally:
        for call in started:
            if call.receive in pending:
                call.proc.kill()
            call.proc.join(timeout=30)  # one that reported but hangs in its teardown is killed too
            if call.proc.is_alive():
                call.proc.kill()
                call.proc.join()
            call.receive.close()
    return [results[i] for i in range(len(started))]


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the one that started it dies, however it dies (a silo's flow
    run cancelled and killed, an out-of-memory kill): no orphaned client process keeps a GPU. A no-op
    elsewhere (there the parent's own cleanup is all there is)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _child(send: Connection, fn: ClientFn, call: dict[str, Any], env: dict[str, str]) -> None:
    # (a port inherited from a parent that ran DeepSpeed itself: the engine picks its own, trainer.py)
    die_with_parent()
    os.environ.update(env)
    try:
        message: tuple[str, Any] = ("ok", fn(**call))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        message = ("error", exc)
    try:
        send.send(message)
    except Exception as exc:  # noqa: BLE001 - what does not pickle goes back as text
        send.send(("error", RuntimeError(f"{type(message[1]).__name__}: {message[1]} "
                                         f"(could not be sent back from the client process: {exc})")))
    send.close()
