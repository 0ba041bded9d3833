"""Test helpers: an emulated kernel's storage stack in one process, on files in tmp_path."""

from __future__ import annotations

from pathlib import Path

from kernel.core.vfs import VFS
from kernel.hw.blockdev import BlockDevice
from kernel.hw.physmem import PhysMem, partition_layout
from kernel.tools.mkfs import mkfs

MEM = 96 << 20
DISK = 256 << 20


class Stack:
    """physmem + disk + VFS; `crash()` drops the kernel and the disk's volatile cache."""

    def __init__(
        self,
        tmp: Path,
        *,
        write_cache: bool = True,
        fresh: bool = True,
        mem: int = MEM,
        disk: int = DISK,
        journal_blocks: int | None = None,
    ):
        self.tmp = tmp
        self.img = str(tmp / "disk.img")
        if fresh:
            mkfs(self.img, disk, **({"journal_blocks": journal_blocks} if journal_blocks else {}))
        self.mem_path = str(tmp / "physmem")
        PhysMem.unlink(self.mem_path)
        self.mem = PhysMem(self.mem_path, mem, create=True)
        self.lay = partition_layout(0, 0, mem)
        self.mem.write(0, self.lay.header_bytes())
        self.dev = BlockDevice(self.img, "none", write_cache=write_cache, delay=False)
        self.vfs = VFS(self.mem, self.lay, self.dev)

    def path_ino(self, path: str) -> int:
        ino = VFS.ROOT_INO
        for part in [p for p in path.split("/") if p]:
            ino = self.vfs.lookup(ino, part.encode()).ino
        return ino

    def crash(self) -> "Stack":
        """Power loss: unflushed device writes are gone, memory is gone; boot again."""
        self.dev.crash()
        self.dev.close()
        self.mem.close()
        return Stack(self.tmp, write_cache=self.dev.write_cache, fresh=False)

    def remount(self) -> "Stack":
        """Clean unmount and mount again (memory is gone, the disk keeps what was flushed)."""
        self.vfs.writeback.sync_all()
        self.vfs.free_orphans()
        self.vfs.fs.unmount()
        self.dev.close()
        self.mem.close()
        return Stack(self.tmp, write_cache=self.dev.write_cache, fresh=False)

    def close(self) -> None:
        self.dev.close()
        self.mem.close()
