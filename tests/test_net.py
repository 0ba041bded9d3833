"""The NIC: namespaces, veth, takeover with gratuitous ARP, teardown, loopback mode.

Network rule for these tests: every socket that sends is bound to an address that exists
only inside this lab's own namespaces (client_ip, service_ip in 198.18.0.0/15) or is on
loopback, so a bug that left a socket in the host's namespace fails to bind instead of
sending anything. Every wait is bounded.
"""

import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from kernel.hw.machine import Nic
from kernel.hw.net import MoveReport, NetError, Network, cleanup_stale, socket_in

PORT = 7007
ADDR = "198.18.0.1/24"

# A tiny TCP server that answers "<name> <what it received>", bounded in connections and
# in time. It binds the service address, which exists only in the lab's namespaces.
SERVER = textwrap.dedent("""
    import socket, sys, time
    ip, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(8)
    print("ready", flush=True)
    end = time.monotonic() + 60
    for _ in range(50):
        left = end - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            c, _ = s.accept()
        except socket.timeout:
            break
        with c:
            c.settimeout(2)
            try:
                c.sendall(name.encode() + b" " + c.recv(256))
            except OSError:
                pass
""")

# The same client as a separate process (started in the client namespace with enter()).
CLIENT = textwrap.dedent("""
    import socket, sys
    src, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = socket.socket()
    c.settimeout(3)
    try:
        c.bind((src, 0))
        c.connect((ip, port))
        c.sendall(b"ping")
        print(c.recv(256).decode(), end="")
    except OSError as e:
        print(f"error: {e}", end="")
        sys.exit(1)
""")


def leftovers(tag: str) -> list[str]:
    """Namespaces, links and addresses of lab `tag` visible from the host."""
    out = []
    for cmd in (["ip", "netns", "list"], ["ip", "-o", "link"], ["ip", "-o", "addr"]):
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        out += [line for line in text.splitlines() if f"cb{tag}" in line]
    return out


def new_tag() -> str:
    return "t" + secrets.token_hex(3)


class Lab:
    def __init__(self):
        self.nets: list[Network] = []
        self.procs: list[subprocess.Popen] = []

    def make(self, owner=0, partitions=(0, 1), address=ADDR, mode=None) -> Network:
        net = Network(new_tag(), Nic("nic0", address), list(partitions), mode=mode)
        self.nets.append(net)
        if owner is not None:
            net.up(owner)
        return net

    def serve(self, net: Network, partition: int, port: int = PORT) -> subprocess.Popen:
        """Start the server for `partition` in its namespace; wait (bounded) until ready."""
        p = subprocess.Popen(
            [sys.executable, "-c", SERVER, net.service_ip, str(port), f"p{partition}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=net.enter(net.netns(partition)),
        )
        self.procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 10)
        line = p.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            p.kill()
            raise AssertionError(f"server p{partition} did not start: {p.stderr.read1(4096)!r}")
        return p

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        try:
            for net in self.nets:
                net.down()
        finally:
            for net in self.nets:
                if net.mode == "netns":
                    cleanup_stale(net.tag)


@pytest.fixture
def lab():
    lb = Lab()
    try:
        yield lb
    finally:
        lb.close()
    for net in lb.nets:
        assert leftovers(net.tag) == [], f"lab {net.tag} left pieces behind"


def ask(net: Network, port: int = PORT, timeout: float = 3.0) -> str:
    """One request from the client namespace (in this process, via socket_in)."""
    c = socket_in(net.client_netns())
    try:
        c.settimeout(timeout)
        c.bind((net.client_ip, 0))  # fails outside the lab's client namespace
        c.connect((net.service_ip, port))
        c.sendall(b"ping")
        return c.recv(256).decode()
    finally:
        c.close()


def ask_until(net: Network, want: str, tries: int = 5) -> list[str]:
    """Bounded retries (each 3 s at most) until the answer is `want`; all answers."""
    seen = []
    for _ in range(tries):
        try:
            seen.append(ask(net))
        except OSError as e:
            seen.append(f"error: {e}")
        if seen[-1] == want:
            break
        time.sleep(0.05)
    return seen


def netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


# ---------------------------------------------------------------- takeover


