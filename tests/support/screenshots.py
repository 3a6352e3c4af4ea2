"""Screenshots of the MLflow and Prefect UIs as a person sees them, for the docs.

    make screenshots                                   # docs/img/*.png
    python -m tests.support.screenshots --out docs/img
    python -m tests.support.screenshots --out /tmp/shots --keep /tmp/shots/work

It builds a throwaway git + DVC workspace on the tiny profile, starts an ``mlflow server``
(sqlite backend, artifacts proxied to a local folder) and a Prefect server with its UI,
both on 127.0.0.1 at ports of their own choosing, and runs the pipeline flow twice against
them: once plain (``python flows/pipeline.py``), once one param apart as a DVC experiment
(``-S evaluate.decode.beam_size=1 --experiment beam1``). Then it drives headless Chromium
over the DevTools protocol, waits on each page until its content has drawn (no spinner
left), and saves, 1400 pixels wide:

- ``mlflow-compare-runs.png``: MLflow's compare view of the two pipeline runs, with
  "Show diff only": the params that differ, then the metrics that do;
- ``mlflow-pretrain-curves.png``: the ``pretrain`` stage run's Model metrics tab,
  filtered to ``loss``: its training and validation loss curves;
- ``mlflow-loss-curves-artifact.png``: the ``finetune`` stage run's
  ``finetune_loss_curves.png`` artifact as MLflow shows it;
- ``prefect-flow-run.png``: the plain flow run's page in Prefect: its task runs and its
  Artifacts tab (the MLflow link, the progress bar, the metrics as markdown and as a
  table);
- ``prefect-pipeline-metrics.png``: that flow run's ``lmops-pipeline-metrics`` artifact.

Needs Chromium from the system packages (Debian: ``apt-get install -y chromium``; or
``--chromium PATH``) and no network: the servers and the browser stay on the loopback
interface. Shrinks the files with ``pngquant`` where it is installed. ``--keep DIR`` keeps
the workspace, the servers' stores and logs and the flow runs' output. About ten minutes on
two busy cores, most of it the two pipeline runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support import workspace

WIDTH, HEIGHT = 1400, 900
EXPERIMENT = ["-S", "evaluate.decode.beam_size=1", "--experiment", "beam1"]
ARTIFACTS = (  # what flows/pipeline.py creates
    "lmops-mlflow-run",
    "lmops-pipeline-progress",
    "lmops-pipeline-metrics",
    "lmops-pipeline-metrics-table",
)
# What a first visit to the MLflow UI (3.x) would otherwise show over the page: its
# assistant panel, opened once on a first load, the GenAI sidebar and a "Detect issues"
# tip. Local storage keys as the UI writes them (``<key>_v<version>``, JSON values).
MLFLOW_SEEN = {
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.detectIssues.guidanceShown_v1": True,
    "mlflow.settings.telemetry.enabled_v1": False,
    "mlflow.telemetry.info.alert.dismissed_v1": True,
}


STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - STARTED:4.0f} s] {msg}", flush=True)


# ------------------------------------------------------------------------------ servers


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1, a port of its own choosing, a sqlite backend and its
    artifacts under ``folder``; yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    out = open(folder / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        workspace.mlflow_server_cmd(folder),
        env=workspace.clean_env(MLFLOW_DISABLE_TELEMETRY="true"),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{workspace.listening_port(proc, 180, folder / 'server.log')}"
        workspace.wait_http(f"{url}/health", proc)
        yield url
    finally:
        workspace.stop(proc)
        out.close()


def run_flow(root: Path, env: dict[str, str], log_file: Path, *args: str) -> None:
    """``python flows/pipeline.py --repo ROOT ARGS`` in ``root``; fails with its log's end."""
    with open(log_file, "w") as out:
        proc = subprocess.run(
            [sys.executable, "flows/pipeline.py", "--repo", str(root), *args],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode:
        tail = log_file.read_text(errors="replace")[-4000:]
        raise SystemExit(f"flows/pipeline.py {' '.join(args)} failed ({proc.returncode}):\n{tail}")


# ------------------------------------------------------------------------------ browser


def find_chromium(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        if found := shutil.which(name):
            return found
    raise SystemExit(
        f"no {given or 'chromium'} on PATH: install it (Debian: apt-get install -y chromium) "
        "or pass --chromium PATH"
    )


class Browser:
    """Headless Chromium, one tab, driven over the DevTools protocol (a websocket)."""

    def __init__(self, binary: str, profile: Path, init_script: str = "") -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a stale one, of an earlier browser
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--hide-scrollbars",
                "--no-first-run",
                "--force-device-scale-factor=1",
                "--lang=en-US",
                f"--window-size={WIDTH},{HEIGHT}",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        workspace.wait_for(
            lambda: port_file.exists() and port_file.read_text().strip(),
            "Chromium's DevTools port",
            60,
            self.proc,
        )
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.resize(WIDTH, HEIGHT)
        if init_script:
            self.call("Page.addScriptToEvaluateOnNewDocument", source=init_script)

    def call(self, method: str, **params: Any) -> dict:
        """Send one command and return its result (events in between are dropped)."""
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def resize(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait(self, expression: str, what: str, timeout: float = 90) -> Any:
        """Wait until the JavaScript ``expression`` is truthy on the page (one that throws,
        as while the page loads, is not); returns it."""

        def check() -> Any:
            try:
                return self.js(expression)
            except RuntimeError:
                return None

        return workspace.wait_for(check, what, timeout, self.proc)

    def screenshot(self, path: Path, settle: float = 1.5) -> None:
        time.sleep(settle)  # transitions and chart animations end
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        workspace.stop(self.proc, timeout=10)


def seed_local_storage(values: dict[str, Any]) -> str:
    """A script that sets these local storage keys, where not set, before a page loads."""
    items = json.dumps({k: json.dumps(v) for k, v in values.items()})
    return (
        f"for (const [k, v] of Object.entries({items}))"
        " { try { if (localStorage.getItem(k) === null) localStorage.setItem(k, v); }"
        " catch (e) {} }"
    )


def text_has(*needles: str) -> str:
    """A page check: its text holds every one of ``needles``."""
    return " && ".join(
        f"(document.body?.innerText ?? '').includes({json.dumps(n)})" for n in needles
    )


def type_into(selector: str, text: str) -> str:
    """JavaScript that types ``text`` into a React-controlled input."""
    return f"""(() => {{
        const el = document.querySelector({json.dumps(selector)});
        if (!el) return false;
        const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set;
        set.call(el, {json.dumps(text)});
        el.dispatchEvent(new Event("input", {{bubbles: true}}));
        return true;
    }})()"""


# ------------------------------------------------------------------------------ shots


def charts_drawn(at_least: int) -> str:
    """A page check: at least ``at_least`` charts drawn and no spinner left."""
    return (
        f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {at_least}"
        ' && !document.querySelector(\'[class*="spin"], [role="progressbar"]\')'
    )


# The compare view: its plots folded away, and only the params and metrics that differ.
COMPARE_DIFF_ONLY = """(() => {
    const header = [...document.querySelectorAll('[role=button]')]
        .find(e => e.innerText.trim() === 'Visualizations');
    const switches = [...document.querySelectorAll('button[role=switch]')].slice(0, 2);
    if (!header || switches.length < 2) return false;
    header.click();
    switches.forEach(e => e.click());
    return true;
})()"""


def prefect_artifacts(api_url: str, flow_run_id: str) -> dict[str, str]:
    """The ids of a flow run's artifacts by key, from the Prefect server's REST API."""
    request = urllib.request.Request(
        f"{api_url}/artifacts/filter",
        data=json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return {a["key"]: a["id"] for a in json.load(r)}


def shoot(
    browser: Browser, out: Path, mlflow_url: str, prefect_url: str, ids: dict[str, str]
) -> list[Path]:
    """Take the screenshots; returns their paths."""
    runs = f"{mlflow_url}/#/experiments/{ids['experiment']}/runs"
    ml = "workflowType=machine_learning"
    saved = []

    def save(name: str, settle: float = 1.5) -> None:
        browser.screenshot(out / name, settle)
        saved.append(out / name)
        log(f"saved {out / name}")

    # taller: the run names, the params that differ and the first metrics that do
    browser.resize(WIDTH, 1100)
    query = urllib.parse.urlencode(
        {
            "runs": json.dumps([ids["plain"], ids["beam1"]]),
            "experiments": json.dumps([ids["experiment"]]),
        }
    )
    browser.goto(f"{mlflow_url}/#/compare-runs?{query}")
    browser.wait(text_has("beam1", "evaluate.decode.beam_size"), "MLflow's compare view")
    browser.wait(COMPARE_DIFF_ONLY, "the compare view's 'Show diff only' switches")
    browser.wait(text_has("Show diff only") + " && !" + text_has("clean.dedup"), "the diff")
    save("mlflow-compare-runs.png")
    browser.resize(WIDTH, HEIGHT)

    browser.goto(f"{runs}/{ids['pretrain']}/model-metrics?{ml}")
    browser.wait(type_into("input[placeholder*='Search metric']", "loss"), "the chart filter")
    browser.wait(charts_drawn(2), "the pretrain run's loss charts")
    save("mlflow-pretrain-curves.png")

    browser.goto(f"{runs}/{ids['finetune']}/artifacts/finetune_loss_curves.png?{ml}")
    browser.wait(
        text_has("Path: mlflow-artifacts:")
        + " && [...document.images].some(i => i.complete && i.naturalWidth > 400)",
        "the finetune run's loss curves artifact",
    )
    save("mlflow-loss-curves-artifact.png")

    # taller: the graph of the task runs and the four artifacts' cards under it
    browser.resize(WIDTH, 1100)
    browser.goto(f"{prefect_url}/v2/runs/flow-run/{ids['flow_run']}?tab=Artifacts")
    browser.wait(
        text_has("Completed", *ARTIFACTS) + " && !!document.querySelector('canvas')",
        "the flow run's artifacts in Prefect",
    )
    save("prefect-flow-run.png", settle=3)
    browser.resize(WIDTH, HEIGHT)

    artifact = prefect_artifacts(f"{prefect_url}/api", ids["flow_run"])["lmops-pipeline-metrics"]
    browser.goto(f"{prefect_url}/v2/artifacts/artifact/{artifact}")
    browser.wait(text_has("lmops pipeline FINISHED", "quantise"), "the metrics artifact")
    save("prefect-pipeline-metrics.png")
    return saved


def run_ids(mlflow_url: str) -> dict[str, str]:
    """The MLflow ids the pages show: the two pipeline runs, the plain run's pretrain and
    finetune runs, and the plain run's Prefect flow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("lmops").experiment_id
    plain, beam1 = client.search_runs(
        [experiment], "tags.`lmops.kind` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )
    stages = {
        r.data.tags["lmops.stage"]: r.info.run_id
        for r in client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{plain.info.run_id}'"
        )
    }
    return {
        "experiment": experiment,
        "plain": plain.info.run_id,
        "beam1": beam1.info.run_id,
        "pretrain": stages["pretrain"],
        "finetune": stages["finetune"],
        "flow_run": plain.data.tags["prefect.flow_run_id"],
    }


def shrink(paths: list[Path]) -> None:
    """Quantise the PNGs with pngquant, where installed (a UI screenshot has few colours)."""
    pngquant = shutil.which("pngquant")
    for path in paths if pngquant else []:
        subprocess.run(
            [pngquant, "--force", "--skip-if-larger", "--quality=80-98", "--output", path, path],
            check=False,
        )


def screenshots(out: Path, work: Path, chromium: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    log("starting the MLflow and Prefect servers")
    with (
        mlflow_server(work / "mlflow") as mlflow_url,
        workspace.prefect_server(work / "prefect", work / "prefect.log", ui=True) as env,
    ):
        log(f"MLflow at {mlflow_url}, Prefect at {env['PREFECT_API_URL'].removesuffix('/api')}")
        root = workspace.make(work / "repo", "params.tiny.yaml")
        env = {**env, "MLFLOW_TRACKING_URI": mlflow_url}
        log("the pipeline flow, plain")
        run_flow(root, env, work / "flow-plain.log")
        log(f"the pipeline flow, {' '.join(EXPERIMENT)}")
        run_flow(root, env, work / "flow-beam1.log", *EXPERIMENT)
        ids = run_ids(mlflow_url)
        log("screenshots")
        browser = Browser(chromium, work / "chromium", seed_local_storage(MLFLOW_SEEN))
        try:
            prefect_url = env["PREFECT_API_URL"].removesuffix("/api")
            saved = shoot(browser, out, mlflow_url, prefect_url, ids)
        finally:
            browser.close()
    shrink(saved)
    return saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.screenshots", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="where the PNGs go")
    p.add_argument("--chromium", help="the Chromium (or Chrome) binary (default: on PATH)")
    p.add_argument(
        "--keep",
        type=Path,
        help="build the workspace and the servers' stores in this new folder and keep them",
    )
    args = p.parse_args(argv)
    chromium = find_chromium(args.chromium)
    with tempfile.TemporaryDirectory(prefix="lmops-screenshots-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        saved = screenshots(args.out.resolve(), work, chromium)
    for path in saved:
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB")
    print(f"{len(saved)} screenshots in {time.monotonic() - STARTED:.0f} s")


if __name__ == "__main__":
    main()
