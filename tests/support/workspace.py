"""Throwaway copies of this project: a git + DVC workspace on a params profile, and the
servers and processes that run in it.

Used by the crash loop (``make chaos``), the benchmarks and the tests, so each of them
runs the real ``dvc`` CLI, ``prefect`` server and stage scripts on a small profile without
touching the checkout it came from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from lmops.config import load_profile

# what a workspace needs: the pipeline, its code and the deployments
FILES = ("dvc.yaml", "prefect.yaml", "pyproject.toml")
FOLDERS = ("stages", "src", "flows")
BIN = Path(sys.executable).parent


def checkout() -> Path:
    """The project checkout this package was installed from (holds dvc.yaml)."""
    return Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without MLflow, DVC, Prefect or lmops settings (a workspace uses its
    own stores unless ``extra`` names one), with this interpreter's tools first on PATH and
    no analytics."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_", "LMOPS_", "PREFECT_"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GX_ANALYTICS_ENABLED"] = "false"
    env["DVC_NO_ANALYTICS"] = "1"  # no background daemon trying to reach the network
    env.update(extra)
    return env


def make(
    dest: str | Path,
    profile: str | Path | None = "params.tiny.yaml",
    source: str | Path | None = None,
) -> Path:
    """A fresh git + DVC repo in ``dest`` with the project's pipeline, code and flows, and
    ``profile`` merged over ``params.yaml`` as its params (``None``: the defaults)."""
    source = Path(source) if source else checkout()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(source / name, dest)
    for folder in FOLDERS:
        shutil.copytree(
            source / folder,
            dest / folder,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    base = source / "params.yaml"
    params = load_profile(source / profile, base) if profile else yaml.safe_load(base.read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("mlruns/\n")
    env = clean_env()
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=lmops",
            "-c",
            "user.email=lmops@localhost",
            "commit",
            "-qm",
            "workspace",
        ],
    ):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process group started with ``start_new_session=True``: ``sig``, then SIGKILL
    if it lingers, then SIGKILL to whatever of the group outlived its leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def mlflow_server_cmd(folder: str | Path, port: int = 0) -> list[str]:
    """``mlflow server`` on 127.0.0.1 (``port`` 0: one the kernel picks, see
    :func:`listening_port`) with a sqlite backend and proxied artifacts, both in
    ``folder``, one worker: the tests' and scripts' tracking server."""
    folder = Path(folder)
    return [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--workers",
        "1",
    ]


def listening_port(
    proc: subprocess.Popen, timeout: float = 120, log: str | Path | None = None
) -> int:
    """The TCP port a server started with ``--port 0`` listens on at 127.0.0.1: the kernel
    picked it when the server bound, so no other process can take it in between (a port
    picked here, released and passed on could be). Looked for on ``proc`` and its children
    (``mlflow server`` serves from a child uvicorn process); fails early, with the end of
    ``log`` if given, if ``proc`` exits first."""
    import psutil

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(proc.pid)
            for p in (parent, *parent.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    for conn in p.net_connections(kind="tcp"):
                        if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                            return conn.laddr.port
        time.sleep(0.1)
    why = (
        f"exited with code {proc.returncode} before it listened"
        if proc.returncode is not None
        else f"not listening within {timeout:.0f} s"
    )
    tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
    raise RuntimeError(f"{' '.join(map(str, proc.args))}: {why}\n{tail}".rstrip())


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``url`` answers, failing early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: no answer within {timeout:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def prefect_server(
    home: str | Path, log: str | Path | None = None, ui: bool = False
) -> Iterator[dict[str, str]]:
    """``prefect server start`` on 127.0.0.1, a port of its own choosing, its own home and
    database; with ``ui``, its web UI too, at the server's URL (the screenshots script).

    Yields the environment that points the CLI, workers and flows at it."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    # the server reads no PREFECT_API_URL: that is for its clients, once its port is known
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="true" if ui else "false",
    )
    server_env = dict(env)
    if ui:
        server_env.update(
            # the port is not known yet: the UI calls the API where the page came from
            PREFECT_UI_API_URL="/api",
            # the UI's files are copied and rewritten here, not into the installed package
            PREFECT_UI_STATIC_DIRECTORY=str(home / "ui"),
            PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        )
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", "0"],
        env=server_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{listening_port(proc, log=log)}/api"
        wait_http(f"{env['PREFECT_API_URL']}/health", proc)
        yield env
    finally:
        stop(proc)
        if log:
            out.close()


def processes_in(root: str | Path) -> list[str]:
    """Processes running inside ``root`` (their working directory is it or under it): a
    stopped pipeline must leave none. One line each: pid and command."""
    import psutil

    root = Path(root).resolve()
    found = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        cwd = proc.info["cwd"]
        if not cwd or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if Path(cwd) == root or root in Path(cwd).parents:
            found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])}")
    return found


def wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None):
    """Poll ``check()`` until it returns something truthy (returned), failing with ``what``
    after ``timeout`` s, or at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}) first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def newest_checkpoint(root: Path, stage: str) -> int:
    """The step of the newest ``step-*`` checkpoint of a training stage (0: none yet)."""
    steps = [
        int(p.name.split("-")[1])
        for p in (root / "data/train" / stage).glob("*/step-*")
        if p.name.split("-")[1].isdigit()
    ]
    return max(steps, default=0)


def stage_process(root: str | Path, stage: str):
    """The running ``stages/<stage>.py`` process of the workspace ``root``, if any."""
    import psutil

    root = str(Path(root).resolve())
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if proc.info["cwd"] == root and f"stages/{stage}.py" in (proc.info["cmdline"] or []):
            return proc
    return None
