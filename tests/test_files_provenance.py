"""Where a corrupted file's bytes came from (harness/workloads/files_provenance.py): every
version a real `files` client sends is rebuilt from its history alone, and a file holding a
mix of them, zeros or foreign bytes is labelled page by page."""

from __future__ import annotations

import hashlib
import json
import types

import jsonschema

from harness.campaign import plan, store
from harness.workloads import Service
from harness.workloads.files import Files
from harness.workloads.files_client import FilesClient
from harness.workloads.files_provenance import explain, rebuild
from kernel.param import PAGE_SIZE

SEED, CLIENT, FILE = 11, 2, 5
KEY = f"c{CLIENT}-f{FILE}.bin"


def _client_writes(n: int = 12) -> tuple[list[dict], dict[int, bytes]]:
    """``n`` versions of one file as the client makes them (creates, overwrites, appends),
    each recorded as its history does, the first attempt of every third one failing."""
    a = types.SimpleNamespace(
        seed=SEED,
        id=CLIENT,
        url="http://127.0.0.1:9",
        read_timeout=1.0,
        connect_timeout=0.1,
        manifest=None,
        max_kib=24,
    )
    c = FilesClient(a, rec=None, stop=None)
    c.http.close()
    events, bodies, t = [], {}, 0.0
    for i in range(n):
        body, version, kind = c.next_version(FILE)
        value = {
            "version": version,
            "kind": kind,
            "bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        for outcome in ["fail", "ok"] if i % 3 == 2 else ["ok"]:
            events.append(
                {
                    "type": "invoke",
                    "process": CLIENT,
                    "f": "write",
                    "key": KEY,
                    "value": value,
                    "time": t,
                }
            )
            events.append(
                {
                    "type": outcome,
                    "process": CLIENT,
                    "f": "write",
                    "key": KEY,
                    "value": value,
                    "time": t + 0.5,
                }
            )
            t += 1.0
        c.files[FILE] = (version, body)
        bodies[version] = body
    return events, bodies


def test_every_version_the_client_sent_is_rebuilt_from_its_history():
    events, bodies = _client_writes()
    kinds = {e["value"]["kind"] for e in events}
    assert {"create", "overwrite", "append"} <= kinds  # the history holds every kind
    assert rebuild(KEY, events, SEED) == bodies


def test_a_version_whose_digest_differs_is_named_unrebuilt_and_never_matches(tmp_path):
    events, bodies = _client_writes(3)
    events[0]["value"] = {**events[0]["value"], "sha256": "0" * 64}  # another seed's v1
    (tmp_path / KEY).write_bytes(bodies[1])
    got = explain(tmp_path / KEY, KEY, events, SEED)
    assert got["versions"]["v1"]["rebuilt"] is False
    assert got["versions"]["v2"]["outcome"] == "ok" and got["versions"]["v2"]["sent_s"] is None
    crash = {"type": "invoke", "process": "nemesis", "f": "crash", "value": {}, "time": 1.25}
    got = explain(tmp_path / KEY, KEY, [crash, *events], SEED)  # times from the crash
    assert got["versions"]["v1"]["sent_s"] == -1.25 and got["versions"]["v2"]["sent_s"] == -0.25
    assert all(label != "v1" for *_, label in got["pages"])


def test_a_torn_overwrite_zeros_and_foreign_bytes_are_told_apart_page_by_page(tmp_path):
    events, bodies = _client_writes()
    v = _overwrite_of_three_pages(events, bodies)
    events = [e for e in events if e["value"]["version"] <= v]  # no later append shares v's pages
    new, old = bodies[v], bodies[v - 1]
    torn = new[: 2 * PAGE_SIZE] + old[2 * PAGE_SIZE :]
    (tmp_path / KEY).write_bytes(torn)
    got = explain(tmp_path / KEY, KEY, events, SEED)
    last = -(-len(torn) // PAGE_SIZE) - 1
    assert got["pages"] == [[0, 1, f"v{v}"], [2, last, f"v{v - 1}"]]
    assert got["bytes"] == len(torn)

    (tmp_path / KEY).write_bytes(new[:PAGE_SIZE] + bytes(PAGE_SIZE) + b"\x01" * 100)
    got = explain(tmp_path / KEY, KEY, events, SEED)
    assert got["pages"] == [[0, 0, f"v{v}"], [1, 1, "zeros"], [2, 2, "none"]]

    # the old version under a larger size (a size committed ahead of its data): its last
    # page holds its tail, then zeros; the pages after it zeros
    grown = old + bytes(PAGE_SIZE + (-len(old)) % PAGE_SIZE)
    (tmp_path / KEY).write_bytes(grown)
    got = explain(tmp_path / KEY, KEY, events, SEED)
    last, full = divmod(len(old), PAGE_SIZE)
    assert full, "the generated old version ends on a page boundary: no partial page to label"
    want = [[last, last, f"v{v - 1}, then zeros"]] if full else []
    zeros_from = last + 1 if full else last
    assert got["pages"][-len(want) - 1 :] == [
        *want,
        [zeros_from, len(grown) // PAGE_SIZE - 1, "zeros"],
    ]


def _overwrite_of_three_pages(events, bodies) -> int:
    """The version of an overwrite of at least 3 pages over a version of at least as many."""
    for e in events:
        v = e["value"]
        prev = bodies.get(v["version"] - 1, b"")
        if v["kind"] == "overwrite" and min(v["bytes"], len(prev)) >= 3 * PAGE_SIZE:
            return v["version"]
    raise AssertionError("the generated history has no overwrite of 3 pages or more")


def test_the_files_workload_explains_a_key_through_the_mount_and_the_record_keeps_it(tmp_path):
    from harness.campaign.report import evidence_lines
    from harness.campaign.task import result_of
    from tests.test_campaign import CLEAN, _rec  # a trial record as the outcome rule reads it

    events, bodies = _client_writes()
    (tmp_path / KEY).write_bytes(bodies[max(bodies)][:100])
    svc = Service(
        mount=str(tmp_path), ip="127.0.0.1", client_netns=None, workdir=tmp_path, seed=SEED
    )
    foreign = b"a corpus file's bytes"
    (tmp_path / "c3-f1.bin").write_bytes(foreign)
    entry = {"path": "/corpus/d0/f1.html", "bytes": len(foreign)}
    (tmp_path / "files-corpus.json").write_text(
        json.dumps([{**entry, "sha256": hashlib.sha256(foreign).hexdigest()}])
    )
    ev = Files().explain(svc, [KEY, "c0-f0.bin", "c3-f1.bin"], events)
    assert ev[KEY]["pages"] == [[0, 0, f"v{max(bodies)}"]] and ev[KEY]["bytes"] == 100
    assert "corpus_file" not in ev[KEY] and ev["c3-f1.bin"]["corpus_file"] == entry["path"]
    assert "c0-f0.bin" in ev["c0-f0.bin"]["error"]  # not there: said, not raised

    fault = plan.FaultSpec("f", 0, "orthros", "bit-flip", "superblock", "now", 0, 1)
    res = result_of(fault, _rec(corrupted_writes=1, evidence=ev), CLEAN, 1.0)
    jsonschema.validate(res, store.FAULT_SCHEMA)
    assert res["outcome"] == "corrupted" and res["evidence"] == ev
    assert f'f {KEY}: {{"bytes":100,' in evidence_lines([res])  # the report prints it


def test_a_trial_asks_its_workload_only_about_the_keys_read_back_corrupted():
    from harness import driver

    def op(f, key, t, sha, typ="ok"):
        v = {"version": 1, "kind": "create", "bytes": 1, "sha256": sha}
        return [
            {"type": "invoke", "process": 0, "f": f, "key": key, "value": v, "time": t},
            {"type": typ, "process": 0, "f": f, "key": key, "value": v, "time": t + 0.1},
        ]

    events = op("write", "a", 0, "aa") + op("write", "b", 1, "bb")
    events += op("verify", "a", 2, "aa") + op("verify", "b", 3, "ff")  # b: no write explains it
    asked = []

    class Told:
        def explain(self, svc, keys, evs):
            asked.append(keys)
            return {k: {"told": True} for k in keys}

    t = types.SimpleNamespace(
        report=types.SimpleNamespace(recovered=True), events=events, workload=Told(), svc=None
    )
    assert driver.Trial.explain(t) == {"b": {"told": True}} and asked == [["b"]]
    t.report.recovered = False  # nothing was read back: nothing to explain
    assert driver.Trial.explain(t) == {} and asked == [["b"]]
