"""The machine description: the default machine, and every kind of bad field named."""
import os

import pytest

from kernel.hw import machine
from kernel.hw.machine import MachineError

GOOD = """
[machine]
memory = "1GiB"
[[partition]]
cpus = [0]
memory = { base = "0", size = "896MiB" }
devices = ["disk0", "nic0"]
[[partition]]
cpus = [%(cpu1)s]
memory = { base = "896MiB", size = "128MiB" }
[[disk]]
name = "disk0"
size = "2GiB"
model = "ssd"
[[nic]]
name = "nic0"
address = "198.18.0.1/24"
"""


def write(tmp_path, text, **kw):
    p = tmp_path / "m.toml"
    p.write_text(text % {"cpu1": 1 if (os.cpu_count() or 1) > 1 else 0, **kw} if "%(" in text else text)
    return p


def test_default_machine_matches_the_paper_split():
    m = machine.load()
    p0, p1 = m.partitions
    assert m.memory == 1 << 30
    assert (p0.cpus, p0.size, p0.devices) == ((0,), 896 << 20, ("disk0", "nic0"))
    assert (p1.cpus, p1.base, p1.size) == ((1,), 896 << 20, 128 << 20)
    assert m.disk("disk0").model == "ssd" and m.disk("disk0").size == 2 << 30
    assert p0.cmdline() == "cpus=0 mem=0x0-0x38000000 devs=disk0,nic0"


def test_good_file_loads(tmp_path):
    m = machine.load(write(tmp_path, GOOD))
    assert [p.id for p in m.partitions] == [0, 1]


@pytest.mark.parametrize("old,new,message", [
    ('size = "128MiB"', 'size = "256MiB"', "beyond the machine's memory"),
    ('base = "896MiB"', 'base = "512MiB"', "overlaps partition[0]"),
    ("cpus = [0]", "cpus = [4096]", "CPU 4096 does not exist"),
    ('devices = ["disk0", "nic0"]\n[[partition]]\ncpus', 'devices = ["disk0", "nic0"]\n[[partition]]\ndevices = ["disk0"]\ncpus',
     "'disk0' is already in partition[0]"),
    ('size = "2GiB"', 'size = "-2GiB"', "disk[0].size: size must not be negative"),
    ('model = "ssd"', 'model = "floppy"', "unknown device model 'floppy'"),
    ('address = "198.18.0.1/24"', 'address = "10.0.0.1/24"', "outside the benchmark range"),
    ('memory = "1GiB"', 'memory = "lots"', "machine.memory: cannot read 'lots'"),
    ('devices = ["disk0", "nic0"]', 'devices = ["disk9"]', "unknown device 'disk9'"),
])
def test_bad_field_is_named(tmp_path, old, new, message):
    text = GOOD % {"cpu1": 1 if (os.cpu_count() or 1) > 1 else 0}
    assert old in text
    p = tmp_path / "m.toml"
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(MachineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        machine.load(p)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(MachineError, match="cannot read machine description"):
        machine.load(tmp_path / "absent.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[machine\n")
    with pytest.raises(MachineError, match="not valid TOML"):
        machine.load(p)
