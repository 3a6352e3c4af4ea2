"""Every MLflow tag lmops writes, by name: the one place to look them up or rename them.

Search the MLflow UI with them, e.g. ``tags.`lmops.kind` = 'pipeline'``.
"""

from __future__ import annotations

KIND = "lmops.kind"  # what a run is: one of the KIND_* values
KIND_PIPELINE = "pipeline"  # the parent run of one pipeline run
KIND_STAGE = "stage"  # one stage's run, nested under its pipeline run
KIND_RETRAIN = "retrain"  # a scheduled retraining that found nothing new
STAGE = "lmops.stage"  # a stage run's stage name
STAGE_STATUS = "lmops.stage_status."  # + stage: ran / skipped / restored, on the pipeline run
# on a pipeline run, comma-separated in pipeline order: the stages DVC reran in it, and those
# it did not rerun whose metrics files it copied (lmops.tracking.runs.inherit_metrics)
STAGES_RERAN = "lmops.stages_reran"
STAGES_INHERITED = "lmops.stages_inherited"
ERROR = "lmops.error"  # why a run failed, on the failed run
PIPELINE_KEY = "lmops.pipeline_key"  # ties the stage runs of one `dvc repro` together
HARDWARE = "lmops.hardware."  # + a key of lmops.core.hardware.facts: what ran where
# (on a pipeline run: + <stage>.<key>, for each stage it inherited, from its metrics file)
TARGET = "lmops.target"  # the stage a flow run was asked to reach
SOURCE_DIGEST = "lmops.source_digest"  # the raw data a pipeline run was trained on
RETRAIN_ACTION = "lmops.retrain.action"
RETRAIN_REASON = "lmops.retrain.reason"
RETRAIN_DONE = "lmops.retrain.done"  # on a pipeline run whose retraining reached a decision
TRANSLATOR = "lmops.translator"  # logged model metadata: the decode settings it serves with
# where a run's process runs: the next pipeline start, `lmops tracking sync` and
# `lmops runs reconcile` end a RUNNING run whose process is gone (lmops.tracking.runs)
HOST = "lmops.host"
PID = "lmops.pid"
PID_START = "lmops.pid_start"  # the process's start time (s since the epoch): pids are reused
PID_STAMP = "lmops.pid_stamp"  # its start as the OS counts it, which the clock cannot move
