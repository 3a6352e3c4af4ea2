"""What real tools print, recorded once, for the tests that stand in for them.

Each recording is checked against the real tool by the test named beside it, so a fake
fed with it sees what production sees.
"""

from __future__ import annotations

import re

# A second `dvc repro` while the first runs a stage in the same workspace (DVC 3.67, on
# stderr). tests/e2e/test_pipeline.py's lock test matches a real second run against it.
DVC_BUSY_TEMPLATE = (
    "ERROR: failed to reproduce '{stage}': '{path}' is busy, it is being blocked by:\n"
    "  (PID {pid}): {command}\n"
    "\n"
    "If there are no processes with such PIDs, you can manually remove '{rwlock}' and "
    "try again."
)
DVC_BUSY = DVC_BUSY_TEMPLATE.format(
    stage="clean",
    path="/srv/lmops/data/clean",
    pid=4572,
    command="/srv/lmops/.venv/bin/dvc repro --force --single-item pretrain",
    rwlock="/srv/lmops/.dvc/tmp/rwlock",
)


def fields(template: str, text: str) -> dict[str, str] | None:
    """The values of ``template``'s ``{fields}`` where ``text`` holds it, else None."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>.+?)" for i, part in enumerate(parts)
    )
    found = re.search(pattern, text)
    return found.groupdict() if found else None
