"""Tunables of the emulated kernel, in one place (like xv6's param.h).

Every number a layer of kernel/ depends on and a user might want to change lives here.
Layers import these names; nothing else in kernel/ hard-codes a size, interval or limit.
"""

PAGE_SIZE = 4096  # page frame and file-system block size, bytes
BLOCK_SIZE = PAGE_SIZE

# --- physical memory layout (kernel/hw/physmem.py) ---
ICORE_SLOTS = 65536  # in-core inode objects per partition
PROC_SLOTS = 64  # process-table entries per partition
CRASHK_BYTES = 4096  # reserved per partition for a loaded crash kernel's image record
PROC_ENTRY_BYTES = 256  # one process-table entry
INFLIGHT_OFFSET = 1024  # the in-flight request table, from the kernel superblock's address
INFLIGHT_SLOTS = 8  # in-flight request entries (one per request-serving thread; 1 today)
STATE_SLOTS = 16  # runtime-aware processes with a state segment, per partition
PROC_STATE_BYTES = 1 << 19  # state segment of one runtime-aware process (512 KiB)
MIN_FRAMES = 256  # a partition smaller than this cannot hold a page cache

# --- page cache and write-back (kernel/core/pagecache.py, kernel/core/writeback.py) ---
DIRTY_EXPIRE_S = 30.0  # a dirty page older than this is written back (Linux dirty_expire_centisecs)
WRITEBACK_INTERVAL_S = 5.0  # the flusher wakes this often (Linux dirty_writeback_centisecs)
DIRTY_RATIO = 0.40  # writers are throttled above this fraction of frames dirty
EVICT_BATCH = 256  # frames reclaimed at once under memory pressure
READAHEAD_PAGES = 32  # pages read from disk at once on a sequential miss
ADOPT_CHECK_BATCH = 1024  # adopted pages settled at once (kernel lock held) after a takeover
ADOPT_FIRST_USE_PAGES = (
    32  # adopted pages checked together on a first use: the page and those after it
)
BACKUP_HEAP_WARM_BYTES = (
    64 << 20
)  # heap a standby backup grows and touches for its takeover's tables
TXLOG_BYTES = (
    4 << 20
)  # a txipc_sim kernel's undo log, taken from the frame area's tail (kernel/core/txlog.py)
UNDO_KEEP_FRAMES = 16  # frames the undo record keeps between operations (kernel/core/bufcache.py)

# --- journal (kernel/core/journal.py) ---
COMMIT_INTERVAL_S = 5.0  # the running transaction is committed at least this often
JOURNAL_BLOCKS = 8192  # default journal size at mkfs (32 MiB)
MAX_TXN_FRACTION = 0.25  # a transaction is committed once it fills this much of the journal
JOURNAL_READAHEAD_BLOCKS = (8, 128)  # a log scan's device reads: the first, then doubling to most

# --- file system (kernel/core/fs.py) ---
NDIRECT = 12  # direct block pointers in an inode
INODE_SIZE = 128  # bytes of one on-disk inode
INODES_PER_MIB = 16  # inodes created by mkfs per MiB of disk
NAME_MAX = 255
MAX_FILE_BYTES = 1 << 42  # 4 TiB: what triple indirection reaches, rounded down
MAX_DISK_BLOCKS = 1 << 32  # block numbers are 32-bit: a disk holds fewer blocks than this

# --- device models (kernel/hw/blockdev.py): modeled time, always reported as "modeled" ---
# name: (per-request latency in seconds, bandwidth in bytes/s)
DEVICE_MODELS = {
    "none": (0.0, 0.0),  # no modeled delay; bandwidth 0 means unlimited
    "nvme": (20e-6, 3.0e9),
    "ssd": (80e-6, 500e6),
    "hdd": (6e-3, 150e6),
}
DEFAULT_DEVICE_MODEL = "ssd"
FLUSH_LATENCY_FACTOR = 2.0  # a flush barrier costs this many request latencies

# --- heartbeat and fault detection (kernel/core/kernel.py) ---
HEARTBEAT_INTERVAL_S = 0.010
# A kernel is declared dead after this many intervals without a beat. Measured: under a
# sequential-write load the backup saw no beat for 31-34 ms (the kernel shares one CPU and the
# interpreter lock with its request thread), so 3 missed beats fenced healthy kernels.
HEARTBEAT_MISSED_BEATS = 10
# Of a silence, the time the kernel's threads waited for a host CPU is not counted, up to
# this many intervals (kernel/hw/mailbox.py BeatMonitor): on a host loaded to 8 on 2 cores
# living kernels were fenced 3 times in one test suite. A hang is still found in 100 ms
# (its threads sleep), and in at most 400 ms however loaded the host.
HEARTBEAT_HOST_WAIT_MAX_BEATS = 30
# A panicking kernel takes the VFS lock before its dying message, so no request completes
# after the fault took effect; it waits at most this long for a request in progress.
PANIC_STOP_WAIT_S = 0.05
WRITEBACK_RUN_BYTES = 4 << 20  # largest single device write during write-back

# --- the warm-cache VMM (kernel/hw/vmm.py, systems/warmcache) ---
VMM_SPARE_PAGES = 16384  # preserved pages the VMM can move out of a rebooted kernel's way (64 MiB)

# --- the machine's files on the host (kernel/hw/host.py, mkfs, physmem, vmm, control, mailbox) ---
OWNER_ONLY_MODE = 0o600  # disk images, memory and VMM region files, control and doorbell sockets
WORKDIR_MODE = (
    0o755  # the work directory: traversable by the servers' own users (postgres, www-data)
)

# how long a takeover waits for the re-sent requests to be answered before its report
# counts what the dead kernel's in-flight table answered (kernel/core/inflight.py)
INFLIGHT_WAIT_S = 10.0
