"""The checkers (harness/checkers) and the confidence intervals (harness/stats) on
synthetic histories: properties under hypothesis, and hand-made histories with known
answers. Every figure asserted here is defined in docs/METRICS.md."""

from __future__ import annotations

import hashlib
import math
import statistics

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harness import checkers, history, stats
from harness.checkers import downtime, throughput, writes
from systems.base import CacheCounts, Phase, RecoveryReport


# --- building histories ----------------------------------------------------------------
class H:
    """A history under construction: operations as invoke + completion at given times."""

    def __init__(self):
        self.events: list[dict] = []
        self.verify_clock = 0.0

    def op(
        self,
        p,
        f: str,
        t0: float,
        t1: float | None,
        outcome: str | None,
        key=None,
        value=None,
        result=None,
    ) -> None:
        self.events.append(history.event("invoke", p, f, key=key, value=value, time_s=t0))
        if outcome is not None:
            self.events.append(
                history.event(
                    outcome, p, f, key=key, value=value if result is None else result, time_s=t1
                )
            )

    def crash(
        self, t: float, activated: float | None = None, delivered: float | None = None
    ) -> None:
        reply = (
            {"ok": True}
            if delivered is None
            else {"ok": True, "injected_ns": round(delivered * 1e9)}
        )
        self.op(
            history.NEMESIS,
            "crash",
            t,
            t + 0.02,
            "info",
            value={"fault": "panic"},
            result={"fault": "panic", "reply": reply},
        )
        if activated is not None:
            self.events.append(
                history.event("info", history.NEMESIS, "activated", time_s=activated)
            )

    def write(
        self,
        p,
        key: str,
        version: int,
        t0: float,
        t1: float,
        outcome: str | None,
        body: bytes | None = None,
    ) -> None:
        self.op(p, "write", t0, t1, outcome, key=key, value=wval(key, version, body))

    def verify(self, key: str, t: float, outcome: str, result: dict | None) -> None:
        """One verify read; the verify client reads one key at a time."""
        t = max(t, self.verify_clock)
        self.verify_clock = t + 0.02
        self.op(99, "verify", t, t + 0.01, outcome, key=key, result=result)

    def sorted(self) -> list[dict]:
        return sorted(self.events, key=lambda e: e["time"])  # stable, like history.merge


def body_of(key: str, version: int) -> bytes:
    return f"{key}:{version}:".encode() * (version + 3)


