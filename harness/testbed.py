"""The testbed: one emulated machine brought up and taken down, the same way for everyone.

Promises to the driver, the lab's supervisor, every bench, the overhead benchmark and the
tests: ``with Testbed(...) as tb`` gives a machine whose work directory, physical memory and
formatted disks exist (and its network, when asked for and the machine has a NIC), recorded
in harness/owners.py before anything of it exists (unless another process, a lab, owns it).
Whatever ends the block — a normal exit, an exception, Ctrl-C or SIGTERM — the scheme that
was deployed on it is torn down, then every kernel, mount, process set and the memory file
of the host, then the network, the logs are kept where asked, a work directory the testbed
made is removed, and only then is the machine forgotten by the ownership records: a
machine whose teardown failed stays findable by `crashbench down --all`.

SIGTERM becomes SystemExit while the block runs in the main thread (unless the process has a
handler of its own, like the CLI's, which is kept), so the teardown runs for a terminated
process as it does for Ctrl-C; a second SIGTERM does not cut the teardown short; the
previous handler is put back afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness import owners
from kernel.hw import machine as machine_mod
from kernel.hw.host import Host
from kernel.tools.mkfs import format_disks


@dataclass
class Testbed:
    __test__ = False  # a fixture of the tests, not a test class
    kind: str = "run"  # the ownership record's kind (owners.KINDS)
    machine_file: str | None = None  # None: the shipped default machine
    workdir: Path | None = None  # None: a fresh scratch directory, removed at the end
    network: bool = False  # bring the machine's NIC up (when it has one)
    delay: bool = True  # modeled device time is waited for
    reformat: bool = False  # format the disks even when their images exist
    owned: bool = True  # False: another process (a lab) holds the record
    keep_logs: Path | None = None  # copy the machine's logs here at teardown
    host: Host | None = field(default=None, init=False)
    net: object | None = field(default=None, init=False)
    scheme: object | None = field(default=None, init=False)
    _is_down: bool = field(default=True, init=False)  # nothing up yet: nothing to take down
    _made: bool = field(default=False, init=False)
    _old_term: object = field(default=None, init=False)

    # --- bring-up ------------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        self.up()
        return self

    def up(self) -> None:
        """Bring the machine up; on any failure, whatever was made is taken down again."""
        self._made, self._is_down = self.workdir is None, False
        self._old_term = _terminate_as_exit()
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> None:
        if self._made:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"crashbench-{self.kind}-"))
            os.chmod(self.workdir, 0o755)  # servers on the mount may run as other users
        m = machine_mod.load(self.machine_file)
        self.host = Host(Path(self.workdir), m, delay=self.delay, machine_file=self.machine_file)
        self.workdir = self.host.workdir
        if self.owned:
            owners.claim(
                self.kind, self.workdir, self.host.tag, self.host.physmem, workdir_made=self._made
            )
        self.host.create_memory()
        format_disks(m, self.workdir, force=self.reformat)
        if self.network:
            self.net = network_up(self.host)

    @property
    def machine(self) -> machine_mod.Machine:
        return self.host.machine

    def deploy(self, scheme, apps=()) -> None:
        """Deploy ``scheme`` here; from now on its teardown is part of this testbed's."""
        self.scheme = scheme
        scheme.deploy(self.host, apps=apps)

    # --- take-down -----------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        self.down()

    def down(self, examine: Callable[[], None] | None = None) -> None:
        """Take everything down (once); a second SIGTERM does not cut the teardown short.
        ``examine`` sees the stopped machine before its scratch directory goes (a
        campaign's fsck of the disk image)."""
        if self._is_down:
            return
        self._is_down = True
        _ignore_term()
        try:
            self._stop_machine(examine)
        finally:
            _restore_term(self._old_term)
        if self.host is not None and self.owned:  # only a machine fully torn down is forgotten
            owners.release(self.host.tag)

    def _stop_machine(self, examine) -> None:
        try:
            try:
                if self.scheme is not None and self.scheme.host is not None:
                    self.scheme.teardown()
            finally:
                if self.host is not None:
                    self.host.close()  # also after a scheme's failed teardown
        finally:
            if self.net is not None:
                self.net.down()
            try:
                if self.host is not None and examine is not None:
                    examine()
            finally:
                if self.host is not None:
                    self._keep_logs()
                if self._made and self.workdir is not None:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def _keep_logs(self) -> None:
        """The kernels', the servers' and the clients' logs outlive a scratch directory."""
        src = self.host.workdir / "logs"
        if self.keep_logs is not None and src.is_dir():
            shutil.copytree(src, self.keep_logs, dirs_exist_ok=True)


def network_up(host: Host):
    """The machine's first NIC up in its own namespaces, on the partition that owns it."""
    from kernel.hw.net import Network

    m = host.machine
    if not m.nics:
        return None
    net = Network(host.tag, m.nics[0], [p.id for p in m.partitions])
    net.up(next((p.id for p in m.partitions if m.nics[0].name in p.devices), 0))
    host.net = net
    return net


_NOT_MAIN = object()  # set up outside the main thread: no handler was changed


def _terminate_as_exit():
    """SIGTERM raises SystemExit (so ``finally`` blocks run) unless the process has its own
    handler; only the main thread may install handlers, elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return _NOT_MAIN
    old = signal.getsignal(signal.SIGTERM)
    if old is signal.SIG_DFL:  # a caller's own handler (the CLI's interrupt) is kept
        signal.signal(signal.SIGTERM, _exit_on_term)
    return old


def _exit_on_term(signum, frame):
    sys.exit(128 + signum)


def _ignore_term() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _restore_term(old) -> None:
    if old is not _NOT_MAIN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)
