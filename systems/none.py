"""Scheme `none`: no recovery. The failure is detected and recorded; nothing comes back."""

from __future__ import annotations

from systems.base import Capabilities, RecoveryReport, RecoveryScheme
from systems.detect import Watcher


class NoRecovery(RecoveryScheme):
    name = "none"
    capabilities = Capabilities(recovers=False)
    watcher = None

    def deploy(self, host, apps=()) -> None:
        self.host = host
        host.boot(0, apps=list(apps))  # its apps run until the crash, never after
        self.watcher = Watcher(host, 0)

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport:
        f = self.watcher.wait(timeout)
        r = RecoveryReport.after(self.name, f, fault)
        r.notes.append("scheme none: nothing is recovered")
        return r

    def teardown(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        super().teardown()