def wval(key: str, version: int, body: bytes | None = None) -> dict:
    b = body_of(key, version) if body is None else body
    return {"version": version, "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}


def seen(key: str, version: int) -> dict:
    v = wval(key, version)
    return {"bytes": v["bytes"], "sha256": v["sha256"]}


ABSENT = {"absent": True}
GARBAGE = {"bytes": 3, "sha256": hashlib.sha256(b"xyz").hexdigest()}


# --- downtime: hand-made -----------------------------------------------------------------
def test_downtime_is_last_ok_before_to_first_ok_invoked_after_per_client():
    h = H()
    h.op(1, "read", 9.4, 9.5, "ok")
    h.op(1, "read", 9.6, 10.1, "info")  # in flight at the crash
    h.op(1, "read", 10.15, 10.2, "fail")
    h.op(1, "read", 10.25, 10.7, "ok")
    h.op(2, "write", 9.8, 9.9, "ok", key="k", value=wval("k", 1))
    h.op(2, "write", 9.95, 10.02, "ok", key="k", value=wval("k", 2))  # the dying server's reply
    h.op(2, "write", 10.5, 11.0, "ok", key="k", value=wval("k", 3))  # invoked after: ends it
    h.crash(10.0)
    h.verify("k", 20.0, "ok", seen("k", 3))
    d = downtime(h.sorted())
    assert d["crash_at"] == 10.0 and d["clients"] == 2
    assert d["per_client"] == {"1": pytest.approx(1.2), "2": pytest.approx(1.1)}
    assert d["median_s"] == pytest.approx(1.15) and d["max_s"] == pytest.approx(1.2)
    assert d["recovered"] is True and d["recovered_clients"] == 2
    assert d["windows"]["1"] == [pytest.approx(-0.5), pytest.approx(0.7)]


def test_a_client_with_no_ok_after_the_crash_is_not_recovered_and_verify_does_not_count():
    h = H()
    h.op(1, "read", 9.0, 9.1, "ok")
    h.op(1, "read", 10.5, 12.5, "info")
    h.op(2, "read", 9.0, 9.2, "ok")
    h.op(2, "read", 10.5, 10.6, "ok")
    h.op(3, "read", 10.5, 10.6, "ok")  # no ok before the crash: not counted
    h.crash(10.0)
    h.op(1, "verify", 30.0, 30.1, "ok", key="k", result=ABSENT)
    d = downtime(h.sorted())
    assert d["per_client"] == {"1": None, "2": pytest.approx(1.4)}
    assert d["recovered"] is False and d["recovered_clients"] == 1
    assert d["median_s"] is None and d["max_s"] is None  # median of (1.4, ∞) is unbounded


def test_median_survives_a_minority_of_unrecovered_clients():
    h = H()
    for p, back in ((1, 10.5), (2, 11.0), (3, 12.0), (4, None)):
        h.op(p, "read", 9.9, 10.0 - 0.01, "ok")
        if back is not None:
            h.op(p, "read", back - 0.01, back, "ok")
    h.crash(10.0)
    d = downtime(h.sorted())
    assert d["median_s"] == pytest.approx(1.51) and d["max_s"] is None  # (1.01 + 2.01) / 2
    assert d["recovered"] is False


def test_crash_time_is_the_later_of_injection_and_activation():
    h = H()
    h.op(1, "read", 9.0, 9.5, "ok")
    h.op(1, "read", 10.0, 10.004, "ok")  # served between injection and activation
    h.op(1, "read", 10.01, 11.0, "ok")
    h.crash(10.0, activated=10.005)
    d = downtime(h.sorted())
    assert d["crash_at"] == 10.005 and d["injected_at"] == 10.0
    assert d["per_client"]["1"] == pytest.approx(0.996)
    h2 = H()
    h2.op(1, "read", 9.0, 9.99, "ok")  # before the injection, after the last beat
    h2.op(1, "read", 10.0, 11.0, "ok")
    h2.crash(10.0, activated=9.9)  # no activation recorded: the last heartbeat
    assert downtime(h2.sorted())["crash_at"] == 10.0
    assert downtime(h2.sorted())["per_client"]["1"] == pytest.approx(1.01)


def test_without_an_activation_record_the_kernels_receipt_of_the_fault_bounds_the_crash():
    h = H()
    h.op(1, "read", 9.0, 9.5, "ok")
    h.op(1, "read", 9.995, 10.003, "ok")  # answered before the kernel got the fault
    h.op(1, "read", 10.004, 10.6, "ok")
    h.crash(10.0, delivered=10.004)
    d = downtime(h.sorted())
    assert d["delivered_at"] == pytest.approx(10.004) and d["activated_at"] is None
    assert d["crash_at"] == pytest.approx(10.004)
    assert d["per_client"]["1"] == pytest.approx(0.597)


def test_no_crash_and_no_clients_give_no_figures():
    h = H()
    h.op(1, "read", 1.0, 1.1, "ok")
    d = downtime(h.sorted())
    assert d["crash_at"] is None and d["per_client"] == {} and d["recovered"] is False
    empty = H()
    empty.crash(5.0)
    d = downtime(empty.sorted())
    assert d["clients"] == 0 and d["median_s"] is None and d["recovered"] is False


# --- downtime: properties ------------------------------------------------------------------
@st.composite
def client_histories(draw, outage_forever: bool = False):
    """Clients issuing operations one after another around a crash; during the outage
    nothing succeeds; after it (unless forever) outcomes are random again."""
    crash = draw(st.floats(5.0, 15.0))
    outage = math.inf if outage_forever else draw(st.floats(0.0, 5.0))
    h = H()
    h.crash(crash)
    for p in range(draw(st.integers(1, 4))):
        t = draw(st.floats(0.0, 2.0))
        for _ in range(draw(st.integers(1, 40))):
            t0 = t + draw(st.floats(0.0, 0.5))
            t1 = t0 + draw(st.floats(0.001, 1.5))
            outcome = draw(st.sampled_from(["ok", "ok", "ok", "fail", "info", None]))
            if crash <= t1 < crash + outage and outcome == "ok":
                outcome = draw(st.sampled_from(["fail", "info"]))
            h.op(
                p,
                draw(st.sampled_from(["read", "write"])),
                t0,
                t1,
                outcome,
                key=f"c{p}",
                value=wval(f"c{p}", 1),
            )
            t = t1
    return h.sorted(), crash


def oracle_downtime(events: list[dict], crash: float) -> dict[str, float | None]:
    """Downtime straight from the definition, without the checker's code: each client
    runs one operation at a time, so an ok belongs to the client's latest invoke."""
    out = {}
    for p in sorted({e["process"] for e in events if e["process"] != history.NEMESIS}):
        oks, invoked = [], None
        for e in events:
            if e["process"] != p or e["f"] == "verify":
                continue
            if e["type"] == "invoke":
                invoked = e["time"]
            elif e["type"] == "ok":
                oks.append((invoked, e["time"]))
        before = [t for _, t in oks if t <= crash]
        after = [t for i, t in oks if i >= crash]
        if before:
            out[str(p)] = min(after) - max(before) if after else None
    return out


@settings(max_examples=200, deadline=None)
@given(client_histories())
def test_downtime_is_never_negative_and_matches_its_definition(hc):
    events, crash = hc
    d = downtime(events)
    assert d["per_client"] == oracle_downtime(events, crash)
    assert all(v >= 0 for v in d["per_client"].values() if v is not None)
    assert d["recovered"] == (
        bool(d["per_client"]) and all(v is not None for v in d["per_client"].values())
    )
    if d["max_s"] is not None:
        assert 0 <= d["median_s"] <= d["max_s"]


@settings(max_examples=100, deadline=None)
@given(client_histories(outage_forever=True))
def test_an_outage_with_no_ok_after_it_is_not_recovered(hc):
    events, _ = hc
    d = downtime(events)
    assert d["recovered"] is False
    assert all(v is None for v in d["per_client"].values())
    assert d["median_s"] is None and d["max_s"] is None


# --- throughput --------------------------------------------------------------------------
def test_throughput_bins_pre_crash_mean_and_time_to_90_percent():
    h = H()
    h.op(1, "read", 6.5, 6.6, "ok")  # partial first bin [6, 7)
    for second, n in ((7, 10), (8, 4), (9, 6), (10, 0), (11, 3), (12, 5), (13, 4)):
        for i in range(n):
            t = second + (i + 0.5) / n
            h.op(1, "read", t - 0.01, t, "ok")
    h.op(1, "read", 10.2, 10.9, "fail")
    h.op(1, "read", 13.95, 13.99, "info")  # load ends at 13.99
    h.crash(10.0)
    h.verify("x", 30.0, "ok", ABSENT)  # not load
    r = throughput(h.sorted(), bin_s=1.0, warmup_bins=1)
    assert [(b["t"], b["ops"]) for b in r["bins"]] == [
        (-4.0, 1),
        (-3.0, 10),
        (-2.0, 4),
        (-1.0, 6),
        (0.0, 0),
        (1.0, 3),
        (2.0, 5),
        (3.0, 4),
    ]
    assert [b["full"] for b in r["bins"]] == [False, True, True, True, True, True, True, False]
    assert r["pre_crash_bins"] == 2 and r["pre_crash_mean"] == pytest.approx(5.0)
    assert r["threshold"] == pytest.approx(4.5)
    assert r["time_to_90pct_s"] == pytest.approx(3.0)  # end of bin [2, 3)
    assert r["ok_ops"] == 33


def test_throughput_never_back_and_without_a_crash():
    h = H()
    for i in range(40):
        h.op(1, "read", i * 0.1, i * 0.1 + 0.05, "ok")
    h.op(1, "read", 4.0, 6.0, "info")
    crashed = H()
    crashed.events = list(h.events)
    crashed.crash(4.0)
    r = throughput(crashed.sorted(), bin_s=0.5, warmup_bins=0)
    assert r["pre_crash_mean"] == pytest.approx(10.0) and r["time_to_90pct_s"] is None
    r = throughput(h.sorted(), bin_s=0.5)
    assert r["crash_at"] is None and r["origin"] == 0.0
    assert r["pre_crash_mean"] is None and r["time_to_90pct_s"] is None
    assert sum(b["ops"] for b in r["bins"]) == 40
    with pytest.raises(ValueError, match="bin_s"):
        throughput(h.sorted(), bin_s=0)


@settings(max_examples=200, deadline=None)
@given(client_histories(), st.sampled_from([0.1, 0.25, 1.0, 2.0]), st.integers(0, 3))
def test_throughput_bins_count_every_ok_op_once_aligned_at_the_crash(hc, bin_s, warmup):
    events, crash = hc
    r = throughput(events, bin_s=bin_s, warmup_bins=warmup)
    oks = [e for e in events if e["type"] == "ok" and e["f"] != "verify"]
    assert sum(b["ops"] for b in r["bins"]) == len(oks) == r["ok_ops"]
    for b in r["bins"]:
        k = b["t"] / bin_s
        assert k == pytest.approx(round(k))  # edges at crash + k·bin_s
        assert b["ops_per_s"] == pytest.approx(b["ops"] / bin_s)
        lo = crash + b["t"]
        assert b["ops"] == sum(lo <= e["time"] < lo + bin_s for e in oks) or any(
            abs(e["time"] - lo) < 1e-9 or abs(e["time"] - lo - bin_s) < 1e-9 for e in oks
        )
    t90 = r["time_to_90pct_s"]
    if t90 is not None:
        assert t90 > 0 and (t90 / bin_s) == pytest.approx(round(t90 / bin_s))


# --- acknowledged writes: hand-made ------------------------------------------------------
def test_write_verdicts_by_hand():
    h = H()
    # a: v1, v2 acked, v3 indeterminate and it took effect → present
    h.write(1, "a", 1, 1.0, 1.1, "ok")
    h.write(1, "a", 2, 2.0, 2.1, "ok")
    h.write(1, "a", 3, 9.9, 10.5, "info")
    h.verify("a", 20, "ok", seen("a", 3))
    # b: the newest acked write lost, the one before found → 1 lost, bytes of v2
    h.write(1, "b", 1, 1.2, 1.3, "ok")
    h.write(1, "b", 2, 2.2, 2.3, "ok")
    h.verify("b", 20, "ok", seen("b", 1))
    # c: absent → both acked writes lost
    h.write(2, "c", 1, 1.0, 1.1, "ok")
    h.write(2, "c", 2, 2.0, 2.1, "ok")
    h.verify("c", 20, "ok", ABSENT)
    # d: content no write explains → corrupted
    h.write(2, "d", 1, 3.0, 3.1, "ok")
    h.verify("d", 20, "ok", GARBAGE)
    # e: verify never answered → unverified
    h.write(3, "e", 1, 1.0, 1.1, "ok")
    h.verify("e", 20, "fail", None)
    h.verify("e", 21, "info", None)
    # f: a failed attempt retried with the same body, acked → present
    h.write(3, "f", 1, 2.0, 2.1, "fail")
    h.write(3, "f", 1, 2.2, 2.3, "ok")
    h.verify("f", 20, "ok", seen("f", 1))
    # g: never acknowledged, absent → unacked, nothing promised
    h.write(4, "g", 1, 9.9, None, None)
    h.verify("g", 20, "ok", ABSENT)
    # i: a write recorded as failed explains nothing → corrupted
    h.write(4, "i", 1, 1.0, 1.1, "ok")
    h.write(4, "i", 2, 2.0, 2.1, "fail")
    h.verify("i", 20, "ok", seen("i", 2))
    h.crash(10.0)
    w = writes(h.sorted())
    status = {k["key"]: k["status"] for k in w["keys"]}
    assert status == {
        "a": "present",
        "b": "lost",
        "c": "lost",
        "d": "corrupted",
        "e": "unverified",
        "f": "present",
        "g": "unacked",
        "i": "corrupted",
    }
    by = {k["key"]: k for k in w["keys"]}
    assert by["a"]["found_version"] == 3 and by["b"]["found_version"] == 1
    assert (by["b"]["lost_writes"], by["b"]["lost_bytes"]) == (1, wval("b", 2)["bytes"])
    assert (by["c"]["lost_writes"], by["c"]["lost_bytes"]) == (2, wval("c", 2)["bytes"])
    assert (by["d"]["lost_writes"], by["d"]["lost_bytes"]) == (0, wval("d", 1)["bytes"])
    assert w["acked_writes"] == 10 and w["acked_keys"] == 7
    assert (w["present_keys"], w["lost_keys"], w["lost_writes"]) == (2, 2, 3)
    assert (w["corrupted_keys"], w["corrupted_writes"]) == (2, 2)
    assert w["lost_bytes"] == sum(
        wval(*kv)["bytes"] for kv in (("b", 2), ("c", 2), ("d", 1), ("i", 1))
    )
    assert (w["unverified_keys"], w["unverified_writes"], w["unacked_keys"]) == (1, 1, 1)


def test_a_read_that_saw_an_acked_write_undone_counts_it_lost_even_if_overwritten_later():
    h = H()
    # a: v2 acked before the crash; a read after it sees v1; v3 then overwrites → v2 lost
    h.write(1, "a", 1, 1.0, 1.1, "ok")
    h.write(1, "a", 2, 2.0, 2.1, "ok")
    h.op(1, "read", 11.0, 11.1, "ok", key="a", result=seen("a", 1))
    h.op(1, "read", 11.2, 11.3, "ok", key="a", result=seen("a", 1))  # the same loss, once
    h.write(1, "a", 3, 12.0, 12.1, "ok")
    h.verify("a", 20, "ok", seen("a", 3))
    # b: v1, v2 acked; the read after the crash finds nothing; rewritten → both lost
    h.write(5, "b", 1, 1.0, 1.1, "ok")
    h.write(5, "b", 2, 2.0, 2.1, "ok")
    h.op(5, "read", 11.0, 11.1, "ok", key="b", result=ABSENT)
    h.write(5, "b", 3, 12.0, 12.1, "ok")
    h.verify("b", 20, "ok", seen("b", 3))
    # c: the read sees a write of unknown outcome that took effect → nothing undone
    h.write(4, "c", 1, 1.0, 1.1, "ok")
    h.write(4, "c", 2, 9.9, 10.5, "info")
    h.op(4, "read", 11.0, 11.1, "ok", key="c", result=seen("c", 2))
    h.verify("c", 20, "ok", seen("c", 2))
    # d: unexplained content read: corruption, not proof of a loss; a read before any
    # acked write and a failed read say nothing
    h.op(2, "read", 0.5, 0.6, "ok", key="d", result=ABSENT)
    h.write(2, "d", 1, 1.0, 1.1, "ok")
    h.op(2, "read", 11.0, 11.1, "ok", key="d", result=GARBAGE)
    h.op(2, "read", 11.2, 11.3, "fail", key="d")
    h.verify("d", 20, "ok", seen("d", 1))
    # e: lost, read as lost, and still lost at verify → counted once
    h.write(3, "e", 1, 1.0, 1.1, "ok")
    h.write(3, "e", 2, 2.0, 2.1, "ok")
    h.op(3, "read", 11.0, 11.1, "ok", key="e", result=seen("e", 1))
    h.verify("e", 20, "ok", seen("e", 1))
    h.crash(10.0)
    w = writes(h.sorted())
    by = {k["key"]: k for k in w["keys"]}
    assert {k: v["status"] for k, v in by.items()} == {
        "a": "present",
        "b": "present",
        "c": "present",
        "d": "present",
        "e": "lost",
    }
    assert [by[k]["undone_writes"] for k in "abcde"] == [1, 2, 0, 0, 0]
    assert [by[k]["lost_writes"] for k in "abcde"] == [1, 2, 0, 0, 1]
    assert by["a"]["lost_bytes"] == wval("a", 2)["bytes"]
    assert by["b"]["lost_bytes"] == wval("b", 1)["bytes"] + wval("b", 2)["bytes"]
    assert by["e"]["lost_bytes"] == wval("e", 2)["bytes"]
    assert (w["lost_writes"], w["undone_writes"]) == (4, 3)


def test_an_empty_file_is_lost_data_unless_a_write_left_it_empty():
    h = H()
    empty = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    # a: created with data, found empty after the crash: the data never reached the disk
    h.write(1, "a", 1, 1.0, 1.1, "ok")
    h.write(1, "a", 2, 2.0, 2.1, "ok")
    h.verify("a", 20, "ok", empty)
    # b: its last acknowledged write was empty: finding it empty is finding it present
    h.write(2, "b", 1, 1.0, 1.1, "ok")
    h.write(2, "b", 2, 2.0, 2.1, "ok", body=b"")
    h.verify("b", 20, "ok", empty)
    h.crash(10.0)
    by = {k["key"]: k for k in writes(h.sorted())["keys"]}
    assert (by["a"]["status"], by["a"]["lost_writes"]) == ("lost", 2)
    assert by["b"]["status"] == "present"


def test_without_a_verify_phase_every_acked_key_is_unverified():
    h = H()
    h.write(1, "a", 1, 1.0, 1.1, "ok")
    h.write(1, "a", 2, 2.0, 2.1, "ok")
    h.write(1, "b", 1, 3.0, 3.1, "info")
    w = writes(h.sorted())
    assert w["acked_writes"] == 2 and w["unverified_keys"] == 1 and w["unverified_writes"] == 2
    assert w["lost_writes"] == 0 and w["present_keys"] == 0 and w["unacked_keys"] == 1


def test_unacked_key_with_unexplained_content_is_corrupted_but_costs_no_acked_write():
    h = H()
    h.write(1, "a", 1, 1.0, 1.1, "info")
    h.verify("a", 20, "ok", GARBAGE)
    w = writes(h.sorted())
    assert w["corrupted_keys"] == 1 and w["corrupted_writes"] == 0 and w["lost_bytes"] == 0


def test_a_write_without_its_digest_is_refused_naming_the_field():
    h = H()
    h.op(1, "write", 1.0, 1.1, "ok", key="a", value={"version": 1, "bytes": 3})
    with pytest.raises(history.HistoryError, match="sha256"):
        writes(h.sorted())


# --- acknowledged writes: properties -----------------------------------------------------
OUTCOMES = ["ok", "fail", "info", None]


@st.composite
def key_histories(draw):
    """One key written like the files client does: each version retried until ok, the
    last one possibly cut short by the trial's end; then what the verify phase found,
    chosen with its expected verdict."""
    h = H()
    t = 1.0
    versions = draw(st.integers(1, 6))
    attempts: list[tuple[int, str | None]] = []
    for v in range(1, versions + 1):
        last_version = v == versions
        while True:
            outcome = draw(st.sampled_from(OUTCOMES))
            attempts.append((v, outcome))
            h.write(1, "k", v, t, t + 0.05, outcome)
            t += 0.1
            if outcome == "ok" or (last_version and draw(st.booleans())):
                break
    acked = [v for v, o in attempts if o == "ok"]
    a = acked[-1] if acked else None
    # Versions that may have taken effect after A: indeterminate attempts invoked after it.
    a_at = max((i for i, (v, o) in enumerate(attempts) if o == "ok"), default=-1)
    maybe = sorted({v for v, o in attempts[a_at + 1 :] if o in ("info", None)})
    choice = draw(st.sampled_from(["A", "maybe", "older", "absent", "garbage", "unverified"]))
    if choice == "A" and a is not None:
        h.verify("k", 50, "ok", seen("k", a))
        expect = ("present", 0)
    elif choice == "maybe" and a is not None and maybe:
        h.verify("k", 50, "ok", seen("k", draw(st.sampled_from(maybe))))  # info took effect
        expect = ("present", 0)
    elif choice == "older" and a is not None and any(v < a for v in acked):
        old = draw(st.sampled_from([v for v in set(acked) if v < a]))
        h.verify("k", 50, "ok", seen("k", old))
        expect = ("lost", len([v for v in acked if v > old]))
    elif choice == "absent" and a is not None:
        h.verify("k", 50, "ok", ABSENT)
        expect = ("lost", len(acked))
    elif choice == "garbage" and a is not None:
        h.verify("k", 50, "ok", GARBAGE)
        expect = ("corrupted", 0)
    elif a is not None:
        h.verify("k", 50, draw(st.sampled_from(["fail", "info"])), None)
        expect = ("unverified", 0)
    else:
        h.verify("k", 50, "ok", ABSENT)
        expect = ("unacked", 0)
    h.crash(draw(st.floats(0.5, t + 1)))
    return h.sorted(), expect, acked, a


@settings(max_examples=300, deadline=None)
@given(key_histories())
def test_write_verdict_matches_what_was_found(kh):
    events, (status, lost), acked, a = kh
    w = writes(events)
    [k] = w["keys"]
    assert k["status"] == status
    assert w["acked_writes"] == len(acked) == k["acked_writes"]
    assert k["lost_writes"] == w["lost_writes"] == lost
    if status in ("lost", "corrupted"):
        assert w["lost_bytes"] == wval("k", a)["bytes"]  # the newest acked version's size
    else:
        assert w["lost_bytes"] == 0
    assert w["corrupted_writes"] == (status == "corrupted")
    assert 0 <= w["lost_writes"] <= w["acked_writes"]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(st.sampled_from(["info", None, "fail"]), min_size=1, max_size=5),
    st.data(),
)
def test_an_info_write_that_took_effect_is_not_lost(n_acked, tail, data):
    h = H()
    t = 1.0
    for v in range(1, n_acked + 1):
        h.write(1, "k", v, t, t + 0.05, "ok")
        t += 0.1
    for i, outcome in enumerate(tail):  # later writes: their outcome unknown or failed
        h.write(1, "k", n_acked + 1 + i, t, t + 0.05, outcome)
        t += 0.1
    h.crash(t - 0.05)
    unknown = [n_acked + 1 + i for i, o in enumerate(tail) if o != "fail"]
    assume(unknown)
    h.verify("k", 50, "ok", seen("k", data.draw(st.sampled_from(unknown))))
    w = writes(h.sorted())
    assert w["keys"][0]["status"] == "present"
    assert w["lost_writes"] == w["lost_bytes"] == w["corrupted_writes"] == 0


