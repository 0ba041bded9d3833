"""The software LPAR: what the emulated machine is made of.

Promises to every other layer: a validated, immutable description of the machine — total
physical memory, partitions (CPUs, a physical-memory range, the devices each owns at boot),
disks (image, size, device model) and NICs — loaded from TOML. The description is checked
against kernel/hw/machines/machine.schema.json (no unknown key, every field of its type), then
for sense: sizes, memory no larger than this host's RAM, partitions inside the machine's
memory and apart, devices that exist and have one owner, disk images as relative paths
that stay inside the work directory. Any bad field is refused with a one-line MachineError
naming the field and why. A partition renders as the kernel command line it boots with,
e.g. ``cpus=0 mem=0x0-0x38000000 devs=disk0,nic0``.

Modeled hardware time, all of it explicit here and reported as *modeled*: a disk's device
model is a built-in one (param.DEVICE_MODELS) or a ``[[disk_model]]`` of the description
(per-request latency, bandwidth, and a description citing the datasheet the figures come
from); every Disk carries the latency and bandwidth it is modeled with. ``[reboot]`` is a
reboot profile (firmware/POST seconds, kernel boot seconds, and where the figures come
from) that a rebooting scheme spends where real hardware would; without one a reboot
costs only what the emulated kernel really takes.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from kernel import param

BENCHMARK_NET = ipaddress.ip_network("198.18.0.0/15")
MAX_MODELED_LATENCY_S = 1.0  # per request: beyond this a figure is a typo, not a disk
MAX_MODELED_REBOOT_S = 600.0  # each of firmware and kernel boot
_UNITS = {
    "": 1,
    "B": 1,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
}


class MachineError(ValueError):
    """A machine description is wrong; the message names the field."""


@dataclass(frozen=True)
class DiskModel:
    name: str
    latency_s: float  # per request, modeled
    bandwidth: float  # bytes/s, modeled; 0 = unlimited
    description: str = ""  # where the figures come from (a datasheet, cited)

    @property
    def timing(self) -> tuple[float, float]:
        return self.latency_s, self.bandwidth


@dataclass(frozen=True)
class Disk:
    name: str
    size: int
    model: str
    image: str
    latency_s: float = 0.0  # the model's, resolved at load
    bandwidth: float = 0.0

    @property
    def timing(self) -> tuple[float, float]:
        """(per-request latency in seconds, bandwidth in bytes/s): the device model."""
        return self.latency_s, self.bandwidth


@dataclass(frozen=True)
class RebootProfile:
    """Hardware time of a reboot, modeled: spent by a rebooting scheme, labelled so."""

    firmware_s: float  # firmware/POST, before any kernel runs
    kernel_boot_s: float  # a real kernel's boot to the point where it mounts its disk
    description: str


@dataclass(frozen=True)
class Nic:
    name: str
    address: str  # CIDR, inside 198.18.0.0/15


@dataclass(frozen=True)
class Partition:
    id: int
    role: str
    cpus: tuple[int, ...]
    base: int
    size: int
    devices: tuple[str, ...]

    def cmdline(self) -> str:
        devs = ",".join(self.devices) or "none"
        cpus = ",".join(str(c) for c in self.cpus)
        return f"cpus={cpus} mem={self.base:#x}-{self.base + self.size:#x} devs={devs}"


@dataclass(frozen=True)
class Machine:
    name: str
    memory: int
    partitions: tuple[Partition, ...]
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...]
    disk_models: tuple[DiskModel, ...] = ()
    reboot: RebootProfile | None = None

    def modeled(self) -> dict:
        """The modeled hardware of this machine, for a run's record: each disk's model and
        the reboot profile, every figure labelled modeled."""
        return {
            "disks": {
                d.name: {
                    "model": d.model,
                    "latency_s": d.latency_s,
                    "bandwidth_bytes_s": d.bandwidth,
                    "modeled": True,
                    "description": self._model_description(d.model),
                }
                for d in self.disks
            },
            "reboot": None
            if self.reboot is None
            else {
                "firmware_s": self.reboot.firmware_s,
                "kernel_boot_s": self.reboot.kernel_boot_s,
                "modeled": True,
                "description": self.reboot.description,
            },
        }

    def _model_description(self, model: str) -> str:
        own = {m.name: m.description for m in self.disk_models}
        return own.get(model, f"built-in device model {model!r} (kernel/param.py)")

    def partition(self, pid: int) -> Partition:
        for p in self.partitions:
            if p.id == pid:
                return p
        raise MachineError(f"partition {pid}: no such partition")

    def disk(self, name: str) -> Disk:
        for d in self.disks:
            if d.name == name:
                return d
        raise MachineError(f"disk {name!r}: no such disk")


def parse_size(value, field: str) -> int:
    """A size as an int of bytes or a string like '896MiB'; negative sizes are refused."""
    if isinstance(value, bool):
        raise MachineError(f"{field}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).upper() not in _UNITS:
            raise MachineError(f"{field}: cannot read {value!r} as a size (e.g. 896MiB, 2GiB)")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise MachineError(f"{field}: expected a size, got {value!r}")
    if n < 0:
        raise MachineError(f"{field}: size must not be negative, got {value!r}")
    return n


def _require(table: dict, key: str, where: str):
    if key not in table:
        raise MachineError(f"{where}.{key}: missing")
    return table[key]


def _parse_partition(t: dict, i: int, ncpu: int) -> Partition:
    where = f"partition[{i}]"
    cpus = _require(t, "cpus", where)
    if not isinstance(cpus, list) or not cpus or not all(isinstance(c, int) for c in cpus):
        raise MachineError(f"{where}.cpus: expected a non-empty list of CPU numbers")
    for c in cpus:
        if c < 0 or c >= ncpu:
            raise MachineError(f"{where}.cpus: CPU {c} does not exist (this machine has {ncpu})")
    mem = _require(t, "memory", where)
    if not isinstance(mem, dict):
        raise MachineError(f"{where}.memory: expected {{ base = ..., size = ... }}")
    base = parse_size(_require(mem, "base", f"{where}.memory"), f"{where}.memory.base")
    size = parse_size(_require(mem, "size", f"{where}.memory"), f"{where}.memory.size")
    if size < param.MIN_FRAMES * param.PAGE_SIZE:
        raise MachineError(
            f"{where}.memory.size: {size} bytes is too small "
            f"(at least {param.MIN_FRAMES * param.PAGE_SIZE})"
        )
    if base % param.PAGE_SIZE or size % param.PAGE_SIZE:
        raise MachineError(f"{where}.memory: base and size must be multiples of {param.PAGE_SIZE}")
    devices = t.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise MachineError(f"{where}.devices: expected a list of device names")
    role = t.get("role", "active" if i == 0 else "backup")
    if role not in ("active", "backup"):
        raise MachineError(f"{where}.role: {role!r} is neither 'active' nor 'backup'")
    return Partition(t.get("id", i), role, tuple(cpus), base, size, tuple(devices))


def _parse_disk(t: dict, i: int, models: dict[str, tuple[float, float]]) -> Disk:
    where = f"disk[{i}]"
    model = t.get("model", param.DEFAULT_DEVICE_MODEL)
    if model not in models:
        raise MachineError(
            f"{where}.model: unknown device model {model!r} (known: {', '.join(models)})"
        )
    name = _require(t, "name", where)
    size = parse_size(_require(t, "size", where), f"{where}.size")
    if size < 16 << 20:
        raise MachineError(f"{where}.size: a disk must hold at least 16 MiB")
    if size // param.BLOCK_SIZE >= param.MAX_DISK_BLOCKS:
        raise MachineError(
            f"{where}.size: {value_of(t['size'])} is more than the file system "
            f"can address ({param.MAX_DISK_BLOCKS} blocks of {param.BLOCK_SIZE})"
        )
    image = t.get("image", f"{name}.img")
    _check_image_path(image, f"{where}.image")
    return Disk(name, size, model, image, *models[model])


def _number(t: dict, key: str, where: str, *, positive: bool = False) -> float:
    v = _require(t, key, where)
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < 0
        or (positive and v == 0)
    ):
        kind = "a positive number" if positive else "a number, 0 or more"
        raise MachineError(f"{where}.{key}: expected {kind}, got {v!r}")
    return float(v)


def _description(t: dict, where: str) -> str:
    d = _require(t, "description", where)
    if not isinstance(d, str) or not d.strip():
        raise MachineError(f"{where}.description: must say where the figures come from")
    return d.strip()


def _parse_disk_model(t: dict, i: int) -> DiskModel:
    """A device model of the description: latency in µs, bandwidth in MB/s (10^6 bytes,
    as datasheets give it)."""
    where = f"disk_model[{i}]"
    name = _require(t, "name", where)
    if name in param.DEVICE_MODELS:
        raise MachineError(
            f"{where}.name: {name!r} is a built-in device model; give this one a name of its own"
        )
    latency = _number(t, "latency_us", where) * 1e-6
    if latency > MAX_MODELED_LATENCY_S:
        raise MachineError(
            f"{where}.latency_us: {latency * 1e6:g} µs is more than "
            f"{MAX_MODELED_LATENCY_S * 1e3:g} ms per request"
        )
    bandwidth = _number(t, "bandwidth_mb_s", where, positive=True) * 1e6
    return DiskModel(name, latency, bandwidth, _description(t, where))


def _parse_reboot(t: dict) -> RebootProfile:
    where = "reboot"
    firmware, boot = _number(t, "firmware_s", where), _number(t, "kernel_boot_s", where)
    for key, v in (("firmware_s", firmware), ("kernel_boot_s", boot)):
        if v > MAX_MODELED_REBOOT_S:
            raise MachineError(f"{where}.{key}: {v:g} s is more than {MAX_MODELED_REBOOT_S:g} s")
    return RebootProfile(firmware, boot, _description(t, where))


def value_of(v) -> str:
    return v if isinstance(v, str) else f"{v} bytes"


def _check_image_path(image: str, field: str) -> None:
    """Images live in the lab's or the run's work directory, never elsewhere."""
    p = PurePosixPath(image)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\0" in image:
        raise MachineError(
            f"{field}: {image!r} must be a relative path inside the work "
            f"directory (no leading '/', no '..')"
        )


def _parse_nic(t: dict, i: int) -> Nic:
    where = f"nic[{i}]"
    addr = _require(t, "address", where)
    try:
        iface = ipaddress.ip_interface(addr)
    except ValueError:
        raise MachineError(f"{where}.address: {addr!r} is not an address with a prefix") from None
    if iface.ip not in BENCHMARK_NET:
        raise MachineError(
            f"{where}.address: {addr} is outside the benchmark range {BENCHMARK_NET}"
        )
    return Nic(_require(t, "name", where), addr)


def _check_layout(m: Machine) -> None:
    spans = sorted((p.base, p.base + p.size, p.id) for p in m.partitions)
    for lo, hi, pid in spans:
        if hi > m.memory:
            raise MachineError(
                f"partition[{pid}].memory: range {lo:#x}-{hi:#x} is beyond "
                f"the machine's memory ({m.memory:#x})"
            )
    for (_, hi1, a), (lo2, _, b) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise MachineError(f"partition[{b}].memory: overlaps partition[{a}]")
    ids = [p.id for p in m.partitions]
    if len(set(ids)) != len(ids):
        raise MachineError("partition.id: two partitions share an id")
    known = {d.name for d in m.disks} | {n.name for n in m.nics}
    owner: dict[str, int] = {}
    for p in m.partitions:
        for dev in p.devices:
            if dev not in known:
                raise MachineError(f"partition[{p.id}].devices: unknown device {dev!r}")
            if dev in owner:
                raise MachineError(
                    f"partition[{p.id}].devices: {dev!r} is already in partition[{owner[dev]}]"
                )
            owner[dev] = p.id


@functools.cache
def _schema_validator():
    import jsonschema  # imported here: kernels booting a checked description never pay for it

    text = resources.files("kernel.hw.machines").joinpath("machine.schema.json").read_text()
    return jsonschema.Draft202012Validator(json.loads(text))


def _field(path) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out or "(top level)"


def check_shape(doc: dict) -> None:
    """The description against the schema: the first problem, as one line naming the field."""
    errors = sorted(_schema_validator().iter_errors(doc), key=lambda e: list(map(str, e.path)))
    if not errors:
        return
    e = errors[0]
    where = _field(e.absolute_path)
    if e.validator == "additionalProperties":
        extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
        known = ", ".join(e.schema.get("properties", {}))
        sep = "." if e.absolute_path else ""
        prefix = "" if not e.absolute_path else where
        raise MachineError(f"{prefix}{sep}{extra[0]}: unknown key (known here: {known})")
    if e.validator == "type":
        want = (
            e.validator_value
            if isinstance(e.validator_value, str)
            else " or ".join(e.validator_value)
        )
        raise MachineError(f"{where}: expected {_TYPE_WORDS.get(want, want)}, got {e.instance!r}")
    raise MachineError(f"{where}: {e.message}")


_TYPE_WORDS = {
    "object": "a table",
    "array": "a list",
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "integer or string": "a size (bytes or e.g. '896MiB')",
}


def host_memory() -> int:
    """Bytes of RAM this host has: the most a machine's memory file can be backed by."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def from_dict(doc: dict) -> Machine:
    top = doc.get("machine", {})
    memory = parse_size(_require(top, "memory", "machine"), "machine.memory")
    if memory > host_memory():
        raise MachineError(
            f"machine.memory: {value_of(top['memory'])} is more than this "
            f"host's RAM ({host_memory() >> 20} MiB)"
        )
    ncpu = os.cpu_count() or 1
    parts = doc.get("partition", [])
    if not parts:
        raise MachineError("partition: a machine needs at least one partition")
    own = tuple(_parse_disk_model(t, i) for i, t in enumerate(doc.get("disk_model", [])))
    names = [dm.name for dm in own]
    if len(set(names)) != len(names):
        raise MachineError("disk_model.name: two disk models share a name")
    models = {**param.DEVICE_MODELS, **{dm.name: dm.timing for dm in own}}
    m = Machine(
        name=top.get("name", "machine"),
        memory=memory,
        partitions=tuple(_parse_partition(t, i, ncpu) for i, t in enumerate(parts)),
        disks=tuple(_parse_disk(t, i, models) for i, t in enumerate(doc.get("disk", []))),
        nics=tuple(_parse_nic(t, i) for i, t in enumerate(doc.get("nic", []))),
        disk_models=own,
        reboot=_parse_reboot(doc["reboot"]) if "reboot" in doc else None,
    )
    _check_layout(m)
    return m


