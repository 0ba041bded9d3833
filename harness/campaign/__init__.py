"""Fault campaigns: many injected faults per scheme, each ending in one outcome class.

Promises to `crashbench campaign` and to whoever reads a campaign directory: the plan
(plan.py) is schemes × fault cells (kind with its target or site) × repetitions, each fault
with its own id and seed, the same for the same parameters; each fault is one driver trial
(harness/driver.py ``run_one``) in a process of its own (task.py) and ends in one outcome
class (outcome.py); its result is appended atomically as it completes (store.py), so a
stopped campaign continues where it stopped and counts every fault once; faults run here
or as tasks on Dask distributed (executor.py); coverage comes with Wilson 95 % intervals
(summary.py, harness/stats.py) into campaign.json and a report (report.py);
``compare`` (compare.py) judges two campaigns. docs/RESULTS.md, "Campaigns", is the
reference.
"""

# Faults a machine takes before it is redeployed when the command does not say
# (--redeploy-every): a deploy costs as much as several faults, and a machine that did not
# come back intact or with loss is redeployed anyway (session.py).
FAST_FAULTS = 50
