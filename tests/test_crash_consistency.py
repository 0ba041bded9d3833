"""Crash consistency of the whole storage stack (VFS, page cache, journal, file system).

Random operations, a power loss at a random point (the disk drops every write it was not
told to flush), a new kernel mounts the disk: fsck finds nothing wrong, and every file that
was fsynced (and not touched since) reads back byte for byte.
"""

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as stt
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kernel import param
from kernel.tools.fsck import fsck
from tests.stack import Stack

NAMES = stt.sampled_from([b"a", b"b", b"c", b"d", b"e"])
PAGE = param.PAGE_SIZE


def blob(seed: int, n: int) -> bytes:
    return (seed.to_bytes(4, "little") * (n // 4 + 1))[:n]


class CrashMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cb-crash-"))
        self.st = Stack(self.tmp)
        self.files: dict[bytes, bytearray] = {}  # what the running kernel shows
        self.durable: dict[bytes, bytes] = {}  # what must survive a crash

    def teardown(self):
        self.st.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def ino(self, name):
        return self.st.vfs.lookup(1, name).ino

    @rule(name=NAMES, seed=stt.integers(0, 2**31), n=stt.integers(0, 3 * PAGE + 7))
    def write_new(self, name, seed, n):
        if name in self.files:
            return
        ino = self.st.vfs.create(1, name, 0o100644, 0, 0).ino
        self.st.vfs.write(ino, 0, blob(seed, n))
        self.files[name] = bytearray(blob(seed, n))

    @precondition(lambda self: self.files)
    @rule(data=stt.data(), seed=stt.integers(0, 2**31), n=stt.integers(1, 2 * PAGE))
    def overwrite(self, data, seed, n):
        name = data.draw(stt.sampled_from(sorted(self.files)))
        cur = self.files[name]
        off = data.draw(stt.integers(0, len(cur) + 100))
        payload = blob(seed, n)
        self.st.vfs.write(self.ino(name), off, payload)
        if off > len(cur):
            cur.extend(bytes(off - len(cur)))
        cur[off : off + n] = payload
        self.durable.pop(name, None)

    @precondition(lambda self: self.files)
    @rule(data=stt.data(), size=stt.integers(0, 3 * PAGE))
    def truncate(self, data, size):
        name = data.draw(stt.sampled_from(sorted(self.files)))
        self.st.vfs.setattr(self.ino(name), size=size)
        cur = self.files[name]
        del cur[size:]
        cur.extend(bytes(size - len(cur)))
        self.durable.pop(name, None)

    @precondition(lambda self: self.files)
    @rule(data=stt.data())
    def fsync(self, data):
        name = data.draw(stt.sampled_from(sorted(self.files)))
        self.st.vfs.fsync(self.ino(name))
        self.durable[name] = bytes(self.files[name])

    @precondition(lambda self: self.files)
    @rule(data=stt.data())
    def unlink(self, data):
        name = data.draw(stt.sampled_from(sorted(self.files)))
        self.st.vfs.unlink(1, name)
        del self.files[name]
        self.durable.pop(name, None)

    @precondition(lambda self: self.files)
    @rule(data=stt.data(), new=NAMES)
    def rename(self, data, new):
        old = data.draw(stt.sampled_from(sorted(self.files)))
        if old == new:
            return
        self.st.vfs.rename(1, old, 1, new)
        self.files[new] = self.files.pop(old)
        self.durable.pop(old, None)
        self.durable.pop(new, None)

    @rule()
    def flusher_pass(self):
        self.st.vfs.writeback.flush_expired(expire_s=0.0)

    @rule()
    def crash(self):
        self.st = self.st.crash()
        img = self.st.img
        for name, want in self.durable.items():
            got = self.st.vfs.read(self.ino(name), 0, len(want) + PAGE)
            assert got == want, f"fsynced file {name!r} came back different after the crash"
        # the new kernel's view is the truth from here on
        self.files = {
            n: bytearray(self.st.vfs.read(self.st.vfs.lookup(1, n).ino, 0, 1 << 20))
            for n, _ in self.st.vfs.fs.readdir(1)
        }
        self.durable = {n: bytes(v) for n, v in self.files.items()}
        self.st.vfs.writeback.sync_all()
        result = fsck(img)
        assert result.exit_code == 0, result.problems

    @invariant()
    def reads_match_model(self):
        for name, want in self.files.items():
            assert self.st.vfs.read(self.ino(name), 0, len(want) + PAGE) == bytes(want)


CrashMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCrashConsistency = CrashMachine.TestCase
