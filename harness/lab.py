"""The lab: a live emulated machine to play with, kept between commands in a work directory.

Promises to `crashbench up/status/crash/down` (and to teachers running OS labs): ``up``
boots the machine in the background and returns once partition 0's file system serves;
everything the lab made is named in ``lab.json`` in its work directory, so ``down`` — from
another process, after a crash of anything — removes all of it: kernel processes, FUSE
mounts, process sets, network namespaces, the physical-memory file; a failed ``up`` leaves
none of them. The lab is recorded in harness/owners.py (owner: the ``up`` process, then the
supervisor), so a lab whose supervisor was killed is an orphan ``down --all`` finds. Several
labs coexist in different work directories; a second ``up`` in a directory whose lab runs is
refused. ``lab.json`` names the machine description by its absolute path, so every command
finds it from any directory. Bad input — a work directory that is a file or cannot be
written, a damaged ``lab.json``, a machine that does not boot — is a one-line LabError naming
the cause.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from harness import owners
from kernel.hw import control, fusedev, mailbox
from kernel.hw import machine as machine_mod
from kernel.hw.host import make_workdir, physmem_path_for
from kernel.hw.physmem import PhysMem

STATE = "lab.json"
STATE_KEYS = {"machine_file": (str, type(None)), "scheme": str, "tag": str, "physmem": str}


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says why and what to do."""


def lab_tag(workdir: Path) -> str:
    return hashlib.sha1(str(workdir.resolve()).encode()).hexdigest()[:6]