@pytest.mark.root
def test_takeover_moves_the_service_address(lab):
    home = netns_inode()
    net = lab.make(owner=0)
    assert net.mode == "netns" and net.owner() == 0
    assert net.service_ip == "198.18.0.1" and net.client_ip == "198.18.0.254"
    p0 = lab.serve(net, 0)
    assert ask(net) == "p0 ping"
    # the same, from a client process started in the client namespace with enter()
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, net.client_ip, net.service_ip, str(PORT)],
        capture_output=True,
        text=True,
        timeout=20,
        preexec_fn=net.enter(net.client_netns()),
    )
    assert (out.returncode, out.stdout) == (0, "p0 ping"), out.stderr

    rep = net.move_to(1)
    assert isinstance(rep, MoveReport) and rep.to_partition == 1 and net.owner() == 1
    assert 0 <= rep.move_s and 0 <= rep.addr_s and 0 <= rep.arp_s
    assert rep.move_s + rep.addr_s + rep.arp_s <= rep.total_s
    # p1's server can bind the address only now: it is in p1's namespace
    lab.serve(net, 1)
    assert p0.poll() is None, "p0's server is still alive ..."
    answers = ask_until(net, "p1 ping")
    assert answers[-1] == "p1 ping" and "p0 ping" not in answers  # ... but out of reach
    assert all(ask(net) == "p1 ping" for _ in range(3))

    # the address is gone from partition 0's namespace, present in partition 1's
    def addrs(ns):
        return subprocess.run(
            ["ip", "-n", ns, "-o", "-4", "addr"], capture_output=True, text=True, timeout=10
        ).stdout

    assert net.service_ip not in addrs(net.netns(0))
    assert f"{net.service_ip}/24" in addrs(net.netns(1))

    # and back: p0's listener, still bound to the address, answers again
    net.move_to(0)
    assert ask_until(net, "p0 ping")[-1] == "p0 ping"
    assert netns_inode() == home, "the test's own thread changed namespace"


@pytest.mark.root
def test_takeover_after_the_owner_died(lab):
    """The crashed partition's processes are all gone; the move needs nothing from them."""
    net = lab.make(owner=0, partitions=(0, 1, 2))
    p0 = lab.serve(net, 0)
    assert ask(net) == "p0 ping"
    p0.send_signal(signal.SIGKILL)
    p0.wait(timeout=10)
    net.move_to(2)
    lab.serve(net, 2)
    assert ask_until(net, "p2 ping")[-1] == "p2 ping"
    st = net.status()
    assert st["owner"] == 2 and st["mode"] == "netns" and st["service"] == ADDR
    assert st["namespaces"] == {0: net.netns(0), 1: net.netns(1), 2: net.netns(2)}
    assert st["client_netns"] == net.client_netns() and st["client_ip"] == net.client_ip


