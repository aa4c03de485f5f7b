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

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
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
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    who = f"client {call.get('client_id', '?')}"
    proc = ctx.Process(target=_child, args=(send, fn, call), name=f"fedlease-{who.replace(' ', '-')}", daemon=True)
    proc.start()
    send.close()  # the child holds the only writer: its exit shows here as EOF
    try:
        if not receive.poll(timeout_s):
            raise TimeoutError(f"{who}: no result after {timeout_s:g} s (orchestration.task_timeout_s); "
                               "its process was killed")
        try:
            status, payload = receive.recv()
        except EOFError:
            proc.join()
            raise ClientProcessDied(f"{who}: its process ended (exit code {proc.exitcode}) without a result"
                                    ) from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receive.close()
    if status == "error":
        raise payload
    return payload


def _child(send: Connection, fn: ClientFn, call: dict[str, Any]) -> None:
    # (a port inherited from a parent that ran DeepSpeed itself: the engine picks its own, trainer.py)
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
