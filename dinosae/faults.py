"""Fault injection for the reliability tests: kill a job at a chosen point of its work.

Set `DINOSAE_FAULT="<point>@<count>[:<signal>]"` in a job's environment and the job sends itself
the signal (default SIGKILL: no handler, no cleanup, as a node failure or the OOM killer) when it
reaches `<point>` for the `<count>`-th time. The long jobs call `fault_point` right after a unit
of work is durable:

    shard-<split>     a finished tar (count: finished tars, those of a resumed run included)
    ae-stage<k>       a finished optimisation step (count: the step number)
    encode-part<i>    a written cache unit of region i (count: units written by this run)
    train-dit         a finished step (count: the step number)
    sample            a written batch of samples (count: samples done)

Several faults are separated by commas. Without the variable this is a no-op.

`<point>@<first>[-<last>]:nan` instead makes a training step's input non-finite (so its loss
is), for the divergence-recovery tests: `nan_fault(point)` is True on the `<first>`-th to
`<last>`-th call in this process (counted per process, so that a step run again after a
rollback is not poisoned again):

    train-dit-loss    a DiT step's data tokens
    ae-stage<k>-loss  an autoencoder step's images
"""

from __future__ import annotations

import os
import signal

ENV = "DINOSAE_FAULT"


def _parse(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, sig = item.partition(":")
        if sig.lower() == "nan":  # nan_fault's
            continue
        point, _, count = where.partition("@")
        if not point or not count.isdigit():
            raise ValueError(f"{ENV}: {item!r} is not <point>@<count>[:<signal>]")
        faults[point] = (int(count), signal.Signals[f"SIG{(sig or 'KILL').upper()}"])
    return faults


def fault_point(point: str, count: int) -> None:
    """Send this process the configured signal if `point` is at its configured `count`."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    fault = _parse(spec).get(point)
    if fault is not None and fault[0] == count:
        os.kill(os.getpid(), fault[1])


_calls: dict[str, int] = {}


def nan_fault(point: str) -> bool:
    """True when this call of `point` (counted in this process) is in a configured
    `<point>@<first>[-<last>]:nan` range."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    n = _calls[point] = _calls.get(point, 0) + 1
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, kind = item.partition(":")
        name, _, span = where.partition("@")
        if kind.lower() != "nan" or name != point:
            continue
        first, _, last = span.partition("-")
        if not first.isdigit() or not (last or first).isdigit():
            raise ValueError(f"{ENV}: {item!r} is not <point>@<first>[-<last>]:nan")
        if int(first) <= n <= int(last or first):
            return True
    return False
