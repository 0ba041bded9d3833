"""Recovery metrics at a resolution that shows the outage (harness/checkers/recovery.py), the
page cache's hit ratio from the kernel's own counters (harness/checkers/cachehits.py,
harness/kcounters.py), and the ranking by work lost: synthetic histories with a known outage
give the known figures, and partial bins never enter a figure."""

from __future__ import annotations

import pytest

from harness import plots, report
from harness.checkers import hit_ratio, recovery
from harness.checkers.cachehits import SAMPLE
from harness.history import NEMESIS
from harness.kcounters import CounterSampler
from kernel import param
from tests.stack import Stack

CRASH = 100.0
RATE = 100  # ops/s: one client, one op every 10 ms, each taking LAT s
LAT = 0.004


def op(t_done: float, lat: float = LAT, process: int = 0, f: str = "read") -> list[dict]:
    return [
        {"type": "invoke", "process": process, "f": f, "time": t_done - lat},
        {"type": "ok", "process": process, "f": f, "time": t_done},
    ]


def nem(type_: str, f: str, t: float, value=None) -> dict:
    e = {"type": type_, "process": NEMESIS, "f": f, "time": t}
    if value is not None:
        e["value"] = value
    return e


def history(
    pre_s: float = 5.0,
    outage_s: float = 0.5,
    ramp: tuple[float, float] = (0.0, 1.0),
    post_s: float = 4.0,
    recovered_after: float | None = None,
    slow_after: float = LAT,
) -> list[dict]:
    """A steady load of RATE ops/s from CRASH − pre_s, nothing completed during
    [CRASH, CRASH + outage_s), then ``ramp`` = (seconds, fraction of RATE), then RATE
    again until CRASH + post_s. Completions sit mid-way between bin edges."""
    ev = [nem("invoke", "crash", CRASH)]
    step = 1.0 / RATE
    t = CRASH - pre_s + step / 2
    while t < CRASH:
        ev += op(t)
        t += step
    t = CRASH + outage_s + step / 2
    ramp_end = CRASH + outage_s + ramp[0]
    while t < CRASH + post_s:
        if t >= ramp_end or int(round((t - CRASH) / step)) % int(round(1 / ramp[1])) == 0:
            ev += op(t, lat=slow_after)
        t += step
    if recovered_after is not None:
        ev.append(nem("info", "recovered", CRASH + recovered_after))
    return sorted(ev, key=lambda e: e["time"])


def test_a_known_outage_gives_the_known_figures_at_a_tenth_of_a_second():
    r = recovery(history(outage_s=0.5))
    assert r["bin_s"] == 0.1
    assert r["pre_crash_mean"] == pytest.approx(RATE)
    by_t = {round(b["t"], 1): b for b in r["bins"]}
    assert [by_t[k / 10]["ops"] for k in range(0, 7)] == [0, 0, 0, 0, 0, 10, 10]
    assert r["time_to_90pct_s"] == pytest.approx(0.6)  # the end of the first bin back
    assert r["time_to_99pct_s"] == pytest.approx(0.6)
    assert r["lost_ops"] == pytest.approx(0.5 * RATE)  # half a second of service
    assert r["lost_service_s"] == pytest.approx(0.5)


def test_a_slow_return_costs_its_area_and_is_back_only_when_it_holds():
    # outage 0.3 s, then 1 s at half the rate, then full: back to 90 % at 1.3 + 0.1
    r = recovery(history(outage_s=0.3, ramp=(1.0, 0.5)))
    assert r["time_to_90pct_s"] == pytest.approx(1.4)
    assert r["lost_ops"] == pytest.approx(0.3 * RATE + 0.5 * RATE)
    assert r["lost_service_s"] == pytest.approx(0.8)


def test_partial_bins_enter_no_figure():
    # a burst inside the load's first, partial bin must not raise the pre-crash rate
    ev = history(pre_s=3.05)
    first = min(e["time"] for e in ev if e["process"] != NEMESIS)
    burst = [e for k in range(40) for e in op(first + 0.0001 * (k + 1), lat=0.00001, process=1)]
    r = recovery(sorted(ev + burst, key=lambda e: e["time"]))
    assert not r["bins"][0]["full"]
    assert r["pre_crash_mean"] == pytest.approx(RATE)
    # the load stops 0.55 s after the crash: its only bin back is partial, so no return
    r = recovery(history(outage_s=0.5, post_s=0.55))
    assert not r["bins"][-1]["full"] and r["bins"][-1]["ops"] > 0
    assert r["time_to_90pct_s"] is None
    # its work lost is the full bins' only (the 0.5 s outage), as a lower bound
    assert r["lost_censored"] and r["lost_ops"] == pytest.approx(0.5 * RATE)
    # and the figures draw no partial bin
    xs, _ = plots._mean_by_bin([r["bins"]], "ops_per_s", r["bin_s"])
    assert round(r["bins"][-1]["t"], 1) not in [round(x, 1) for x in xs]
    assert round(r["bins"][0]["t"], 1) not in [round(x, 1) for x in xs]


