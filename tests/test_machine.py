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
    p.write_text(
        text % {"cpu1": 1 if (os.cpu_count() or 1) > 1 else 0, **kw} if "%(" in text else text
    )
    return p


def test_default_machine_matches_the_paper_split():
    m = machine.load()
    p0, p1 = m.partitions
    assert m.memory == 1 << 30
    assert (p0.cpus, p0.size, p0.devices) == ((0,), 896 << 20, ("disk0", "nic0"))
    assert (p1.cpus, p1.base, p1.size) == ((1,), 896 << 20, 128 << 20)
    assert m.disk("disk0").model == "gp3" and m.disk("disk0").size == 2 << 30
    assert p0.cmdline() == "cpus=0 mem=0x0-0x38000000 devs=disk0,nic0"


def test_good_file_loads(tmp_path):
    m = machine.load(write(tmp_path, GOOD))
    assert [p.id for p in m.partitions] == [0, 1]


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('size = "128MiB"', 'size = "256MiB"', "beyond the machine's memory"),
        ('base = "896MiB"', 'base = "512MiB"', "overlaps partition[0]"),
        ("cpus = [0]", "cpus = [4096]", "CPU 4096 does not exist"),
        (
            'devices = ["disk0", "nic0"]\n[[partition]]\ncpus',
            'devices = ["disk0", "nic0"]\n[[partition]]\ndevices = ["disk0"]\ncpus',
            "'disk0' is already in partition[0]",
        ),
        ('size = "2GiB"', 'size = "-2GiB"', "disk[0].size: size must not be negative"),
        ('model = "ssd"', 'model = "floppy"', "unknown device model 'floppy'"),
        ('address = "198.18.0.1/24"', 'address = "10.0.0.1/24"', "outside the benchmark range"),
        ('memory = "1GiB"', 'memory = "lots"', "machine.memory: cannot read 'lots'"),
        ('devices = ["disk0", "nic0"]', 'devices = ["disk9"]', "unknown device 'disk9'"),
    ],
)
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


# --- modeled hardware: disk models and the reboot profile ------------------------------------

PROFILE = (
    GOOD.replace('model = "ssd"', 'model = "slow"')
    + """
[[disk_model]]
name = "slow"
latency_us = 2500
bandwidth_mb_s = 100
description = "a made-up disk for this test"
[reboot]
firmware_s = 1.5
kernel_boot_s = 2
description = "made-up figures for this test"
"""
)


def test_the_paper_profile_is_shipped_with_cited_datasheet_models():
    m = machine.load("paper")  # a shipped description, by name
    d = m.disk("disk0")
    assert (d.model, d.timing) == ("ssd-860evo", (pytest.approx(92.6e-6), 550e6))
    models = {dm.name: dm for dm in m.disk_models}
    assert models["hdd-st1000dm003"].timing == (pytest.approx(12.66e-3), 210e6)
    assert "860 EVO" in models["ssd-860evo"].description
    assert "ST1000DM003" in models["hdd-st1000dm003"].description
    assert (m.reboot.firmware_s, m.reboot.kernel_boot_s) == (25, 22)
    assert "Kato" in m.reboot.description
    hw = m.modeled()
    assert hw["disks"]["disk0"]["modeled"] is True and hw["reboot"]["modeled"] is True


def test_the_default_machine_has_a_cited_cloud_volume_and_no_reboot_profile():
    m = machine.load()
    assert m.reboot is None
    (gp3,) = m.disk_models
    assert m.disk("disk0").model == "gp3" == gp3.name
    assert m.disk("disk0").timing == (pytest.approx(333.3e-6), 131.072e6)
    assert "EBS gp3" in gp3.description and "3,000 IOPS" in gp3.description
    assert m.modeled()["disks"]["disk0"]["modeled"] is True


def test_a_disk_is_modeled_with_its_profiles_figures(tmp_path):
    from kernel.hw.blockdev import BlockDevice

    m = machine.load(write(tmp_path, PROFILE))
    d = m.disk("disk0")
    assert d.timing == (pytest.approx(2.5e-3), 100e6)
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    with BlockDevice(str(img), d.model, delay=False, timing=d.timing) as dev:
        dev.read(0, 4)
        assert dev.stats["modeled_s"] == pytest.approx(2.5e-3 + 4 * 4096 / 100e6)


@pytest.mark.parametrize(
    "old,new,message",
    [
        (
            "firmware_s = 1.5",
            "firmware_s = -1",
            "reboot.firmware_s: -1 is less than the minimum of 0",
        ),
        (
            "firmware_s = 1.5",
            'firmware_s = "long"',
            "reboot.firmware_s: expected a number, got 'long'",
        ),
        (
            "kernel_boot_s = 2",
            "kernel_boot_s = 1e6",
            "reboot.kernel_boot_s: 1e+06 s is more than 600 s",
        ),
        ("kernel_boot_s = 2", "kernel_boot_s = 2\nkexec_s = 1", "reboot.kexec_s: unknown key"),
        (
            'description = "made-up figures for this test"',
            "",
            "reboot: 'description' is a required",
        ),
        (
            "latency_us = 2500",
            "latency_us = 2e6",
            "disk_model[0].latency_us: 2e+06 µs is more than 1000 ms",
        ),
        (
            "bandwidth_mb_s = 100",
            "bandwidth_mb_s = 0",
            "disk_model[0].bandwidth_mb_s: 0 is less than or equal",
        ),
        ('name = "slow"', 'name = "ssd"', "disk_model[0].name: 'ssd' is a built-in device model"),
        ('model = "slow"', 'model = "slower"', "disk[0].model: unknown device model 'slower'"),
    ],
)
def test_a_bad_modeled_hardware_field_is_named(tmp_path, old, new, message):
    text = PROFILE % {"cpu1": 1 if (os.cpu_count() or 1) > 1 else 0}
    assert old in text
    p = tmp_path / "m.toml"
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(MachineError) as e:
        machine.load(p)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_a_shipped_description_is_named_by_its_file_for_every_process():
    path = machine.resolve("paper")
    assert path.endswith("paper.toml") and os.path.isfile(path)
    assert machine.load(path) == machine.load("paper")
    assert machine.resolve("mine.toml") == "mine.toml"
