"""The NIC: one end of a veth pair, owned by one partition at a time, and IP takeover.

Promises to the recovery schemes (systems/), the process layer (kernel/proc) and the
harness driver:

* ``Network(tag, nic, partitions).up(owner)`` builds the machine's network: a network
  namespace per partition (``cb<tag>-p<N>``) and one for the clients (``cb<tag>-cl``),
  joined by a veth pair. The NIC end (link ``cb<tag>-nic``) is in the owner's namespace and
  carries the NIC's address, ``service_ip``, from 198.18.0.0/15; the client end (link
  ``cb<tag>-cl``) carries ``client_ip`` in the same subnet. ``lo`` is up everywhere. There
  is no default route in any of these namespaces, so nothing sent there can leave them.
* ``move_to(p)`` is IP takeover: the NIC end moves into partition p's namespace, gets the
  service address back, comes up, a neighbour entry in the client namespace that names a
  different MAC is flushed, and a gratuitous ARP announces the address. It needs nothing
  from the old owner (all its processes may be dead: the namespace is kept alive by its
  bind mount in /run/netns), and it returns a ``MoveReport`` whose phases are measured
  with ``time.monotonic`` around the real work. Everything a move needs (netlink sockets
  in every namespace, namespace fds, a packet socket per partition) is opened by ``up()``,
  as a standby would have it prepared.
* ``enter(netns)`` is a ``preexec_fn`` that puts a child process into a namespace;
  ``socket_in(netns, ...)`` makes a socket that lives in one. No thread of the caller ever
  changes namespace: namespace work runs in short-lived threads (setns(2) for network
  namespaces affects only the calling thread), netlink work in one worker thread that
  this object owns (pyroute2's synchronous IPRoute is bound to the thread that made it).
* ``down()`` deletes the veth (with it its addresses) and the namespaces, also when
  processes still run in them; it is idempotent and does not raise on pieces already gone.
  ``cleanup_stale(tag)`` does the same for a lab whose process died without ``down()``.
* Mode ``loopback`` (not root, or namespaces unusable, or forced): no namespaces, no
  netlink. ``service_ip`` is an address of 127.0.0.0/8 derived from the NIC address and the
  tag (all of 127/8 is local on Linux, nothing is added to ``lo``); a move changes the
  owner only, and its phases are measured as the no-ops they are.

Names derive from the tag alone (``[a-z0-9]{1,8}``, so link names fit IFNAMSIZ), so labs
with different tags coexist and a crashed lab is found by its tag.

Network rule: this module configures addresses only inside namespaces it created, from
198.18.0.0/15 (netns mode), or uses 127.0.0.0/8 (loopback mode). The only frame it sends
itself is the gratuitous ARP on its own veth.

Netns mode, owner 0 (``move_to(1)`` moves the NIC end, with its MAC, to the right)::

    cb<tag>-cl            cb<tag>-p0 (owner)        cb<tag>-p1 (standby)
   +---------------+      +--------------------+    +--------------------+
   | lo            |      | lo                 |    | lo                 |
   | cb<tag>-cl  o-+------+-o cb<tag>-nic      |    |                    |
   |  client_ip/P  | veth |    service_ip/P    |    |                    |
   | load clients  |      | apps of p0         |    | apps of p1         |
   +---------------+      +--------------------+    +--------------------+
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import errno
import ipaddress
import json
import os
import re
import socket
import statistics
import struct
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Callable

from kernel.hw.machine import BENCHMARK_NET, Nic

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_MS_BIND, _MS_REC, _MS_SHARED = 0x1000, 0x4000, 1 << 20
_MNT_DETACH = 2
_ETH_P_ARP = 0x0806
_NETLINK_ROUTE = 0
_THREAD_TIMEOUT = 10.0  # bound on any one namespace or netlink operation
_TAG = re.compile(r"[a-z0-9]{1,8}")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class NetError(RuntimeError):
    """The network could not be built, moved or removed; the message says what and why."""


@dataclass
class MoveReport:
    """One takeover, phase by phase (seconds, time.monotonic around the real work)."""

    to_partition: int
    move_s: float  # the NIC end changes namespace (netlink RTM_SETLINK IFLA_NET_NS_FD)
    addr_s: float  # service address re-added and link up in the new namespace
    arp_s: float  # stale client neighbour entry flushed (if any) + gratuitous ARP sent
    total_s: float  # the whole move_to() call


# ---------------------------------------------------------------- namespace plumbing


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _ns_path(netns: str) -> str:
    return netns if netns.startswith("/") else os.path.join(NETNS_DIR, netns)


def _in_thread(fn: Callable, netns: str | None = None, *, unshare: bool = False):
    """Run fn() in a short-lived thread that is in `netns` (or in a fresh namespace if
    `unshare`), and return its result. The thread goes back to its original namespace
    when fn returns; if even that fails the thread simply ends, so no namespace change
    ever outlives it and the caller's own thread never moves."""
    box: dict = {}

    def body():
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if netns is not None:
                fd = os.open(_ns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
                finally:
                    os.close(fd)
            if unshare:
                _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            box["result"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e
        finally:
            _libc.setns(home, CLONE_NEWNET)
            os.close(home)

    t = threading.Thread(target=body, name=f"netns:{netns or 'new'}", daemon=True)
    t.start()
    t.join(_THREAD_TIMEOUT)
    if t.is_alive():
        raise NetError(
            f"namespace operation in {netns or 'a new namespace'} did not finish "
            f"within {_THREAD_TIMEOUT:.0f} s"
        )
    if "error" in box:
        raise box["error"]
    return box.get("result")


def socket_in(
    netns: str | None, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in network namespace `netns` (None: the caller's own)."""
    if netns is None:
        return socket.socket(family, type, proto)
    return _in_thread(lambda: socket.socket(family, type, proto), netns)


_dir_lock = threading.Lock()
_dir_shared = False


def _share_netns_dir() -> None:
    """Make /run/netns a shared mount, as `ip netns add` does, so that namespaces made
    here and by iproute2 are seen alike (in every mount namespace)."""
    global _dir_shared
    with _dir_lock:
        if _dir_shared:
            return
        os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
        d = NETNS_DIR.encode()
        if _libc.mount(b"", d, b"none", _MS_SHARED | _MS_REC, None) != 0:
            _check(_libc.mount(d, d, b"none", _MS_BIND | _MS_REC, None), f"bind {NETNS_DIR}")
            _check(
                _libc.mount(b"", d, b"none", _MS_SHARED | _MS_REC, None), f"make {NETNS_DIR} shared"
            )
        _dir_shared = True


def _create_netns(name: str) -> None:
    """Create a named network namespace (like `ip netns add`), without forking."""
    _share_netns_dir()
    path = _ns_path(name)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise NetError(f"netns {name}: already exists") from None

    def bind():
        _check(
            _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None),
            f"bind-mount netns {name}",
        )

    try:
        _in_thread(bind, unshare=True)
    except BaseException:
        _remove_netns(name)
        raise


def _remove_netns(name: str) -> bool:
    """Remove a named namespace (like `ip netns del`); False if it was not there."""
    path = _ns_path(name)
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):  # EINVAL: a file left without its mount
            raise OSError(e, f"umount netns {name}: {os.strerror(e)}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _netns_exists(name: str) -> bool:
    return os.path.exists(_ns_path(name))


def _iproute(netns: str):
    """A pyroute2 IPRoute whose netlink socket lives in `netns` (no event subscriptions).
    Use it only from the thread that made it."""
    from pyroute2 import IPRoute

    sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)
    fd = sock.detach()
    try:
        return IPRoute(fileno=fd, groups=0)
    except BaseException:
        os.close(fd)
        raise


def _delete_links(netns: str | None, names: set[str]) -> list[str]:
    """Delete the links called `names` in `netns` (None: the host's); the names deleted."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    def work():
        gone = []
        with IPRoute(groups=0) as ipr:
            for link in ipr.get_links():
                name = link.get("IFLA_IFNAME")
                if name in names:
                    try:
                        ipr.link("del", index=link["index"])
                        gone.append(name)
                    except NetlinkError as e:
                        if e.code != errno.ENODEV:  # the peer's deletion took it already
                            raise
        return gone

    return _in_thread(work, netns)


_probe_lock = threading.Lock()
_probe: str | None = None  # None: not probed; "" : usable; else: why not


def enter_netns(netns: str | None) -> Callable[[], None]:
    """A preexec_fn for subprocess.Popen that puts the child into `netns` (by name in
    /run/netns or by path); None gives a function that does nothing. The child is
    single-threaded there, so setns moves the whole process."""
    if netns is None:
        return lambda: None
    if "/" in netns and not netns.startswith("/"):
        raise NetError(f"enter: {netns!r} is neither a namespace name nor an absolute path")
    path = _ns_path(netns)
    if not os.path.exists(path):
        raise NetError(f"enter: network namespace {netns!r} does not exist")
    bpath = path.encode()

    def preexec() -> None:
        fd = os.open(bpath, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
        finally:
            os.close(fd)

    return preexec


def netns_unusable() -> str:
    """Why network namespaces cannot be used here ('' if they can)."""
    global _probe
    with _probe_lock:
        if _probe is None:
            if os.geteuid() != 0:
                _probe = "not root"
            elif not os.path.exists("/proc/thread-self/ns/net"):
                _probe = "no /proc/thread-self/ns/net"
            else:
                try:
                    _in_thread(lambda: None, unshare=True)
                    _probe = ""
                except OSError as e:
                    _probe = f"cannot create a network namespace ({e})"
        return _probe


def _garp_frame(mac: bytes, ip: str) -> bytes:
    """An ARP announcement (RFC 5227): a broadcast request whose sender and target
    protocol addresses are both `ip`."""
    ipb = socket.inet_aton(ip)
    eth = b"\xff" * 6 + mac + struct.pack("!H", _ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ipb, b"\x00" * 6, ipb)
    return eth + arp


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


# ---------------------------------------------------------------- the NIC


class Network:
    """The machine's NIC and the client side of its wire (see the module docstring)."""

    def __init__(self, tag: str, nic: Nic, partitions: list[int], *, mode: str | None = None):
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise NetError(
                f"tag: {tag!r} must be 1-8 characters of [a-z0-9] "
                "(namespace and link names derive from it)"
            )
        self.tag, self.nic = tag, nic
        try:
            iface = ipaddress.ip_interface(nic.address)
        except ValueError:
            raise NetError(
                f"nic {nic.name}: address {nic.address!r} is not an IPv4 address with a prefix"
            ) from None
        if iface.version != 4 or iface.ip not in BENCHMARK_NET:
            raise NetError(
                f"nic {nic.name}: address {nic.address} is outside the benchmark "
                f"range {BENCHMARK_NET}"
            )
        if not iface.network.subnet_of(BENCHMARK_NET):
            raise NetError(
                f"nic {nic.name}: subnet {iface.network} of address {nic.address} "
                f"reaches outside the benchmark range {BENCHMARK_NET}"
            )
        net = iface.network
        if net.prefixlen > 31:
            raise NetError(
                f"nic {nic.name}: address {nic.address} leaves no room for the "
                "client end (prefix must be /31 or shorter)"
            )
        if net.prefixlen <= 30 and iface.ip in (net.network_address, net.broadcast_address):
            raise NetError(
                f"nic {nic.name}: address {nic.address} is the network or "
                "broadcast address of its subnet"
            )
        self.prefixlen = net.prefixlen
        if (
            not isinstance(partitions, (list, tuple))
            or not partitions
            or not all(
                isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in partitions
            )
            or len(set(partitions)) != len(partitions)
        ):
            raise NetError(
                f"partitions: {partitions!r} must be a non-empty list of distinct "
                "partition numbers >= 0"
            )
        self.partitions = list(partitions)

        if mode is None:
            mode = "loopback" if netns_unusable() else "netns"
        elif mode == "netns":
            why = netns_unusable()
            if why:
                raise NetError(f"mode: 'netns' is not available here: {why}")
        elif mode != "loopback":
            raise NetError(f"mode: {mode!r} is neither 'netns' nor 'loopback' (or None: automatic)")
        self.mode: str = mode

        if mode == "netns":
            self.service_ip: str = str(iface.ip)
            if net.prefixlen == 31:
                other = [h for h in (net.network_address, net.broadcast_address) if h != iface.ip]
                cip = other[0]
            else:
                cip = net.broadcast_address - 1
                if cip == iface.ip:
                    cip = net.network_address + 1
            self.client_ip: str | None = str(cip)
        else:
            # 127.0.0.0/8: 7 bits from the tag (1..127, never 127.0.x.x or 127.1.x.x),
            # 17 bits from the NIC address's offset in 198.18.0.0/15.
            off = int(iface.ip) - int(BENCHMARK_NET.network_address)
            salt = zlib.crc32(tag.encode()) % 127 + 1
            self.service_ip = str(
                ipaddress.ip_address(int(_LOOPBACK.network_address) + (salt << 17) + off)
            )
            self.client_ip = None

        self._ns = {p: f"cb{tag}-p{p}" for p in self.partitions}
        self._client_ns = f"cb{tag}-cl"
        self._nic_if = f"cb{tag}-nic"
        self._client_if = f"cb{tag}-cl"
        self._owner: int | None = None
        self._lock = threading.RLock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ipr: dict = {}  # namespace name -> IPRoute (worker thread only)
        self._nsfd: dict[int, int] = {}  # partition -> fd of its namespace
        self._pkt: dict[int, socket.socket] = {}  # partition -> AF_PACKET socket in its ns
        self._client_index: int | None = None
        self.nic_mac: str | None = None

    # -------------------------------------------------------------- public API

    def up(self, owner: int) -> None:
        """Build namespaces, the veth pair and the addresses; the NIC goes to `owner`."""
        with self._lock:
            if self._owner is not None:
                raise NetError(f"lab {self.tag}: already up (owner partition {self._owner})")
            self._check_partition(owner)
            if self.mode == "loopback":
                self._bind_check()
                self._owner = owner
                return
            left = [n for n in self._all_ns() if _netns_exists(n)]
            if left:
                raise NetError(
                    f"lab {self.tag}: namespaces {', '.join(left)} are left over from "
                    f"a lab that was not taken down; run cleanup_stale({self.tag!r})"
                )
            made: list[str] = []
            try:
                for name in self._all_ns():
                    _create_netns(name)
                    made.append(name)
                self._prepare()
                self._call(self._build, owner)
                self._owner = owner
            except BaseException as e:
                self._close_handles()
                for name in made:
                    try:
                        _delete_links(name, {self._nic_if, self._client_if})
                    except Exception:
                        pass
                    try:
                        _remove_netns(name)
                    except OSError:
                        pass  # cleanup_stale() will find it by the tag
                if isinstance(e, (NetError, KeyboardInterrupt, SystemExit)):
                    raise
                raise NetError(f"lab {self.tag}: cannot build the network: {e}") from e

    def attach(self) -> int:
        """Adopt a lab with this tag that another process brought up (for takeover or
        status from a different process); returns the partition that owns the NIC."""
        with self._lock:
            if self._owner is not None:
                return self._owner
            if self.mode == "loopback":
                raise NetError("attach: a loopback-mode lab has no shared state to attach to")
            missing = [n for n in self._all_ns() if not _netns_exists(n)]
            if missing:
                raise NetError(
                    f"lab {self.tag}: namespaces {', '.join(missing)} do not exist (is the lab up?)"
                )
            self._prepare()
            owner = self._call(self._locate)
            if owner is None:
                self._close_handles()
                raise NetError(
                    f"lab {self.tag}: link {self._nic_if} is in no partition's namespace"
                )
            self._call(self._read_ids)
            self._owner = owner
            return owner

    def owner(self) -> int:
        with self._lock:
            if self._owner is None:
                raise NetError(f"lab {self.tag}: the network is not up")
            return self._owner

    def move_to(self, partition: int) -> MoveReport:
        """Take the NIC over for `partition` (see the module docstring)."""
        t0 = time.monotonic()
        with self._lock:
            old = self.owner()
            self._check_partition(partition)
            if partition == old:
                raise NetError(f"move_to: partition {partition} already owns the NIC")
            if self.mode == "loopback":
                # No namespaces: the address is local to every partition. The phases are
                # measured around what is really done: nothing, a bind check, nothing.
                t1 = time.monotonic()
                t2 = time.monotonic()
                self._bind_check()
                t3 = time.monotonic()
                t4 = time.monotonic()
                self._owner = partition
                return MoveReport(partition, t2 - t1, t3 - t2, t4 - t3, time.monotonic() - t0)
            try:
                move_s, addr_s, arp_s = self._call(self._move, old, partition)
            except BaseException as e:
                try:
                    self._owner = self._call(self._locate)
                except Exception:
                    pass
                if isinstance(e, (NetError, KeyboardInterrupt, SystemExit)):
                    raise
                raise NetError(f"move_to({partition}): {e}") from e
            self._owner = partition
            return MoveReport(partition, move_s, addr_s, arp_s, time.monotonic() - t0)

    def netns(self, partition: int) -> str | None:
        """The namespace the apps of `partition` run in (None in loopback mode)."""
        self._check_partition(partition)
        return self._ns[partition] if self.mode == "netns" else None

    def client_netns(self) -> str | None:
        return self._client_ns if self.mode == "netns" else None

    def enter(self, netns: str | None) -> Callable[[], None]:
        """A preexec_fn that puts the child into `netns` (see enter_netns)."""
        return enter_netns(netns)

    def down(self) -> None:
        """Delete the veth (and so its addresses) and the namespaces. Idempotent."""
        with self._lock:
            self._owner = None
            if self.mode == "loopback":
                return
            self._close_handles()
            problems = []
            links = {self._nic_if, self._client_if}
            for name in self._all_ns():
                if not _netns_exists(name):
                    continue
                # Delete the link first: a namespace whose processes are still alive
                # outlives its name, and the veth with the service address with it.
                try:
                    _delete_links(name, links)
                except Exception as e:
                    problems.append(f"links in netns {name}: {e}")
                try:
                    _remove_netns(name)
                except OSError as e:
                    problems.append(f"netns {name}: {e}")
            if problems:
                raise NetError(f"lab {self.tag}: down() could not remove: " + "; ".join(problems))

    def status(self) -> dict:
        with self._lock:
            st = {
                "mode": self.mode,
                "tag": self.tag,
                "up": self._owner is not None,
                "owner": self._owner,
                "nic": self.nic.name,
                "service": f"{self.service_ip}/{self.prefixlen if self.mode == 'netns' else 8}",
                "service_ip": self.service_ip,
                "client_ip": self.client_ip,
            }
            if self.mode == "netns":
                st.update(
                    {
                        "namespaces": {p: self._ns[p] for p in self.partitions},
                        "client_netns": self._client_ns,
                        "links": {"nic": self._nic_if, "client": self._client_if},
                        "nic_mac": self.nic_mac,
                    }
                )
            else:
                st.update({"namespaces": {p: None for p in self.partitions}, "client_netns": None})
            return st

    def __del__(self):
        # Dropping the object is not down() (a crashed lab leaves its namespaces for
        # cleanup_stale); only this process's plain descriptors are released (the netlink
        # handles belong to the worker thread and go with it).
        for fd in getattr(self, "_nsfd", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
        for s in getattr(self, "_pkt", {}).values():
            s.close()

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # -------------------------------------------------------------- internals

    def _check_partition(self, p) -> None:
        if p not in self.partitions:
            raise NetError(
                f"partition {p!r}: not one of this machine's partitions {self.partitions}"
            )

    def _all_ns(self) -> list[str]:
        return [self._ns[p] for p in self.partitions] + [self._client_ns]

    def _bind_check(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((self.service_ip, 0))
        except OSError as e:
            raise NetError(
                f"loopback mode: cannot bind the service address {self.service_ip}: {e.strerror}"
            ) from None
        finally:
            s.close()

    def _call(self, fn, *args):
        """Run fn in this object's netlink worker thread, bounded in time."""
        fut = self._pool.submit(fn, *args)
        try:
            return fut.result(timeout=_THREAD_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise NetError(
                f"netlink operation {fn.__name__} did not finish within {_THREAD_TIMEOUT:.0f} s"
            ) from None

    def _prepare(self) -> None:
        """Open what a move needs: namespace fds, packet sockets, netlink handles."""
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"net-{self.tag}")
        for p in self.partitions:
            self._nsfd[p] = os.open(_ns_path(self._ns[p]), os.O_RDONLY | os.O_CLOEXEC)
            # Protocol 0: this socket only sends; it never receives a frame.
            self._pkt[p] = socket_in(self._ns[p], socket.AF_PACKET, socket.SOCK_RAW, 0)

        def open_handles():
            for name in self._all_ns():
                self._ipr[name] = _iproute(name)

        self._call(open_handles)

    def _close_handles(self) -> None:
        if self._pool is not None:

            def close_all():
                for ipr in self._ipr.values():
                    try:
                        ipr.close()
                    except Exception:
                        pass
                self._ipr.clear()

            try:
                self._call(close_all)
            except Exception:
                pass
            self._pool.shutdown(wait=False)
            self._pool = None
        for fd in self._nsfd.values():
            os.close(fd)
        self._nsfd.clear()
        for s in self._pkt.values():
            s.close()
        self._pkt.clear()

    # The methods below run in the worker thread only.

    def _build(self, owner: int) -> None:
        for ipr in self._ipr.values():
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        cl = self._ipr[self._client_ns]
        cl.link("add", ifname=self._client_if, kind="veth", peer=self._nic_if)
        nic_index = cl.link_lookup(ifname=self._nic_if)[0]
        cl.link("set", index=nic_index, net_ns_fd=self._nsfd[owner])
        self._client_index = cl.link_lookup(ifname=self._client_if)[0]
        cl.addr("add", index=self._client_index, address=self.client_ip, prefixlen=self.prefixlen)
        cl.link("set", index=self._client_index, state="up")
        self._bring_up(self._ipr[self._ns[owner]])

    def _bring_up(self, ipr) -> None:
        link = ipr.link("get", ifname=self._nic_if)[0]
        index = link["index"]
        self.nic_mac = link.get("IFLA_ADDRESS")
        ipr.addr("add", index=index, address=self.service_ip, prefixlen=self.prefixlen)
        ipr.link("set", index=index, state="up")

    def _move(self, old: int, new: int) -> tuple[float, float, float]:
        t0 = time.monotonic()
        src = self._ipr[self._ns[old]]
        index = src.link_lookup(ifname=self._nic_if)
        if not index:
            raise NetError(f"move: link {self._nic_if} is not in {self._ns[old]} (partition {old})")
        src.link("set", index=index[0], net_ns_fd=self._nsfd[new])
        t1 = time.monotonic()
        self._bring_up(self._ipr[self._ns[new]])
        t2 = time.monotonic()
        # Is the ARP work needed? Measured on this kernel (6.x), not assumed:
        # * A veth end keeps its MAC when it changes namespace, and while it is away the
        #   client end loses carrier, which flushes the client's non-permanent neighbour
        #   entries. So after a move the client has either no entry (the next packet
        #   resolves the address afresh) or a PERMANENT one. A PERMANENT entry naming
        #   another MAC is neither flushed by carrier loss nor changed by any ARP, so it is
        #   deleted here; any other entry naming another MAC is deleted too (cheap).
        # * The announcement below therefore changes nothing for these clients: the
        #   client-observed gap was the same with and without it (a client that keeps a
        #   connect timeout of 1 s or more waits ~1 s either way: its SYN was dropped by the
        #   veth while the end was away, and TCP resends it after its initial 1 s RTO).
        #   It is sent anyway because it is the takeover's protocol and what fixes clients
        #   whenever the MAC does change (a real backup NIC, a re-created end, a bridge
        #   that keeps the client's carrier up): Linux lets a gratuitous ARP override an
        #   existing entry at once, even inside its 1 s locktime (checked), though with
        #   arp_accept=0 it creates none. It costs well under a millisecond.
        cl = self._ipr[self._client_ns]
        for n in cl.neigh("dump"):
            if (
                n.get("ifindex") == self._client_index
                and n.get("NDA_DST") == self.service_ip
                and n.get("NDA_LLADDR") not in (None, self.nic_mac)
            ):
                cl.neigh("del", dst=self.service_ip, ifindex=self._client_index)
        self._pkt[new].sendto(
            _garp_frame(_mac_bytes(self.nic_mac), self.service_ip), (self._nic_if, _ETH_P_ARP)
        )
        t3 = time.monotonic()
        return t1 - t0, t2 - t1, t3 - t2

    def _locate(self) -> int | None:
        for p in self.partitions:
            if self._ipr[self._ns[p]].link_lookup(ifname=self._nic_if):
                return p
        return None

    def _read_ids(self) -> None:
        cl = self._ipr[self._client_ns]
        self._client_index = cl.link_lookup(ifname=self._client_if)[0]
        owner = self._locate()
        link = self._ipr[self._ns[owner]].link("get", ifname=self._nic_if)[0]
        self.nic_mac = link.get("IFLA_ADDRESS")


def cleanup_stale(tag: str) -> list[str]:
    """Remove what a lab with this tag left behind when its process died without down():
    its links (in its namespaces and, defensively, in the host's) and its namespaces.
    The caller must know that lab is dead. Returns what was removed, e.g.
    ``["link cbx1-cl (netns cbx1-cl)", "netns cbx1-cl", ...]``."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise NetError(f"tag: {tag!r} must be 1-8 characters of [a-z0-9]")
    ns_re = re.compile(rf"cb{re.escape(tag)}-(p\d+|cl)")
    links = {f"cb{tag}-nic", f"cb{tag}-cl"}
    removed: list[str] = []
    try:
        names = sorted(n for n in os.listdir(NETNS_DIR) if ns_re.fullmatch(n))
    except FileNotFoundError:
        names = []
    problems = []
    for name in names:
        try:
            removed += [f"link {link} (netns {name})" for link in _delete_links(name, links)]
        except Exception as e:
            problems.append(f"links in netns {name}: {e}")
        try:
            if _remove_netns(name):
                removed.append(f"netns {name}")
        except OSError as e:
            problems.append(f"netns {name}: {e}")
    if os.geteuid() == 0:
        try:
            removed += [f"link {link} (host)" for link in _delete_links(None, links)]
        except Exception as e:
            problems.append(f"links in the host namespace: {e}")
    if problems:
        raise NetError(
            f"cleanup_stale({tag!r}): removed {removed}, could not remove: " + "; ".join(problems)
        )
    return removed


# ---------------------------------------------------------------- measurement


def _bench(argv: list[str] | None = None) -> int:
    """python -m kernel.hw.net [--moves N] [--tag T] [--mode netns|loopback]: time N
    takeovers back and forth between partitions 0 and 1 of a throw-away lab."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kernel.hw.net", description=_bench.__doc__)
    ap.add_argument("--moves", type=int, default=10)
    ap.add_argument("--tag", default=f"b{os.getpid() % 100000}")
    ap.add_argument("--address", default="198.18.0.1/24")
    ap.add_argument("--mode", choices=("netns", "loopback"), default=None)
    a = ap.parse_args(argv)
    if not 1 <= a.moves <= 1000:
        ap.error("--moves must be between 1 and 1000")
    net = Network(a.tag, Nic("nic0", a.address), [0, 1], mode=a.mode)
    reports = []
    t0 = time.monotonic()
    try:
        net.up(0)
        up_s = time.monotonic() - t0
        for i in range(a.moves):
            reports.append(net.move_to(1 - net.owner()))
    finally:
        t1 = time.monotonic()
        net.down()
        down_s = time.monotonic() - t1
    out = {
        "mode": net.mode,
        "moves": a.moves,
        "clock": "time.monotonic",
        "unit": "ms",
        "up": round(up_s * 1e3, 3),
        "down": round(down_s * 1e3, 3),
    }
    for field in ("move_s", "addr_s", "arp_s", "total_s"):
        xs = [getattr(r, field) * 1e3 for r in reports]
        out[field[:-2]] = {
            "median": round(statistics.median(xs), 3),
            "min": round(min(xs), 3),
            "max": round(max(xs), 3),
        }
    out["each"] = [
        {
            (k[:-2] + "_ms" if k.endswith("_s") else k): (
                round(v * 1e3, 3) if k.endswith("_s") else v
            )
            for k, v in asdict(r).items()
        }
        for r in reports
    ]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(_bench())