def test_never_back_has_a_lower_bound_of_work_lost_and_no_crash_has_no_figures():
    failing = [
        e
        for k in range(50)
        for e in (
            {"type": "invoke", "process": 0, "f": "read", "time": CRASH + 0.1 * k + 0.01},
            {"type": "fail", "process": 0, "f": "read", "time": CRASH + 0.1 * k + 0.02},
        )
    ]
    r = recovery(sorted(history(outage_s=10.0, post_s=9.0) + failing, key=lambda e: e["time"]))
    assert [b["ops"] for b in r["bins"] if b["t"] >= 0 and b["full"]] == [0] * 49
    assert r["time_to_90pct_s"] is None
    # never back: the work lost until the observation ended, flagged as a lower bound
    assert r["lost_censored"] and r["lost_service_s"] == pytest.approx(4.9)
    no_crash = [e for e in history() if e["process"] != NEMESIS]
    r = recovery(no_crash)
    assert r["bins"] == [] and r["pre_crash_mean"] is None and r["time_to_90pct_s"] is None
    assert r["lost_ops"] is None and not r["lost_censored"]


def test_latency_before_and_after_and_the_clients_gap():
    r = recovery(history(outage_s=0.5, slow_after=0.008, recovered_after=0.45))
    assert r["latency"]["before"]["p50_s"] == pytest.approx(LAT)
    assert r["latency"]["before"]["p99_s"] == pytest.approx(LAT)
    # the load's first bin is partial; of the 4.9 s of full bins the first second is warm-up
    assert r["latency"]["before"]["n"] == 3.9 * RATE
    assert r["latency"]["after"]["p50_s"] == pytest.approx(0.008)
    # first ack at 0.505 s (completion), the scheme said service was back at 0.45 s
    assert r["first_ok_after_s"] == pytest.approx(0.505)
    assert r["recovered_at"] == pytest.approx(0.45)
    assert r["client_gap_s"] == pytest.approx(0.055)
    assert recovery(history())["client_gap_s"] is None  # no end of outage recorded


def samples(
    pid: int, start: float, end: float, hits_per: int, misses_per: int, every: float = 0.1
) -> list[dict]:
    out, h, m, t = [], 0, 0, start
    while t <= end + 1e-9:
        out.append(nem("info", SAMPLE, t, {"partition": 0, "pid": pid, "hits": h, "misses": m}))
        h, m, t = h + hits_per, m + misses_per, t + every
    return out


def test_hit_ratio_over_time_from_counter_samples_of_two_kernels():
    ev = [nem("invoke", "crash", CRASH)]
    ev += samples(100, CRASH - 3.0, CRASH - 0.05, 9, 1)  # old kernel: 90 %
    ev += samples(200, CRASH + 0.6, CRASH + 3.0, 1, 1)  # new kernel from 0: 50 %
    h = hit_ratio(sorted(ev, key=lambda e: e["time"]))
    assert h["before"] == pytest.approx(0.9) and h["after"] == pytest.approx(0.5)
    full = {round(b["t"], 1): b["ratio"] for b in h["bins"] if b["full"]}
    assert full[-2.0] == pytest.approx(0.9) and full[1.0] == pytest.approx(0.5)
    # nothing sampled during the outage: those bins are not full and have no ratio
    outage = [b for b in h["bins"] if 0 <= b["t"] < 0.5]
    assert outage and all(not b["full"] and b["ratio"] is None for b in outage)
    # with the scheme's end of outage recorded, the new kernel counts from 0 there: its
    # cold start (all misses before its first sample) is not lost
    cold = [nem("info", "recovered", CRASH + 0.5)] + [
        nem("info", SAMPLE, CRASH + 0.6, {"partition": 1, "pid": 300, "hits": 0, "misses": 40}),
        nem("info", SAMPLE, CRASH + 1.1, {"partition": 1, "pid": 300, "hits": 40, "misses": 40}),
    ]
    h = hit_ratio(sorted([nem("invoke", "crash", CRASH)] + cold, key=lambda e: e["time"]))
    assert h["after"] == pytest.approx(0.5)
    assert [(b["t"], b["full"], b["ratio"]) for b in h["bins"]] == [
        (0.5, True, 0.0),
        (1.0, False, None),
    ]