def shipped() -> list[str]:
    """Names of the machine descriptions shipped with crashbench (``default``, ``paper``)."""
    return sorted(
        p.name[:-5]
        for p in resources.files("kernel.hw.machines").iterdir()
        if p.name.endswith(".toml")
    )


def _is_shipped(path) -> bool:
    """A bare name of a shipped description (``paper``), not a file of that name here."""
    s = str(path)
    return "/" not in s and not Path(s).exists() and s.removesuffix(".toml") in shipped()


def resolve(path: str | Path) -> str:
    """The file a description names: a shipped one's own path for its bare name, so that
    every process handed it reads the same file wherever it runs."""
    if _is_shipped(path):
        return str(
            resources.files("kernel.hw.machines").joinpath(
                str(path).removesuffix(".toml") + ".toml"
            )
        )
    return str(path)


def load(path: str | Path | None = None, *, shape_checked: bool = False) -> Machine:
    """Load a machine description; None means the shipped default machine, a bare name
    (``paper``) another shipped one. ``shape_checked``:
    the caller (a kernel the harness started) was handed a description the harness already
    checked against the schema; the checks for sense still run."""
    if path is None or _is_shipped(path):
        where = (
            f"{path or 'default'}.toml"
            if path is None or not str(path).endswith(".toml")
            else str(path)
        )
        text = resources.files("kernel.hw.machines").joinpath(where).read_text()
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise MachineError(f"{path}: cannot read machine description: {e.strerror}") from None
        where = str(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MachineError(f"{where}: not valid TOML: {e}") from None
    if not shape_checked:
        check_shape(doc)
    return from_dict(doc)