def _alive_pid(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"harness.supervisor" in f.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """A kernel process of the lab (one running a module a scheme declares) is running."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False
    from systems.base import kernel_modules

    return not zombie and any(m.encode() in cmd for m in kernel_modules())


def forget(workdir: Path) -> None:
    """Remove the lab's state files (its disk image and logs stay)."""
    for sock in workdir.glob("*.sock"):
        sock.unlink()
    (workdir / "supervisor.json").unlink(missing_ok=True)
    (workdir / STATE).unlink(missing_ok=True)


def _check_state(state, path: Path) -> None:
    """lab.json as ``up`` wrote it, or a one-line LabError naming what is wrong."""
    if not isinstance(state, dict):
        raise LabError(
            f"{path}: damaged lab state (expected a JSON object, got "
            f"{type(state).__name__}); remove it once nothing of the lab runs"
        )
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise LabError(
                f"{path}: damaged lab state ({key!r} is missing or of the wrong "
                f"type); remove it once nothing of the lab runs"
            )


@dataclass
class Lab:
    workdir: Path
    state: dict

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def open(cls, workdir: Path) -> "Lab":
        p = Path(workdir) / STATE
        if not p.exists():
            raise LabError(
                f"no lab in {workdir} (start one with `crashbench up --workdir {workdir}`)"
            )
        try:
            state = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise LabError(
                f"{p}: damaged lab state ({e}); remove it once nothing of the lab runs"
            ) from None
        except OSError as e:
            raise LabError(f"{p}: cannot read the lab's state: {e.strerror}") from None
        _check_state(state, p)
        return cls(Path(workdir).resolve(), state)

    def save(self) -> None:
        tmp = self.workdir / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.workdir / STATE)

    @property
    def machine(self) -> machine_mod.Machine:
        return machine_mod.load(self.state.get("machine_file"))

    # --- up ---------------------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        workdir: Path,
        machine_file: str | None = None,
        scheme: str = "none",
        delay: bool = True,
        options: dict | None = None,
    ) -> "Lab":
        workdir = Path(workdir)
        if workdir.exists() and not workdir.is_dir():
            raise LabError(f"--workdir {workdir}: exists and is not a directory")
        if (workdir / STATE).exists():
            old = cls.open(workdir)
            if _alive_pid(old.state.get("supervisor")) or any(
                _alive(k["pid"]) for k in old.kernels.values()
            ):
                raise LabError(
                    f"a lab is already running in {workdir} "
                    f"(`crashbench down --workdir {workdir}` stops it)"
                )
            old.down()
        from systems.base import registry

        if scheme not in registry():
            raise LabError(f"unknown scheme {scheme!r} (known: {', '.join(registry())})")
        options = dict(options or {})
        unknown = sorted(set(options) - set(registry()[scheme].options))
        if unknown:
            raise LabError(
                f"scheme {scheme} has no option {', '.join(unknown)} "
                f"(its options: {', '.join(registry()[scheme].options) or 'none'})"
            )
        m = machine_mod.load(machine_file)
        try:
            workdir = make_workdir(workdir)
        except OSError as e:
            raise LabError(f"--workdir {workdir}: cannot create it: {e.strerror}") from None
        lab = cls(
            workdir,
            {
                "machine_file": str(Path(machine_file).resolve()) if machine_file else None,
                "scheme": scheme,
                "options": options,
                "tag": lab_tag(workdir),
                "physmem": physmem_path_for(workdir),
                "supervisor": None,
                "network": None,
                "started": time.time(),
            },
        )
        try:
            lab.save()  # written first, so `down` can clean up after a failed `up`
        except OSError as e:
            raise LabError(
                f"--workdir {workdir}: cannot write the lab's state: {e.strerror}"
            ) from None
        owners.claim("lab", workdir, lab.state["tag"], lab.state["physmem"], workdir_made=False)
        for old_report in (workdir / "reports").glob("*.json"):
            old_report.unlink()
        try:
            lab._network_up(m)
            lab._start_supervisor()
        except BaseException:
            lab.down()
            raise
        owners.hand_over(lab.state["tag"], lab.state["supervisor"])  # it keeps the lab now
        return lab

    def _start_supervisor(self) -> None:
        import select
        import subprocess
        import sys

        r, w = os.pipe()
        cmd = [
            sys.executable,
            "-m",
            "harness.supervisor",
            "--workdir",
            str(self.workdir),
            "--scheme",
            self.state["scheme"],
            "--ready-fd",
            str(w),
            "--options",
            json.dumps(self.state.get("options", {})),
        ]
        if self.state["machine_file"]:
            cmd += ["--machine", self.state["machine_file"]]
        if self.state.get("network") and self.state["network"]["mode"] == "netns":
            cmd += ["--net-tag", self.state["tag"]]
        (self.workdir / "logs").mkdir(exist_ok=True)
        with open(self.workdir / "logs" / "supervisor.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(w,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        os.close(w)
        self.state["supervisor"] = proc.pid
        self.save()
        log = self.workdir / "logs" / "supervisor.log"
        try:
            ready, _, _ = select.select([r], [], [], 60.0)
            said = os.read(r, 4096).decode(errors="replace").strip() if ready else ""
        finally:
            os.close(r)
        if said.startswith("failed: "):
            raise LabError(
                f"the machine did not come up: {said[len('failed: ') :]} (more in {log})"
            )
        if not said.startswith("ready"):
            raise LabError(f"the machine did not come up within 60 s; see {log}")

    def _supervisor_state(self) -> dict:
        p = self.workdir / "supervisor.json"
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @property
    def kernels(self) -> dict:
        return self._supervisor_state().get("kernels", {})

    @property
    def active(self) -> int:
        return self._supervisor_state().get("active", 0)

    def reports(self) -> list[dict]:
        return [
            json.loads(p.read_text()) for p in sorted((self.workdir / "reports").glob("*.json"))
        ]

    def _network_up(self, m: machine_mod.Machine) -> None:
        if not m.nics:
            return
        from kernel.hw.net import Network

        net = Network(self.state["tag"], m.nics[0], [p.id for p in m.partitions])
        owner = next((p.id for p in m.partitions if m.nics[0].name in p.devices), 0)
        net.up(owner)
        self.state["network"] = {
            "mode": net.mode,
            "service_ip": net.service_ip,
            "client_ip": net.client_ip,
            "owner": owner,
            "netns": {str(p.id): net.netns(p.id) for p in m.partitions},
            "client_netns": net.client_netns(),
        }
        self.save()

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        m = self.machine
        reports = self.reports()
        out = {
            "workdir": str(self.workdir),
            "scheme": self.state["scheme"],
            "options": self.state.get("options", {}),
            "keeps_processes": bool(self._supervisor_state().get("keeps_processes")),
            "network": self.state["network"],
            "partitions": [],
            "active": self.active,
            "last_recovery": reports[-1] if reports else None,
        }
        mem = (
            PhysMem(self.state["physmem"], readonly=True)
            if os.path.exists(self.state["physmem"])
            else None
        )
        try:
            for p in m.partitions:
                k = self.kernels.get(str(p.id))
                entry = {
                    "partition": p.id,
                    "role": p.role,
                    "cmdline": p.cmdline(),
                    "devices": list(p.devices),
                    "kernel": None,
                }
                if k:
                    entry["kernel"] = {
                        "pid": k["pid"],
                        "alive": _alive(k["pid"]),
                        "mount": k["mount"],
                        "mounted": fusedev.is_mounted(k["mount"]),
                    }
                    if mem is not None:
                        entry["kernel"].update(self._mail(mem, p))
                out["partitions"].append(entry)
        finally:
            if mem is not None:
                mem.close()
        return out

    @staticmethod
    def _mail(mem: PhysMem, p) -> dict:
        from kernel.hw.physmem import CorruptObject, partition_layout

        try:
            mail = mailbox.read_mail(mem, partition_layout(p.id, p.base, p.size))
        except CorruptObject as e:
            return {"state": "unreadable", "why": str(e)}
        return {
            "state": mail.state_name,
            "heartbeat_age_s": round(mail.age_s(), 4),
            "role_now": "active" if mail.role == mailbox.ROLE_ACTIVE else "backup",
            "beats": mail.beat,
            "boot_s": mail.boot_ns / 1e9,
            "dying_message": mail.reason or None,
            "site": mail.site or None,
            "devices_owned": mail.devices.split(",") if mail.devices else [],
            "fault": mail.fault or None,
        }

    # --- crash ------------------------------------------------------------------------------
    def crash(
        self,
        fault: str,
        target: str | None = None,
        site: str | None = None,
        wait: bool = False,
        timeout: float = 60.0,
    ) -> dict:
        active = self.active
        k = self.kernels.get(str(active))
        if not k or not _alive(k["pid"]):
            raise LabError("the active kernel is not running (see `crashbench status`)")
        before = len(self.reports())
        reply = control.request(
            control.ctl_path(str(self.workdir), active),
            {"cmd": "inject", "fault": fault, "target": target, "site": site},
        )
        if not reply.get("ok"):
            raise LabError(reply.get("error", "the kernel refused the fault"))
        result = {"injected": reply}
        if wait:
            result["report"] = self._wait_report(before, timeout)
        return result

    def _wait_report(self, before: int, timeout: float) -> dict | None:
        """The scheme's report of this crash; None if the fault never brought the kernel down."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reports = self.reports()
            if len(reports) > before:
                return reports[before]
            if not _alive_pid(self.state.get("supervisor")):
                raise LabError("the lab's supervisor died; see logs/supervisor.log")
            time.sleep(0.02)
        return None

    # --- down -------------------------------------------------------------------------------
    def down(self) -> list[str]:
        done = []
        sup = self.state.get("supervisor")
        if _alive_pid(sup):
            os.kill(sup, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while _alive_pid(sup) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive_pid(sup):
                os.killpg(sup, signal.SIGKILL)
            done.append(f"stopped the supervisor ({sup})")
        for pid_s, k in list(self.kernels.items()):
            if _alive(k["pid"]):
                self._stop_kernel(k["pid"], timeout=0.0 if self._hung(int(pid_s)) else 30.0)
                done.append(f"stopped kernel {k['pid']} of partition {pid_s}")
            if fusedev.is_mounted(k["mount"]):
                fusedev.abort_and_unmount(k["mount"])
                done.append(f"unmounted {k['mount']}")
        from kernel.hw.procset import cleanup_stale as procsets_cleanup

        done += [f"removed process set {r.name}" for r in procsets_cleanup(self.state["tag"])]
        if self.state.get("network"):
            from kernel.hw.net import cleanup_stale

            done += [f"removed {x}" for x in cleanup_stale(self.state["tag"])]
        if os.path.exists(self.state.get("physmem", "")):
            PhysMem.unlink(self.state["physmem"])
            done.append(f"removed {self.state['physmem']}")
        forget(self.workdir)
        owners.release(self.state["tag"])
        return done

    def _hung(self, part_id: int) -> bool:
        """A kernel whose heartbeat stopped cannot shut down cleanly: it is killed at once."""
        try:
            mem = PhysMem(self.state["physmem"], readonly=True)
        except FileNotFoundError:
            return False
        p = self.machine.partition(part_id)
        from kernel.hw.physmem import CorruptObject, partition_layout

        try:
            mail = mailbox.read_mail(mem, partition_layout(part_id, p.base, p.size))
        except CorruptObject:
            return True
        finally:
            mem.close()
        return mail.age_s() > max(0.2, 5 * mail.interval_ns / 1e9)

    @staticmethod
    def _stop_kernel(pid: int, timeout: float = 30.0) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
