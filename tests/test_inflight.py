"""The in-flight request table: recorded in physical memory, read back and judged by a backup."""

import errno

import pytest

from kernel.core import fuseproto as P
from kernel.core.icache import KSuper
from kernel.core.inflight import (
    APPLIED,
    ENTRY,
    HEADER,
    OPEN_ID_BATCH,
    RESEND_BIT,
    STARTED,
    InflightTable,
    read_inflight,
)
from kernel.hw.physmem import PAGE, PhysMem, partition_layout

SIZE = 64 << 20
REPLY = bytes(range(144))  # as long as a CREATE's entry_out + open_out


@pytest.fixture
def part(tmp_path):
    mem = PhysMem(str(tmp_path / "physmem"), SIZE, create=True)
    lay = partition_layout(0, 0, SIZE)
    ks = KSuper(mem, lay)
    yield mem, lay, ks
    mem.close()


def second_mapping(tmp_path) -> PhysMem:
    return PhysMem(str(tmp_path / "physmem"), readonly=True)


def test_the_table_lies_in_the_superblock_page_after_the_superblock(part):
    mem, lay, ks = part
    end = lay.inflight + HEADER.size + 8 * ENTRY.size
    assert lay.ksuper + 128 <= lay.inflight and end <= lay.ksuper + PAGE


def test_a_request_applied_is_answered_from_the_table_never_executed_again(part, tmp_path):
    mem, lay, ks = part
    t = InflightTable(mem, lay)
    t.started(0, 77, 1, P.CREATE)
    t.applied(0, 77, 1, P.CREATE, 0, REPLY, op_gen=5)
    ks.set(handles_open=0, op_gen=5)  # the operation ended before the crash
    a = read_inflight(second_mapping(tmp_path), lay)
    assert a.rejected == []
    action, e = a.for_resent(P.CREATE, 77 | RESEND_BIT, 1)
    assert action == "reply" and e["reply"] == REPLY and e["error"] == 0
    assert a.for_resent(P.CREATE, 78 | RESEND_BIT, 1) == ("execute", None)  # not recorded
    assert a.for_resent(P.RENAME, 77 | RESEND_BIT, 1) == ("execute", None)  # not this one's


def test_a_recorded_error_is_answered_again(part, tmp_path):
    mem, lay, ks = part
    t = InflightTable(mem, lay)
    t.applied(0, 9, 1, P.UNLINK, errno.ENOENT, b"", op_gen=3)
    action, e = read_inflight(second_mapping(tmp_path), lay).for_resent(P.UNLINK, 9, 1)
    assert action == "reply" and e["error"] == errno.ENOENT and e["reply"] == b""


def test_a_request_only_started_is_executed_again(part, tmp_path):
    mem, lay, ks = part
    InflightTable(mem, lay).started(0, 12, 1, P.RENAME)
    a = read_inflight(second_mapping(tmp_path), lay)
    assert a.entries[12]["state"] == STARTED
    assert a.for_resent(P.RENAME, 12 | RESEND_BIT, 1) == ("execute", None)


def test_an_applied_request_whose_operation_the_crash_undid_is_executed_again(part, tmp_path):
    # recorded applied inside its operation, which was still open at the crash: the
    # backup's undo record takes the change back, so the record must not be answered
    mem, lay, ks = part
    t = InflightTable(mem, lay)
    t.applied(0, 40, 1, P.MKDIR, 0, REPLY[:128], op_gen=8)
    ks.set(handles_open=1, op_gen=8)
    a = read_inflight(second_mapping(tmp_path), lay)
    assert a.entries[40]["state"] == APPLIED and a.died_in_op == 8
    assert a.for_resent(P.MKDIR, 40 | RESEND_BIT, 1) == ("execute", None)
    ks.set(handles_open=1, op_gen=9)  # another operation open at the crash: this one ended
    b = read_inflight(second_mapping(tmp_path), lay)
    assert b.for_resent(P.MKDIR, 40 | RESEND_BIT, 1)[0] == "reply"


@pytest.mark.parametrize("where", [8, 30, 100, 248])  # unique, opcode, reply, checksum
def test_a_corrupted_entry_is_rejected_counted_and_never_served(part, tmp_path, where):
    mem, lay, ks = part
    t = InflightTable(mem, lay)
    t.applied(0, 77, 1, P.CREATE, 0, REPLY, op_gen=5)
    phys = lay.inflight + HEADER.size + where
    mem.write(phys, bytes([mem.read(phys, 1)[0] ^ 0x10]))  # around the kernel: no checksum
    a = read_inflight(second_mapping(tmp_path), lay)
    assert a.entries == {}
    assert [(e.kind, e.field) for e in a.rejected] == [("in-flight request", "checksum")]
    # a name-space change it may have recorded as applied cannot be executed again safely
    assert a.for_resent(P.CREATE, 77 | RESEND_BIT, 1) == ("eio", None)
    assert a.for_resent(P.RENAME, 77 | RESEND_BIT, 1) == ("eio", None)
    # a write repeats the same bytes at the same offset: executing it again is harmless
    assert a.for_resent(P.WRITE, 77 | RESEND_BIT, 1) == ("execute", None)


def test_an_entry_with_an_unknown_state_is_rejected(part, tmp_path):
    mem, lay, ks = part
    InflightTable(mem, lay)
    phys = lay.inflight + HEADER.size
    mem.write(phys, ENTRY.encode(flags=7, unique=5, opcode=P.CREATE, reply=b""))
    a = read_inflight(second_mapping(tmp_path), lay)
    assert a.entries == {} and [e.field for e in a.rejected] == ["state"]


def test_a_backup_hands_out_open_ids_above_every_one_the_dead_kernel_gave(part, tmp_path):
    mem, lay, ks = part
    t = InflightTable(mem, lay, first_open_id=10)
    given = [t.next_open_id() for _ in range(3)]
    assert given == [10, 11, 12]
    a = read_inflight(second_mapping(tmp_path), lay)
    assert a.open_id_limit == 10 + OPEN_ID_BATCH > max(given)
    mem.write(lay.inflight + 20, b"\xff")  # the header's limit, torn
    b = read_inflight(second_mapping(tmp_path), lay)
    assert b.open_id_limit is None and [e.kind for e in b.rejected] == ["in-flight table header"]
    assert b.for_resent(P.CREATE, 1 | RESEND_BIT, 1) == ("execute", None)  # no entry lost


def test_a_new_table_clears_what_a_previous_kernel_left(part, tmp_path):
    mem, lay, ks = part
    InflightTable(mem, lay).applied(0, 3, 1, P.WRITE, 0, b"\0" * 8)
    InflightTable(mem, lay)
    assert read_inflight(second_mapping(tmp_path), lay).entries == {}


def test_bad_arguments_are_refused_with_a_clear_error(part):
    mem, lay, ks = part
    with pytest.raises(ValueError, match="first open id"):
        InflightTable(mem, lay, first_open_id=0)
    with pytest.raises(ValueError, match="cannot be recorded"):
        InflightTable(mem, lay).applied(0, 1, 1, P.CREATE, 0, bytes(300))
