"""Workloads: a service on the emulated machine and the clients that use it.

Promises to the driver (harness/driver.py), which calls these in this order for every
trial and every scheme alike:

* ``prepare(svc)`` — optional data set, written through a kernel booted only for it and
  shut down cleanly before the scheme deploys (so every scheme starts from the same disk);
* ``apps(svc)`` — the applications of the active partition (kernel.core.proc.AppSpec fields):
  what a recovering kernel restarts or migrates;
* ``wait_ready(svc, timeout)`` — returns once the service answers a client in the client
  namespace, or raises ``WorkloadError``;
* ``start_clients(svc, until)`` — client processes that run until the monotonic deadline
  ``until`` (or a bounded number of operations) and record every operation in their own
  history file (harness/history.py); they compute nothing;
* ``verify(svc, events)`` — after recovery, re-reads everything an acknowledged operation
  promised, recording it as ``verify`` operations of one more history file.

Declared on ``Workload``, with defaults for a workload that has none of these (every
workload subclasses it; the registry finds them through the ``crashbench.workloads`` entry
points):

* ``prepares`` — whether the driver boots a kernel for ``prepare`` (default False);
* ``client_module`` — the module whose ``main(args)`` runs one of its clients, which the
  workload launches with ``clients.launch`` (so a campaign may keep processes that have it
  loaded across a machine's faults: ``Service.pool``, harness/workloads/pool.py; default
  None: its clients are processes of their own, never pooled);
* ``prepared(svc)`` — the files ``prepare`` leaves beside the disk for later phases (the
  corpus's manifest), which a campaign copies with the disk images into the next machines
  instead of preparing again (default: none);

For figures the generic checkers cannot know (harness/trial.py merges them):

* ``extra_phases(svc, events) -> {name: seconds}`` — phases of the outage the scheme's
  RecoveryReport cannot see (e.g. a server's own start-up and crash recovery), measured by
  the workload (from the server's log), added to the trial's ``phases``;
* ``checks(svc, events) -> {name: dict}`` — the workload's own checkers' figures (e.g.
  harness/checkers/bank.py), kept in the trial's ``checks`` (default None: no ``checks``);
  a check whose ``ok`` is False failed the trial's verify (the report lists its
  ``findings``), None: it could not judge;
* ``explain(svc, keys, events) -> {key: dict}`` — for the keys read back corrupted, what
  the recovered machine holds and where it came from, taken before the machine goes (kept
  as the trial's ``evidence``; default: nothing to say);
* ``shares_machine`` and ``forget(svc, events)`` — whether faults may follow one another
  on one machine (a campaign's fast faults, harness/campaign/session.py), and what is done
  between two: forget what the clients wrote, so the next fault's verify judges only its
  own writes (default False: a fresh machine per fault);
* ``warmup_s`` — seconds of load the workload needs before it is steady (its caches
  filled from the disk): `crashbench overhead`'s warm-up unless --warmup is given
  (default None: the benchmark's own, and a crash run's --warmup default);
* ``cache_pages(svc)`` — pages of file data the workload's working set fills: the
  driver's warm-up goes on until the active kernel caches that many (bounded in time;
  default None: no cache to fill).

``Idle`` is the no-op workload: no service, no clients; the driver's own tests use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar


class WorkloadError(RuntimeError):
    """The workload's service or clients did not do what the driver needs."""


@dataclass
class Service:
    """Everything a workload may know of the trial it runs in."""

    mount: str  # where the active kernel serves the file system
    ip: str  # the service address (the NIC's, moved on takeover)
    client_netns: str | None  # the clients' namespace (None: loopback mode)
    workdir: Path  # the trial's scratch directory (logs/, histories)
    seed: int  # this trial's: the clients' draws and the data they write
    params: dict = field(default_factory=dict)
    data_seed: int | None = None  # the prepared data set's (None: ``seed``)
    datadir: Path | None = None  # what ``prepare`` left for later clients (default: workdir)
    pool: object | None = None  # client processes kept across faults (workloads/pool.py)

    @property
    def dataset_seed(self) -> int:
        """The seed the prepared data set is made with: one per run, so every trial of a
        run serves the same corpus and repeats one workload (docs/WORKLOADS.md)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def data_dir(self) -> Path:
        """Where the prepared data set's description lives: the machine's, shared by the
        faults a campaign runs on one machine, each with its own ``workdir``."""
        return self.datadir if self.datadir is not None else self.workdir

    @property
    def client_enter(self) -> Callable[[], None] | None:
        from kernel.hw.net import enter_netns

        return enter_netns(self.client_netns) if self.client_netns else None

    def history_dir(self) -> Path:
        d = self.workdir / "histories"
        d.mkdir(exist_ok=True)
        return d


class Workload:
    """What the driver, the trial record and the overhead benchmark use of a workload."""

    name: ClassVar[str]
    description: ClassVar[str]
    defaults: ClassVar[dict]
    prepares: ClassVar[bool] = False
    warmup_s: ClassVar[float | None] = None
    client_module: ClassVar[str | None] = None

    def prepare(self, svc: Service) -> None: ...
    def apps(self, svc: Service) -> list[dict]: ...
    def wait_ready(self, svc: Service, timeout: float) -> None: ...
    def start_clients(self, svc: Service, until: float): ...
    def verify(self, svc: Service, events: list[dict]) -> Path | None: ...

    def prepared(self, svc: Service) -> list[Path]:
        return []

    def extra_phases(self, svc: Service, events: list[dict]) -> dict[str, float]:
        return {}

    def checks(self, svc: Service, events: list[dict]) -> dict | None:
        return None

    def cache_pages(self, svc: Service) -> int | None:
        return None

    def explain(self, svc: Service, keys: list[str], events: list[dict]) -> dict[str, dict]:
        return {}

    shares_machine = False

    def forget(self, svc: Service, events: list[dict]) -> None:
        raise WorkloadError(
            f"{self.name}: cannot run a fault on a machine an earlier fault "
            f"ran on (shares_machine is False)"
        )


class Idle(Workload):
    name = "idle"
    description = "no service and no clients: the driver's null workload"
    defaults: dict = {}

    def prepare(self, svc: Service) -> None:
        pass

    def apps(self, svc: Service) -> list[dict]:
        return []

    def wait_ready(self, svc: Service, timeout: float) -> None:
        pass

    def start_clients(self, svc: Service, until: float):
        from harness.workloads.clients import ClientGroup

        return ClientGroup([], [])

    def verify(self, svc: Service, events: list[dict]) -> Path | None:
        return None

    shares_machine = True

    def forget(self, svc: Service, events: list[dict]) -> None:
        pass


WORKLOAD_GROUP = "crashbench.workloads"


def registry() -> dict[str, type[Workload]]:
    from systems.base import load_group

    return load_group(WORKLOAD_GROUP, Workload)