# --- check(): everything together, through a history file ----------------------------------
def test_check_combines_every_figure_from_a_history_file(tmp_path):
    h = H()
    h.write(1, "a", 1, 8.0, 8.1, "ok")
    h.write(1, "a", 2, 9.5, 9.6, "ok")
    h.write(1, "a", 3, 9.95, 10.6, "info")
    h.write(1, "a", 3, 10.7, 11.2, "ok")
    h.crash(10.0)
    h.verify("a", 20.0, "ok", seen("a", 2))
    path = tmp_path / "history.jsonl"
    history.write(h.sorted(), path)
    report = RecoveryReport(
        "orthros",
        "panic",
        10.0,
        "dying message",
        [
            Phase("detect", 10.0, 10.01),
            Phase("firmware", 10.01, 10.21, True),
            Phase("detect", 10.3, 10.31),
        ],
        CacheCounts(100, 40, 90, 38, 2),
        recovered=True,
        service_at=11.0,
    )
    figs = checkers.check(history.read(path), report.to_dict(), bin_s=0.5)
    assert set(figs) == {"downtime", "writes", "throughput", "recovery", "cache_hits", "cache"}
    assert figs["recovery"]["bin_s"] == 0.1 and figs["cache_hits"]["samples"] == 0
    assert figs["downtime"]["per_client"] == {"1": pytest.approx(1.6)}
    assert figs["writes"]["lost_writes"] == 1 and figs["writes"]["acked_writes"] == 3
    assert figs["throughput"]["bin_s"] == 0.5
    c = figs["cache"]
    assert (
        c["pages_before"],
        c["dirty_pages_before"],
        c["pages_recovered"],
        c["dirty_pages_recovered"],
        c["pages_rejected"],
        c["dirty_pages_lost"],
    ) == (100, 40, 90, 38, 2, 2)
    assert c["phases"] == {"detect": pytest.approx(0.02), "firmware": pytest.approx(0.2)}
    assert c["modeled_phases"] == ["firmware"]
    none = checkers.cache(None)
    assert none["pages_before"] is None and none["phases"] == {}


