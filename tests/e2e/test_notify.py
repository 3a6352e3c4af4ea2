"""Failure you hear about: `flows/notify.py` creates a Prefect automation on a real server,
and a failing pipeline flow run makes it POST to a webhook, here one on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
API_TIMEOUT = 60  # a Prefect server answers within this even on a loaded 2-core machine

sys.path.insert(0, str(REPO / "flows"))
try:
    import notify
finally:
    sys.path.remove(str(REPO / "flows"))


@pytest.fixture
def webhook() -> Iterator[tuple[str, queue.Queue]]:
    """An HTTP endpoint on 127.0.0.1 that keeps every JSON body POSTed to it."""
    received: queue.Queue = queue.Queue()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the handler's API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.put((self.path, json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/lmops", received
    finally:
        server.shutdown()
        server.server_close()


def _python(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_failed_pipeline_run_is_notified_through_the_automation(
    prefect_server, webhook, tmp_path
):
    url, received = webhook
    env = prefect_server
    out = _python(env, REPO, "flows/notify.py", "--webhook", url)
    assert out.returncode == 0, out.stderr
    assert f"automation {notify.AUTOMATION!r}" in out.stdout
    # again, naming the saved block as a user names any block (e-mail, Slack ...): the
    # automation is replaced, not doubled
    block = f"custom-webhook/{notify.WEBHOOK_BLOCK}"
    again = _python(env, REPO, "flows/notify.py", "--block", block)
    assert again.returncode == 0, again.stderr
    api = env["PREFECT_API_URL"]
    automations = _post(f"{api}/automations/filter", {})
    assert [a["name"] for a in automations] == [notify.AUTOMATION]

    # a pipeline flow run that fails at once: a target dvc.yaml does not have
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    failed = _python(env, tmp_path, str(REPO / "flows/pipeline.py"), "--target", "no-such-stage")
    assert failed.returncode != 0
    runs = _post(f"{api}/flow_runs/filter", {})
    assert [r["state"]["type"] for r in runs] == ["FAILED"]
    run = runs[0]

    path, body = received.get(timeout=120)  # the automation fired and the block sent
    assert path == "/lmops"
    assert body["subject"] == f"lmops: lmops-pipeline run {run['name']} is Failed"
    assert body["text"].startswith(f"Flow run {run['name']} of lmops-pipeline ended Failed: ")
    assert "unknown stage 'no-such-stage'" in body["text"]  # the state's message
    assert body["text"].endswith(f"\nflow run id: {run['id']}")  # no UI here, so no link
    assert received.empty()

    removed = _python(env, REPO, "flows/notify.py", "--remove")
    assert removed.returncode == 0 and _post(f"{api}/automations/filter", {}) == []


def _post(url: str, body: dict) -> list[dict]:
    import urllib.request

    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=API_TIMEOUT) as r:
        return json.load(r)