def test_the_page_cache_counts_a_lookup_as_a_hit_or_a_miss(tmp_path):
    """Readahead brings the rest of the file in on the first miss; metadata reads are not
    lookups of file pages and count as neither."""
    st = Stack(tmp_path)
    a = st.vfs.create(1, b"f", 0o100644, 0, 0)
    st.vfs.write(a.ino, 0, b"x" * 8 * param.PAGE_SIZE)
    st = st.remount()
    try:
        assert st.vfs.pc.stats["hits"] == 0 and st.vfs.pc.stats["misses"] == 0
        ino = st.path_ino("f")
        st.vfs.read(ino, 0, 8 * param.PAGE_SIZE)
        assert (st.vfs.pc.stats["hits"], st.vfs.pc.stats["misses"]) == (7, 1)
        st.vfs.read(ino, 0, 8 * param.PAGE_SIZE)
        assert (st.vfs.pc.stats["hits"], st.vfs.pc.stats["misses"]) == (15, 1)
    finally:
        st.close()


class _Host:
    def __init__(self):
        self.asked, self.dead = [], False

    def control(self, part, req, timeout):
        self.asked.append(part)
        if self.dead:
            raise ConnectionRefusedError("dead")
        return {"ok": True, "pid": 7, "cache": {"hits": len(self.asked), "misses": 1}}


class _Scheme:
    active = 1


def test_the_sampler_records_the_active_kernel_and_skips_one_that_does_not_answer(tmp_path):
    host = _Host()
    s = CounterSampler(host, _Scheme(), tmp_path / "k.jsonl")
    first = s.sample()
    assert first["process"] == NEMESIS and first["f"] == SAMPLE
    assert first["value"] == {"partition": 1, "pid": 7, "hits": 1, "misses": 1}
    host.dead = True
    assert s.sample() is None
    s.stop()
    from harness.history import read

    assert [e["value"]["hits"] for e in read(tmp_path / "k.jsonl")] == [1]


def _s(label: str, lost: float | None, down: float | None) -> dict:
    def ci(m):
        return {"median": m, "lo": None, "hi": None, "n": 3}

    return {"label": label, "lost_service": ci(lost), "downtime": ci(down)}


def test_the_ranking_is_by_work_lost_then_downtime_and_ties_only_when_both_are_equal():
    lines = report.ranking(
        [
            _s("a", 0.5, 0.3),
            _s("b", 0.2, 0.9),
            _s("c", 0.5, 0.1),
            _s("d", None, 0.2),
            _s("e", 0.5, 0.1),
        ]
    )
    assert lines[0].startswith("Work lost (seconds of service)")
    assert "1. b 0.200 s, 2. c 0.500 s, 2. e 0.500 s, 4. a 0.500 s, d (no median)" in lines[0]
    assert "1. c 0.100 s, 1. e 0.100 s, 3. d 0.200 s, 4. a 0.300 s, 5. b 0.900 s" in lines[1]


def test_a_lower_bound_of_work_lost_is_marked_and_proves_no_order_for_the_better_scheme():
    def s(label, lost, lo, hi, censored):
        ci = {"median": lost, "lo": lo, "hi": hi, "n": 6, "censored": censored}
        return {"label": label, "lost_service": ci, "downtime": dict(ci, censored=0)}

    # the worse scheme's lower bounds still separate it: its true values are larger
    line = report.ranking([s("a", 0.4, 0.3, 0.5, 0), s("b", 3.0, 2.0, 6.0, 1)])[0]
    assert "2. b ≥ 3.000 s" in line and "Separated by disjoint 95 % CIs: a < b." in line
    # the better scheme's lower bound may hide a larger loss: no order is claimed
    line = report.ranking([s("a", 0.4, 0.3, 0.5, 1), s("b", 3.0, 2.0, 6.0, 0)])[0]
    assert "1. a ≥ 0.400 s" in line and "No neighbours are separated" in line
    assert report.fmt_ci(s("a", 0.4, 0.3, 0.5, 1)["lost_service"]) == "≥ 0.400 [0.300, 0.500]"
