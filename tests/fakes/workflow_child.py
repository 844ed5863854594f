"""A runtime in its own process, for the crash test: ``python -m tests.fakes.workflow_child DIR STORE RECEIVER``.

Starts run ``run-crash`` of the kit's workflow through a gateway over a FakeBackend, as runtime
``runtime-a``; the test kills it with SIGKILL while the receiver holds its action's request.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pilothouse.serving.audit import AuditLog
from pilothouse.serving.runs import RunStore
from pilothouse.serving.runtime import WorkflowRuntime
from tests.fakes.openai_backend import FakeBackend
from tests.fakes.workflow_kit import INVOICE, VENDORS, answer, gateway, table, workflow


async def main(folder: Path, store_url: str, receiver_url: str) -> None:
    wf = workflow(receiver_url, act_timeout_s=120)
    async with FakeBackend(model="org/small") as fb, gateway(folder, table(wf, fb.url), store_url) as (_, gw):
        fb.reply_with(answer())
        runtime = WorkflowRuntime(wf, store=RunStore(store_url), model=gw, retrievers={"vendors": VENDORS},
                                  audit=AuditLog(store_url), owner="runtime-a")
        await runtime.start(INVOICE, run_id="run-crash")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
