"""Be told when a pipeline or retraining flow run fails, crashes or is cancelled.

Creates (or replaces) one Prefect automation on the server PREFECT_API_URL points at: a
flow run of ``lmops-pipeline`` or ``lmops-retrain`` entering Failed, Crashed or Cancelled
sends a notification through a Prefect notification block of your choice:

    python flows/notify.py --webhook https://hooks.example.com/T0/B0/xyz   # any JSON webhook
    python flows/notify.py --block sendgrid-email/ml-team    # a block made in the UI (e-mail,
                                                             # Slack, Teams, PagerDuty ...)
    python flows/notify.py --remove

``--webhook`` saves a custom-webhook block named ``lmops-failures`` that POSTs
``{"subject": ..., "text": ...}``. Run it again to change the target; the automation
keeps one copy. See docs/orchestration.md, "Notifications".
"""

from __future__ import annotations

import argparse
from uuid import UUID

from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

AUTOMATION = "lmops: flow run failed or cancelled"
WEBHOOK_BLOCK = "lmops-failures"
FLOWS = ["lmops-pipeline", "lmops-retrain"]
EVENTS = {f"prefect.flow-run.{state}" for state in ("Failed", "Crashed", "Cancelled")}
SUBJECT = "lmops: {{ flow.name }} run {{ flow_run.name }} is {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}\nflow run id: {{ flow_run.id }}"
    "{% if flow_run|ui_url %}\n{{ flow_run|ui_url }}{% endif %}"  # with the server's UI on
)


def webhook_block(url: str) -> UUID:
    """Save (or overwrite) the custom-webhook block that POSTs the subject and text."""
    block = CustomWebhookNotificationBlock(
        name=WEBHOOK_BLOCK,
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
    )
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def block_id(slug: str) -> UUID:
    """The document id of an existing block, given as ``<block type>/<name>``."""
    block = Block.load(slug)
    assert block._block_document_id is not None  # a loaded block has its document
    return block._block_document_id


def remove() -> int:
    """Delete the automation (every copy of that name); how many there were."""
    removed = 0
    while True:
        try:
            existing = Automation.read(name=AUTOMATION)
        except ValueError:  # Prefect's "not found"
            return removed
        existing.delete()
        removed += 1


def install(block_document_id: UUID) -> Automation:
    """The automation, created afresh: any earlier copy is removed first."""
    remove()
    trigger = EventTrigger(
        expect=EVENTS,
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOWS},
        posture=Posture.Reactive,
        threshold=1,
    )
    action = SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)
    automation = Automation(
        name=AUTOMATION,
        description="Notifies when an lmops pipeline or retraining run fails, crashes or is "
        "cancelled (flows/notify.py).",
        trigger=trigger,
        actions=[action],
    )
    return automation.create()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--webhook", metavar="URL", help="POST a JSON message to this URL")
    how.add_argument("--block", metavar="TYPE/NAME", help="send through this saved block")
    how.add_argument("--remove", action="store_true", help="delete the automation")
    args = p.parse_args(argv)
    if args.remove:
        print(f"removed {AUTOMATION!r}" if remove() else f"no automation {AUTOMATION!r}")
        return
    target = webhook_block(args.webhook) if args.webhook else block_id(args.block)
    automation = install(target)
    states = ", ".join(sorted(e.rsplit(".", 1)[1] for e in EVENTS))
    print(f"automation {AUTOMATION!r} ({automation.id}): {' and '.join(FLOWS)} runs, {states}")


if __name__ == "__main__":
    main()
