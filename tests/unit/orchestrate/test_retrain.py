"""Scheduled retraining: the source-data digest, the decision rule, and three real runs
of flows/retrain.py on the tiny pipeline (promote, skip, keep the champion)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmops.config import RetrainConfig, load_params, parse_params
from lmops.errors import DataError
from lmops.orchestrate import retrain as rt
from tests.conftest import REPO

CFG = RetrainConfig(min_bleu_gain=0.5, max_ppl_increase=0.05)
PASSED = (True, "data validation passed")
CHAMP = {"bleu": 20.0, "chrf": 50.0, "bpb_en": 2.0, "bpb_fr": 2.0}


def test_decide():
    assert rt.decide(CHAMP, None, PASSED, CFG) == (True, "no champion yet")
    assert rt.decide(CHAMP, None, (False, "data validation failed (2 of 73"), CFG) == (
        False,
        "data validation failed (2 of 73",
    )
    better = {**CHAMP, "bleu": 21.0, "bpb_fr": 2.05}  # 2**0.05 - 1 = 3.5% higher perplexity
    assert rt.decide(better, CHAMP, PASSED, CFG) == (True, "BLEU +1.00, perplexity within 5.0%")
    assert rt.decide({**CHAMP, "bleu": 20.4}, CHAMP, PASSED, CFG) == (
        False,
        "BLEU +0.40 (needs +0.50 or more)",
    )
    assert rt.decide({**better, "bpb_en": 2.1}, CHAMP, PASSED, CFG) == (
        False,
        "perplexity (en) +7.2% over the champion's (tolerance 5.0%)",
    )
    # the data check comes first, whatever the scores
    assert not rt.decide({**CHAMP, "bleu": 90.0}, CHAMP, (False, "failed"), CFG)[0]


def _text_source_params(tmp_path: Path) -> dict:
    (tmp_path / "en.txt").write_text("The cat sleeps.\nA dog barks.\n", encoding="utf-8")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["clean"]["sources"].append(
        {
            "name": "mine",
            "type": "text",
            "role": "monolingual",
            "lang": "en",
            "path": str(tmp_path / "en.txt"),
        }
    )
    return raw


def test_the_source_digest_follows_the_bytes_of_every_source(tmp_path):
    raw = _text_source_params(tmp_path)
    first = rt.source_digest(parse_params(raw).clean)
    assert first == rt.source_digest(parse_params(raw).clean)  # stable
    (tmp_path / "en.txt").write_text("The cat sleeps.\nA dog barked.\n", encoding="utf-8")
    edited = rt.source_digest(parse_params(raw).clean)
    assert edited != first
    raw["clean"]["sources"][0]["max_rows"] = 10  # the settings count too
    assert rt.source_digest(parse_params(raw).clean) not in (first, edited)
    (tmp_path / "en.txt").unlink()
    with pytest.raises(DataError, match=r"en.txt: not found \(clean.sources\[mine\]\)"):
        rt.source_digest(parse_params(raw).clean)


def test_validation_is_read_from_the_validate_summary(tmp_path):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert rt.validation_passed(tmp_path, spec) == (
        False,
        "data/metrics/validate.json: no data validation summary",
    )
    summary = tmp_path / "data/metrics/validate.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"success": False, "failed": 2, "evaluated": 73}))
    assert rt.validation_passed(tmp_path, spec) == (
        False,
        "data validation failed (2 of 73 expectations, see data/metrics/validate.json)",
    )
    summary.write_text(json.dumps({"success": True, "failed": 0, "evaluated": 73}))
    assert rt.validation_passed(tmp_path, spec) == PASSED


# ------------------------------------------------ the flow on the tiny pipeline


def _retrain(root: Path, env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "flows/retrain.py", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_retraining_promotes_then_skips_then_keeps_the_champion(
    flow_repo,  # noqa: F811
    prefect_server,
):  # noqa: F811
    """Against a real Prefect server on 127.0.0.1 (the flow runs in this process)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{flow_repo}/mlruns/mlflow.db")
    name = load_params(flow_repo / "params.yaml").retrain.model_name

    def parents():
        exp = client.get_experiment_by_name("lmops")
        return client.search_runs(
            [exp.experiment_id],
            "tags.`lmops.kind` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
        )

    # 1. no champion yet: the first model is promoted
    _retrain(flow_repo, prefect_server)
    (first,) = parents()
    tags = first.data.tags
    assert tags[rt.ACTION_TAG] == "promoted" and tags[rt.REASON_TAG] == "no champion yet"
    assert tags["dvc.exp_name"].startswith("retrain-") and len(tags[rt.DIGEST_TAG]) == 64
    assert client.get_registered_model(name).aliases == {"champion": 1}
    evaluated = json.loads((flow_repo / "data/metrics/evaluate.json").read_text())
    assert first.data.metrics["retrain/challenger_bpb_en"] == pytest.approx(evaluated["bpb_en"])

    # 2. the same source data: a skipped run, nothing rebuilt or registered
    out = _retrain(flow_repo, prefect_server)
    assert "skipped: source data unchanged" in out and "Running stage" not in out, out[-3000:]
    exp = client.get_experiment_by_name("lmops")
    (skipped,) = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'retrain'")
    assert skipped.info.status == "FINISHED"
    assert skipped.data.tags[rt.ACTION_TAG] == "skipped"
    assert skipped.data.tags[rt.REASON_TAG] == (
        f"source data unchanged since run {first.info.run_id} (digest {tags[rt.DIGEST_TAG][:12]})"
    )
    assert len(parents()) == 1

    # 3. a deliberately worse configuration (a few training steps): the champion stays
    fewer_steps = [
        f"-S{stage}.{key}={n}"
        for stage in ("pretrain", "finetune")
        for key, n in (("max_steps", 3), ("warmup_steps", 1))
    ]
    _retrain(flow_repo, prefect_server, *fewer_steps)
    worse = parents()[0]
    assert worse.info.run_id != first.info.run_id
    wtags = worse.data.tags
    assert wtags[rt.ACTION_TAG] == "kept champion"
    assert wtags[rt.REASON_TAG].startswith("perplexity (")
    assert "over the champion's (tolerance 5.0%)" in wtags[rt.REASON_TAG]
    m = worse.data.metrics
    # the champion, scored again on the same test set, scores what it scored when it won
    assert m["retrain/champion_bpb_en"] == pytest.approx(evaluated["bpb_en"], rel=1e-6)
    assert m["retrain/champion_bleu"] == pytest.approx(evaluated["bleu"], abs=1e-9)
    assert m["retrain/challenger_bpb_en"] > m["retrain/champion_bpb_en"] + 0.1
    assert client.get_registered_model(name).aliases == {"champion": 1, "challenger": 2}
