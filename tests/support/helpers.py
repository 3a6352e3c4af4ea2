"""Helpers the tests share: small clean corpora, params files, stage scripts run in this
process and their MLflow runs, and waiting on a server's health URL."""

from __future__ import annotations

import contextlib
import random
import runpy
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmops.data import layout
from lmops.tracking import stage
from tests.support import workspace

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
listening_port = workspace.listening_port
mlflow_server_cmd = workspace.mlflow_server_cmd

LANGS = ["en", "fr"]
EN = {
    "det": ["the", "a", "every", "no", "this"],
    "adj": ["green", "old", "quiet", "busy", "small", "bright", "tired", "clever"],
    "noun": ["cat", "river", "teacher", "garden", "city", "bread", "window", "horse", "song"],
    "verb": ["sees", "follows", "paints", "finds", "keeps", "loves", "crosses", "hears"],
    "prep": ["near", "under", "behind", "beside", "after"],
}
FR = {
    "det": ["le", "un", "chaque", "ce", "notre"],
    "adj": ["vert", "vieux", "calme", "pressé", "petit", "élégant", "fatigué", "malin"],
    "noun": ["chat", "fleuve", "maître", "jardin", "château", "pain", "garçon", "cheval", "été"],
    "verb": ["voit", "suit", "peint", "trouve", "garde", "aime", "traverse", "entend"],
    "prep": ["près de", "sous", "derrière", "à côté de", "après"],
}


def sentences(words: dict[str, list[str]], n: int, seed: int) -> list[str]:
    """Seeded made-up sentences ("The old cat sees a river near 7 gardens.")."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = {k: rng.choice(v) for k, v in words.items()}
        text = (
            f"{w['det']} {w['adj']} {w['noun']} {w['verb']} {rng.choice(words['det'])} "
            f"{rng.choice(words['noun'])} {w['prep']} {i % 97} {rng.choice(words['noun'])}."
        )
        out.append(text[0].upper() + text[1:])
    return out


def make_clean(root: Path, n: int = 300, fmt: str = "parquet") -> Path:
    """A small clean-stage output dir: mono and parallel splits in both languages. As the
    clean stage writes them, each mono split is monolingual text (source ``toy_text``)
    followed by both sides of the split's pairs (source ``toy``, the pairs' source)."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n, "valid": max(n // 10, 5), "test": max(n // 10, 5)}
    for k, (split, size) in enumerate(sizes.items()):
        en, fr = sentences(EN, size, 10 + k), sentences(FR, size, 20 + k)
        pairs = pd.DataFrame({"src": en, "tgt": fr, "group": "g", "source": "toy"})
        layout.write_split(pairs, root, f"parallel_{split}", fmt)
        mono = sentences(EN, size, 30 + k) + sentences(FR, size, 40 + k) + en + fr
        langs = ["en", "fr", "en", "fr"]
        sources = ["toy_text", "toy_text", "toy", "toy"]
        df = pd.DataFrame(
            {"text": mono, "lang": np.repeat(langs, size), "source": np.repeat(sources, size)}
        )
        layout.write_split(df, root, f"mono_{split}", fmt)
    return root


def write_params(path: Path, **sections: dict) -> Path:
    params = {
        "seed": 7,
        "clean": {
            "sources": [
                {
                    "name": "toy",
                    "type": "text",
                    "role": "monolingual",
                    "lang": "en",
                    "path": "x.txt",
                }
            ]
        },
    }
    params.update(sections)
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(script: str, argv: list[str]) -> None:
    """Run a stage script's main in this process, exactly as ``python stages/X.py`` does."""
    g = runpy.run_path(str(REPO / "stages" / f"{script}.py"))
    stage.run(script, g["main"], g["build_parser"](), argv)


def stage_runs(name: str):
    exp = mlflow.get_experiment_by_name("lmops-test")
    return MlflowClient().search_runs(
        [exp.experiment_id], filter_string=f"tags.`lmops.stage` = '{name}'"
    )


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until ``url`` answers 200; fails with the log if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the process exited ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url}: no answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