def test_cache_passes_further_counts_through_and_refuses_a_missing_one():
    rd = RecoveryReport("warmcache", "panic", 1.0, recovered=True, service_at=2.0).to_dict()
    rd["cache"]["pages_preserved"] = 7
    assert checkers.cache(rd)["pages_preserved"] == 7
    del rd["cache"]["pages_rejected"]
    with pytest.raises(ValueError, match="pages_rejected"):
        checkers.cache(rd)


# --- confidence intervals ----------------------------------------------------------------
def test_median_ci_known_ranks_and_small_samples():
    assert stats.median_ranks(100)[:2] == (40, 61)  # the textbook ranks at 95 %
    assert stats.min_n(0.95) == 6 and stats.min_n(0.99) == 8
    assert stats.median_ci(range(1, 11)) == (5.5, 2.0, 9.0)
    assert stats.median_ci([3.0, 1.0, 2.0]) == (2.0, None, None)  # no interval at n < 6
    assert stats.median_ci([]) == (None, None, None)
    with pytest.raises(ValueError, match="value 1"):
        stats.median_ci([1.0, None, 2.0])
    with pytest.raises(ValueError, match="level"):
        stats.median_ci([1.0], level=1.5)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_median_ranks_reach_the_level_and_are_the_narrowest_that_do(n, level):
    r = stats.median_ranks(n, level)
    if r is None:
        assert 1 - 2 * 0.5**n < level
        return
    j, k, coverage = r
    assert 1 <= j <= k == n + 1 - j and coverage >= level

    def cover(j):
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n

    assert cover(j) == pytest.approx(coverage)
    assert j + 1 > (n + 1) // 2 or cover(j + 1) < level


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60))
def test_intervals_hold_their_estimate_and_are_reproducible(xs):
    m, lo, hi = stats.median_ci(xs)
    mean, mlo, mhi = stats.mean_ci(xs)
    assert m == pytest.approx(statistics.median(xs))
    if len(xs) < stats.min_n():
        assert lo is hi is None and mlo is mhi is None
    else:
        assert lo <= m <= hi and mlo <= mean + 1e-6 and mean - 1e-6 <= mhi
        assert stats.mean_ci(xs) == (mean, mlo, mhi)  # seeded: the same every time


