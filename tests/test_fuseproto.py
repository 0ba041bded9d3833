"""The FUSE wire protocol (kernel/core/fuseproto.py): INIT negotiation and connection parameters."""

from __future__ import annotations

import pytest

from kernel.core import fuseproto as P


def init_in(minor: int, flags: int, readahead: int = 128 << 10) -> bytes:
    return P.INIT_IN.pack(7, minor, readahead, flags & 0xFFFFFFFF, 0) + bytes(44)


def test_init_takes_what_is_wanted_and_offered_never_the_writeback_cache():
    offered = P.WANTED | P.WRITEBACK_CACHE | (1 << 20)  # and POSIX ACLs, not wanted
    body, params = P.negotiate(init_in(45, offered), "/mnt")
    major, minor, ra, flags, max_bg, _, max_write, _, max_pages, _, _ = P.INIT_OUT.unpack(body)
    assert (major, minor) == (7, P.MAX_MINOR)
    assert flags == P.WANTED and not flags & P.WRITEBACK_CACHE
    assert max_write == P.MAX_WRITE == 1 << 20 and max_pages == 256 and ra == 128 << 10
    assert params == P.ConnParams(
        minor=P.MAX_MINOR,
        flags=P.WANTED,
        max_write=1 << 20,
        max_readahead=128 << 10,
        mountpoint="/mnt",
    )
    assert params.bufsize > params.max_write + P.IN_HEADER.size + P.WRITE_IN_SIZE
    _, params = P.negotiate(init_in(31, P.ASYNC_READ | P.MAX_PAGES_FLAG), "/mnt")
    assert params.minor == 31 and params.flags == P.ASYNC_READ | P.MAX_PAGES_FLAG


def test_init_refuses_a_protocol_too_old_for_1_mib_requests():
    with pytest.raises(OSError, match="7.27 is older than 7.28"):
        P.negotiate(init_in(27, P.WANTED), "/mnt")


def test_connection_parameters_round_trip_and_bad_ones_are_named():
    _, params = P.negotiate(init_in(38, P.WANTED), "/m")
    assert P.ConnParams.from_dict(params.as_dict()) == params
    good = params.as_dict()
    for change, field in [
        ({"minor": 12}, "minor 12"),
        ({"max_write": 1 << 30}, "max_write"),
        ({"flags": P.WRITEBACK_CACHE}, "flags"),
        ({"mountpoint": 3}, "mountpoint"),
        ({"extra": 1}, "unknown field 'extra'"),
        ({"minor": "38"}, "minor must be int"),
        ({"mountpoint": "rel"}, "mountpoint absolute"),
    ]:
        with pytest.raises(ValueError, match=field):
            P.ConnParams.from_dict({**good, **change})
    with pytest.raises(ValueError, match="expected a mapping"):
        P.ConnParams.from_dict([1, 2])
