"""Scheme options set from the command line, the same way for `run` and `up`.

Promises to the commands that deploy schemes (harness/commands/run.py, lab.py):
``keep_apps_options(names, keep_apps)`` turns ``--keep-apps`` / ``--no-keep-apps`` into the
keyword options given to the schemes that declare ``keep_processes`` in
``RecoveryScheme.options`` (systems/base.py): ``{}`` when neither flag was given (each
scheme's own default), ``{"keep_processes": True|False}`` otherwise. A flag that none of
the named schemes declares raises ``OptionError`` naming the flag, never ignored.
"""

from __future__ import annotations

OPTION = "keep_processes"


class OptionError(ValueError):
    """A command-line option that no named scheme takes."""


def keep_apps_options(names: list[str], keep_apps: bool | None) -> dict:
    if keep_apps is None:
        return {}
    from systems.base import registry

    known = registry()
    if any(n not in known for n in names):
        return {OPTION: keep_apps}  # the unknown scheme is the error its caller reports
    if not any(OPTION in known[n].options for n in names):
        flag = "--keep-apps" if keep_apps else "--no-keep-apps"
        keepers = ", ".join(n for n, c in known.items() if OPTION in c.options) or "none"
        raise OptionError(f"{flag}: none of the schemes keeps processes (those that do: {keepers})")
    return {OPTION: keep_apps}