@pytest.mark.root
def test_gratuitous_arp_is_announced_to_the_client(lab):
    net = lab.make(owner=0)
    cap = socket_in(net.client_netns(), socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        cap.bind((f"cb{net.tag}-cl", 0x0806))
        net.move_to(1)
        ip = socket.inet_aton(net.service_ip)
        mac = bytes.fromhex(net.status()["nic_mac"].replace(":", ""))
        found = None
        end = time.monotonic() + 3
        for _ in range(100):  # bounded: frames and time
            left = end - time.monotonic()
            if left <= 0:
                break
            cap.settimeout(left)
            try:
                frame = cap.recv(2048)
            except socket.timeout:
                break
            op, sha, spa, tha, tpa = struct.unpack("!6xH6s4s6s4s", frame[14:42])
            if spa == ip and tpa == ip:
                found = (frame[:6], frame[6:12], op, sha)
                break
        assert found == (b"\xff" * 6, mac, 1, mac), "no ARP announcement for the service address"
    finally:
        cap.close()


def neighbours(net: Network) -> str:
    return subprocess.run(
        ["ip", "-n", net.client_netns(), "-4", "neigh", "show", net.service_ip],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout


@pytest.mark.root
def test_neighbour_entry_naming_another_mac_is_flushed(lab):
    """A PERMANENT entry survives the client end's carrier loss and ignores ARP: only
    the flush in move_to() can take it away."""
    net = lab.make(owner=0)
    bogus = "02:00:5e:00:00:99"
    subprocess.run(
        [
            "ip",
            "-n",
            net.client_netns(),
            "neigh",
            "replace",
            net.service_ip,
            "lladdr",
            bogus,
            "dev",
            f"cb{net.tag}-cl",
            "nud",
            "permanent",
        ],
        check=True,
        timeout=10,
    )
    assert bogus in neighbours(net)
    net.move_to(1)
    assert bogus not in neighbours(net)
    lab.serve(net, 1)
    assert ask_until(net, "p1 ping")[-1] == "p1 ping"
    assert net.status()["nic_mac"] in neighbours(net)


# ---------------------------------------------------------------- teardown


@pytest.mark.root
def test_down_leaves_nothing_even_with_processes_inside(lab):
    net = lab.make(owner=0, partitions=(0, 1, 2))
    names = [net.netns(p) for p in (0, 1, 2)] + [net.client_netns()]
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
    ).stdout
    assert all(n in listed for n in names)
    server = lab.serve(net, 0)  # keeps partition 0's namespace alive
    net.down()
    assert leftovers(net.tag) == []
    # the namespace lives on in the server, but without the veth or the address
    with open(f"/proc/{server.pid}/net/dev") as f:
        assert f"cb{net.tag}" not in f.read()
    with open(f"/proc/{server.pid}/net/fib_trie") as f:
        assert net.service_ip not in f.read()
    net.down()  # idempotent
    with pytest.raises(NetError):
        net.owner()
    assert net.status()["up"] is False


@pytest.mark.root
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the abandoned netlink handles
def test_cleanup_stale_after_the_object_is_dropped(lab):
    tag = new_tag()
    net = Network(tag, Nic("nic0", ADDR), [0, 1])
    try:
        net.up(0)
        del net  # no down(): the lab "crashed"
        assert len(leftovers(tag)) >= 3
        again = Network(tag, Nic("nic0", ADDR), [0, 1])
        with pytest.raises(NetError, match="cleanup_stale"):
            again.up(0)
        removed = cleanup_stale(tag)
        assert {f"netns cb{tag}-p0", f"netns cb{tag}-p1", f"netns cb{tag}-cl"} <= set(removed)
        assert any(r.startswith(f"link cb{tag}-") for r in removed)
        assert leftovers(tag) == []
        assert cleanup_stale(tag) == []  # nothing left to remove
        lab.nets.append(again)  # and the tag is usable again
        again.up(1)
        assert again.owner() == 1
    finally:
        cleanup_stale(tag)


@pytest.mark.root
def test_cleanup_stale_after_the_lab_process_was_killed(lab):
    tag = new_tag()
    code = textwrap.dedent(f"""
        import time
        from kernel.hw.machine import Nic
        from kernel.hw.net import Network
        Network({tag!r}, Nic("nic0", {ADDR!r}), [0, 1, 2]).up(1)
        print("up", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        ready, _, _ = select.select([p.stdout], [], [], 30)
        assert ready and p.stdout.readline().strip() == b"up", p.stderr.read1(4096)
        p.kill()
        p.wait(timeout=10)
        assert any(f"cb{tag}-p2" in line for line in leftovers(tag))
        removed = cleanup_stale(tag)
        assert f"netns cb{tag}-p2" in removed and leftovers(tag) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        p.stdout.close()
        p.stderr.close()
        cleanup_stale(tag)


@pytest.mark.root
def test_attach_from_another_object(lab):
    """Another process (here: another object) adopts the lab by its tag and takes over."""
    net = lab.make(owner=0)
    other = Network(net.tag, Nic("nic0", ADDR), [0, 1])
    lab.nets.append(other)
    assert other.attach() == 0
    assert other.status()["nic_mac"] == net.status()["nic_mac"]
    other.move_to(1)
    lab.serve(net, 1)
    assert ask_until(net, "p1 ping")[-1] == "p1 ping"


# ---------------------------------------------------------------- loopback mode


def test_loopback_mode_when_forced(lab):
    net = lab.make(owner=None, mode="loopback")
    assert net.mode == "loopback" and net.client_ip is None
    assert net.service_ip.startswith("127.") and not net.service_ip.startswith("127.0.")
    assert net.netns(0) is None and net.client_netns() is None
    net.up(0)
    probe = socket.socket()
    probe.bind((net.service_ip, 0))
    port = probe.getsockname()[1]
    probe.close()
    p0 = lab.serve(net, 0, port=port)  # enter(None) is a no-op preexec_fn

    def ask_lo():
        with socket.create_connection((net.service_ip, port), timeout=3) as c:
            c.sendall(b"ping")
            return c.recv(256).decode()

    assert ask_lo() == "p0 ping"
    p0.kill()  # the crash
    p0.wait(timeout=10)
    rep = net.move_to(1)
    assert rep.to_partition == 1 and net.owner() == 1 and rep.total_s >= 0
    lab.serve(net, 1, port=port)
    assert ask_lo() == "p1 ping"
    st = net.status()
    assert (st["mode"], st["owner"], st["namespaces"]) == ("loopback", 1, {0: None, 1: None})
    net.down()
    net.down()


def test_loopback_addresses_differ_by_tag_and_nic():
    a = Network("aa", Nic("n", "198.18.0.1/24"), [0], mode="loopback")
    b = Network("bb", Nic("n", "198.18.0.1/24"), [0], mode="loopback")
    c = Network("aa", Nic("n", "198.18.0.2/24"), [0], mode="loopback")
    assert len({a.service_ip, b.service_ip, c.service_ip}) == 3


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "address, words",
    [
        ("10.0.0.1/24", "10.0.0.1/24"),  # private range
        ("192.0.2.1/24", "192.0.2.1/24"),  # documentation range
        ("8.8.8.8/32", "8.8.8.8/32"),  # public
        ("198.20.0.1/24", "198.20.0.1/24"),  # just past 198.18.0.0/15
        ("198.18.0.1/8", "198.0.0.0/8"),  # the address is inside, its subnet is not
        ("198.18.0.1/32", "198.18.0.1/32"),  # no room for the client end
        ("198.18.0.255/24", "198.18.0.255/24"),  # broadcast address
        ("not-an-address", "not-an-address"),
    ],
)
def test_nic_address_outside_the_benchmark_range_is_refused(address, words):
    for mode in ("loopback", None):
        with pytest.raises(NetError, match=words.replace(".", r"\.")):
            Network("bad", Nic("nic0", address), [0, 1], mode=mode)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tag": "Bad-Tag"}, "tag"),
        ({"tag": "toolongtag"}, "tag"),
        ({"tag": ""}, "tag"),
        ({"partitions": []}, "partitions"),
        ({"partitions": [0, 0]}, "partitions"),
        ({"partitions": [0, -1]}, "partitions"),
        ({"mode": "bridge"}, "mode"),
    ],
)
def test_bad_arguments_are_refused(kwargs, words):
    args = {"tag": "ok", "partitions": [0, 1], "mode": "loopback"} | kwargs
    with pytest.raises(NetError, match=words):
        Network(args["tag"], Nic("nic0", ADDR), args["partitions"], mode=args["mode"])


def test_bad_calls_are_refused(lab):
    net = lab.make(owner=None, mode="loopback")
    with pytest.raises(NetError, match="not up"):
        net.move_to(1)
    with pytest.raises(NetError, match="partition 7"):
        net.up(7)
    net.up(0)
    with pytest.raises(NetError, match="already up"):
        net.up(0)
    with pytest.raises(NetError, match="already owns"):
        net.move_to(0)
    with pytest.raises(NetError, match="partition 5"):
        net.move_to(5)
    with pytest.raises(NetError, match="does not exist"):
        net.enter("cb-no-such-namespace")
    with pytest.raises(NetError, match="tag"):
        cleanup_stale("../etc")


def test_automatic_mode_falls_back_to_loopback_when_not_root(monkeypatch):
    import kernel.hw.net as net_mod

    monkeypatch.setattr(net_mod, "_probe", None)  # forget the cached probe
    monkeypatch.setattr(net_mod.os, "geteuid", lambda: 1000)
    net = Network("auto", Nic("nic0", ADDR), [0, 1])
    assert net.mode == "loopback" and net.service_ip.startswith("127.")
    with pytest.raises(NetError, match="not root"):
        Network("auto", Nic("nic0", ADDR), [0, 1], mode="netns")