# --- the driver's view of the same definition ----------------------------------------------
def test_clients_count_as_back_only_with_an_ok_invoked_after_the_crash(tmp_path):
    """harness.workloads.clients.ClientGroup.all_ok_after, which ends the observe phase,
    follows the downtime definition: a reply to a request sent before t does not count,
    and every process in a shared history file (locust users) must be back."""
    from harness.workloads.clients import ClientGroup

    h = H()
    h.op(0, "read", 9.9, 10.05, "ok")  # sent before t = 10.0: the dying server's reply
    h.op(1, "read", 10.2, 10.3, "ok")
    path = tmp_path / "shared.jsonl"
    history.write(h.sorted(), path)
    group = ClientGroup([], [path])
    assert group.all_ok_after(10.0) is False
    h.op(0, "read", 10.4, 10.5, "fail")
    h.op(0, "verify", 10.6, 10.7, "ok", key="k", result=ABSENT)  # verify is not load
    history.write(h.sorted(), path)
    assert group.all_ok_after(10.0) is False
    h.op(0, "read", 10.8, 10.9, "ok")
    history.write(h.sorted(), path)
    assert group.all_ok_after(10.0) is True
    assert ClientGroup([], [tmp_path / "missing.jsonl"]).all_ok_after(0.0) is False


def test_clients_are_back_when_the_last_of_them_had_its_first_ok_after_the_crash(tmp_path):
    """ClientGroup.back_at, where a campaign's post-recovery load counts from: the latest,
    over the clients, of each one's first ok of an operation invoked after t; None while
    a client has none."""
    from harness.workloads.clients import ClientGroup

    h = H()
    h.op(0, "read", 9.9, 10.05, "ok")  # sent before t = 10.0: does not count
    h.op(0, "read", 10.1, 10.2, "ok")  # client 0 back at 10.2
    h.op(0, "read", 10.3, 10.4, "ok")
    h.op(1, "read", 10.1, 10.6, "fail")
    path = tmp_path / "shared.jsonl"
    history.write(h.sorted(), path)
    group = ClientGroup([], [path])
    assert group.back_at(10.0) is None  # client 1 not answered yet
    h.op(1, "read", 10.7, 10.8, "ok")  # client 1 back at 10.8
    h.op(1, "read", 10.9, 11.0, "ok")
    history.write(h.sorted(), path)
    assert group.back_at(10.0) == pytest.approx(10.8)
    assert ClientGroup([], [tmp_path / "missing.jsonl"]).back_at(0.0) is None
