"""A crash kernel loaded in advance into a partition's reserved area (kexec-style).

Promises to a scheme that keeps a crash kernel ready (systems/otherworld/) and to the fault
injector: ``load(mem, lay, params, modules)`` writes an image record into the partition's
crash-kernel area (``PartLayout.crashk``, param.CRASHK_BYTES, reserved by every partition's
layout): a header (magic, version, length, generation, the xxh3 of the payload, the sha256
of the crash kernel's code) and its payload, the parameters the crash kernel needs (JSON).
Nothing of it runs. ``check(mem, lay)`` is what runs before control passes to it, as kdump's
purgatory does: the header's own checksum, the payload's length and checksum, and the code's
digest recomputed from the code it would run; any mismatch raises ``ImageRefused`` naming
the reason, so a corrupted image is never started. ``record_span`` is where a loaded record
lies (what a wild write into it may hit).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass

import xxhash

from kernel import param
from kernel.hw.physmem import CorruptObject, Layout, PartLayout, PhysMem

IMAGE = Layout(
    "crash-kernel image",
    "KEXC",
    1,
    [
        ("length", "I"),  # payload bytes after the header
        ("generation", "I"),  # how many images were loaded into this partition before
        ("loaded_ns", "Q"),  # CLOCK_MONOTONIC
        ("payload_csum", "Q"),
        ("code_sha256", "32s"),
    ],
    72,
)


class ImageRefused(Exception):
    """The reserved area holds no valid crash-kernel image: it must not be started."""


@dataclass
class Image:
    params: dict  # what the crash kernel is started with (its module, its modules' list)
    generation: int
    loaded_ns: int
    code_sha256: bytes


def code_digest(modules: tuple[str, ...] | list[str]) -> bytes:
    """sha256 over the source of each module, in order: the crash kernel's code."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise ImageRefused(f"crash-kernel code: module {name} not found")
        with open(spec.origin, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.digest()


def load(mem: PhysMem, lay: PartLayout, params: dict, generation: int = 0) -> Image:
    """Write the image record for ``params`` (``params["modules"]``: the code it runs)."""
    payload = json.dumps(params, sort_keys=True).encode()
    if IMAGE.size + len(payload) > param.CRASHK_BYTES:
        raise ValueError(
            f"crash-kernel image: {IMAGE.size + len(payload)} bytes do not fit the reserved "
            f"{param.CRASHK_BYTES}"
        )
    digest = code_digest(params["modules"])
    now = time.monotonic_ns()
    head = IMAGE.encode(
        length=len(payload),
        generation=generation,
        loaded_ns=now,
        payload_csum=xxhash.xxh3_64_intdigest(payload),
        code_sha256=digest,
    )
    mem.write(lay.crashk, head + payload)
    return Image(params, generation, now, digest)


def check(mem: PhysMem, lay: PartLayout) -> Image:
    """The loaded image, validated; ImageRefused with the reason if it must not run."""
    try:
        h = IMAGE.decode(mem.mm, lay.crashk)
    except CorruptObject as e:
        raise ImageRefused(f"crash-kernel image header: {e}") from None
    if IMAGE.size + h["length"] > param.CRASHK_BYTES:
        raise ImageRefused(f"crash-kernel image: length {h['length']} runs past the reserved area")
    start = lay.crashk + IMAGE.size
    payload = bytes(mem.mm[start : start + h["length"]])
    if xxhash.xxh3_64_intdigest(payload) != h["payload_csum"]:
        raise ImageRefused("crash-kernel image: payload checksum mismatch (modified or torn)")
    try:
        params = json.loads(payload)
        modules = params["modules"]
    except (ValueError, KeyError, TypeError) as e:
        raise ImageRefused(f"crash-kernel image: unreadable parameters ({e})") from None
    if code_digest(modules) != h["code_sha256"]:
        raise ImageRefused("crash-kernel image: code digest differs from the code it would run")
    return Image(params, h["generation"], h["loaded_ns"], h["code_sha256"])


def record_span(mem: PhysMem, lay: PartLayout) -> tuple[int, int]:
    """(phys, bytes) of the loaded record, read without validation; ValueError if none."""
    vals = IMAGE.unpack(mem.mm, lay.crashk)
    if vals[0] != IMAGE.magic:
        raise ValueError("no crash-kernel image loaded in this partition")
    return lay.crashk, min(IMAGE.size + vals[3], param.CRASHK_BYTES)
