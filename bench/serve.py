"""Serving under load: the translator behind ``mlflow models serve``, driven by clients.

Run with: make bench   (or: python bench/serve.py [--seconds 10] [--quick] [--root WORKSPACE]
[--onnx-max-rows N])

The served model is the pipeline's translator (``data/models/finetune`` and
``data/vocab``) when ``dvc repro evaluate`` has run here. Without one, it is a model of
``params.yaml``'s ``model`` size with random weights and a vocabulary trained on the
embedded bible (a few seconds): random weights never emit end-of-sentence, so every
sentence decodes ``max_new_tokens`` tokens, the worst case a request can cost.

It is logged with :func:`lmops.tracking.serving.log_translator` (the decode settings and
bounds of ``params.yaml``) to a throwaway MLflow store and served with
``mlflow models serve --env-manager local`` on 127.0.0.1, with 1 worker, then with one
worker per physical core (each worker gets ``cores / workers`` torch threads). For each,
1, 4 and 16 clients send requests back to back for ``--seconds``: single sentences, then
batches of 16 English sentences of the Gospel of Mark, decoded as the model was scored
(``evaluate.decode``) unless ``--beam-size`` says otherwise. It reports requests/s,
sentences/s and p50/p95/p99 latency per case, and exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from common import machine, write_results

from lmops.config import VocabConfig, load_params
from lmops.core.model import Transformer
from lmops.core.translation import save_model
from lmops.data import sources
from lmops.errors import stop_on_signals
from lmops.pipeline.vocab import train_vocab

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLIENTS = (1, 4, 16)
BATCHES = (1, 16)
START_TIMEOUT = 180.0  # seconds for a server to load the model and answer /ping


def bible() -> tuple[list[str], list[str]]:
    """English sentences of Mark (the test book) and every English and French verse."""
    data = sources.EMBEDDED["bible_en_fr"]
    df = data.load(sources.embedded_path("bible_en_fr")).to_pandas()
    mark = [s for s in df.loc[df["book"] == "Mark", "en"] if isinstance(s, str) and s.strip()]
    return mark, [s for s in [*df["en"], *df["fr"]] if isinstance(s, str) and s.strip()]


def translator_dirs(root: Path, tmp: Path, params: Any, text: list[str]) -> tuple[Path, Path, str]:
    """The model and vocab directories to serve, and what they are."""
    model_dir, vocab_dir = root / "data/models/finetune", root / "data/vocab"
    if (model_dir / "config.json").is_file() and (vocab_dir / "meta.json").is_file():
        return model_dir, vocab_dir, f"the pipeline's translator ({model_dir})"
    vocab_dir = tmp / "vocab"
    vocab_dir.mkdir()
    cfg = VocabConfig(**{**params.vocab.model_dump(), "input_sentence_size": 200_000})
    train_vocab(text, vocab_dir, cfg, [params.clean.source_lang, params.clean.target_lang], 1)
    vocab = json.loads((vocab_dir / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = Transformer(params.model, vocab).eval()
    save_model(model, tmp / "model", {"target_lang": params.clean.target_lang})
    what = (
        f"random weights of params.yaml's model size ({params.model.n_layer} x "
        f"{params.model.n_embd}, vocab {vocab}): every sentence decodes max_new_tokens"
    )
    return tmp / "model", vocab_dir, what


def log_model(tmp: Path, model_dir: Path, vocab_dir: Path, params: Any) -> str:
    import mlflow

    from lmops.tracking import serving

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("serve-bench")
    with mlflow.start_run():
        info = serving.log_translator(
            model_dir,
            vocab_dir,
            target_lang=params.clean.target_lang,
            decode=params.evaluate.decode,
            limits=params.serve,
        )
    return str(info.model_uri)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``mlflow models serve`` of ``model_uri`` with ``workers`` workers, on 127.0.0.1."""

    def __init__(self, model_uri: str, tmp: Path, workers: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{workers}.log"
        cmd = [
            str(BIN / "mlflow"),
            *("models", "serve", "-m", model_uri, "--env-manager", "local"),
            *("-h", "127.0.0.1", "-p", str(self.port), "-w", str(workers)),
        ]
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "OMP_NUM_THREADS": str(threads),
            # mlflow runs `uvicorn` from PATH: this environment's
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: see {self.log}\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(
                        f"no answer within {START_TIMEOUT:.0f} s: see {self.log}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def request(url: str, batch: list[str], params: dict[str, Any]) -> tuple[int, float]:
    body = {"dataframe_split": {"columns": ["source"], "data": [[s] for s in batch]}}
    data = json.dumps({**body, **({"params": params} if params else {})}).encode()
    req = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        status = 0
    return status, time.perf_counter() - start


def load(
    url: str, clients: int, batch: int, seconds: float, text: list[str], params: dict[str, Any]
) -> dict[str, Any]:
    """``clients`` threads sending ``batch``-sentence requests back to back for ``seconds``;
    a request started before the end is waited for."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(n: int) -> None:
        i = n * 997  # each client its own sentences
        while time.monotonic() < end:
            sents = [text[(i + j) % len(text)] for j in range(batch)]
            i += batch
            got = request(url, sents, params)
            with lock:
                results.append(got)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [lat for status, lat in results if status == 200]
    failed = sorted({status for status, _ in results if status != 200})
    p50, p95, p99 = (
        (round(float(v)) for v in np.percentile(ok, [50, 95, 99]) * 1000) if ok else (None,) * 3
    )
    return {
        "clients": clients,
        "batch": batch,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "failed_statuses": failed,
        "requests_per_s": round(len(ok) / wall, 2),
        "sentences_per_s": round(len(ok) * batch / wall, 1),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="load per case")
    ap.add_argument("--beam-size", type=int, help="default: evaluate.decode.beam_size")
    ap.add_argument("--quick", action="store_true", help="1 worker, 3 s per case")
    ap.add_argument("--root", type=Path, default=ROOT, help="a workspace after dvc repro")
    ap.add_argument(
        "--onnx-max-rows",
        type=int,
        help="default: serve.onnx_max_rows; 0 decodes on torch alone (results/serve_torch.md)",
    )
    args = ap.parse_args()
    stop_on_signals()  # a kill stops the servers too (the finally blocks run)
    params = load_params(args.root / "params.yaml")
    if args.onnx_max_rows is not None:
        serve = params.serve.model_copy(update={"onnx_max_rows": args.onnx_max_rows})
        params = params.model_copy(update={"serve": serve})
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(cores)
    info = machine(torch.device("cpu"))  # before the load: its load average is the machine's
    seconds = 3.0 if args.quick else args.seconds
    decode = {"beam_size": args.beam_size} if args.beam_size else {}
    mark, text = bible()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmops-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir, vocab_dir, what = translator_dirs(args.root, tmp, params, text)
        model_uri = log_model(tmp, model_dir, vocab_dir, params)
        for workers in (1,) if args.quick or cores == 1 else (1, cores):
            threads = max(1, cores // workers)
            print(f"serving with {workers} worker(s) of {threads} thread(s)", flush=True)
            server = Server(model_uri, tmp, workers, threads)
            try:
                request(server.url, mark[:16], decode)  # warm-up
                for batch in BATCHES:
                    for clients in CLIENTS:
                        row = {"workers": workers, "threads": threads}
                        row.update(load(server.url, clients, batch, seconds, mark, decode))
                        print(row, flush=True)
                        rows.append(row)
            finally:
                server.stop()
    beam = args.beam_size or params.evaluate.decode.beam_size
    failed = sum(r["failed"] for r in rows)
    onnx_rows = params.serve.onnx_max_rows
    write_results(
        "serve" if onnx_rows else "serve_torch",
        "Serving the translator under load (mlflow models serve)"
        + ("" if onnx_rows else ", on torch alone"),
        info,
        {"Concurrent clients, requests back to back": rows},
        extra={
            "model": what,
            "beam_size": beam,
            "seconds_per_case": seconds,
            "onnx_max_rows": onnx_rows,
        },
        notes=[
            f"Model: {what}.",
            f"Decoding: beam_size {beam}, max_new_tokens "
            f"{params.evaluate.decode.max_new_tokens}; English sentences of Mark; "
            + (
                f"calls of up to {onnx_rows} rows (sentences x beams) on the model's fp32 "
                "ONNX export (onnxruntime), larger ones on torch (serve.onnx_max_rows)."
                if onnx_rows
                else "every call on torch (serve.onnx_max_rows 0)."
            ),
            f"Each case: the clients send requests back to back for {seconds:g} s; "
            "latency is a request's round trip, sentences/s counts answered sentences.",
            f"Failed requests: {failed}.",
        ],
    )
    if failed:
        sys.exit(f"{failed} request(s) failed")


if __name__ == "__main__":
    main()
