"""The main job end to end: `pilothouse run` on the invoice example, then a human decision and an eval gate.

Everything is real and out of process, as a user runs it: the CLI starts local Ray Serve with the
vLLM-CPU engine on the tiny generated model and the gateway, Milvus Lite, SQLite; ingests the corpus;
runs the invoices. A subset of six invoices keeps it to about a minute (one of them empty, one not
UTF-8). The tiny model's extractions are random, so confidence parks runs for review: the test
approves one with corrected fields through `pilothouse review edit` and checks that exactly one row
reaches the ERP table, once, even when the decision is repeated. Ingesting the corpus again changes
nothing. The failure paths (automated act, webhook failure, crash and resume, Milvus stopped, approve
and reject) are in test_local_run_faults.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow]

EXAMPLE = Path(__file__).parents[2] / "examples" / "invoice-triage"
SUBSET = ("inv-0001", "inv-0002", "inv-0003", "inv-0004", "inv-0011", "inv-0013")  # 0011 empty, 0013 not UTF-8
INGEST_COUNTS = re.compile(r"^\W*(files added|files changed|files unchanged|chunks written|chunks removed|"
                           r"rows in the collection)\W+(\d+)\W*$", re.MULTILINE)


def pilothouse(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pilothouse", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, start_new_session=True)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example with six invoices and their labels, and a gateway of two replicas."""
    root = tmp_path_factory.mktemp("local-run")
    folder = root / "invoice-triage"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("invoices", "*.py", "__pycache__"))
    workflow = folder / "workflow.yaml"
    workflow.write_text(workflow.read_text().replace("\nspec:\n", "\nspec:\n  gateway:\n    replicas: 2\n", 1))
    (folder / "invoices").mkdir()
    for name in SUBSET:
        shutil.copy(EXAMPLE / "invoices" / f"{name}.txt", folder / "invoices")
    lines = [line for line in (EXAMPLE / "labels.jsonl").read_text().splitlines()
             if json.loads(line)["id"] in SUBSET]
    (folder / "labels.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def ran(example: Path) -> subprocess.CompletedProcess[str]:
    return pilothouse("run", str(example), cwd=example.parent)


@pytest.mark.timeout(600)
def test_run_processes_every_invoice_and_summarises(example: Path, ran: subprocess.CompletedProcess[str]) -> None:
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    state = example.parent / ".pilothouse"
    assert (state / "models" / "tiny-llama" / "config.json").exists()  # generated, no download
    for name in SUBSET:
        assert f"{name}.txt" in ran.stdout
    assert "input document is empty" in ran.stdout  # inv-0011: a recorded failed run, not a crash
    assert "not UTF-8 text" in ran.stdout  # inv-0013: reported, never sent to a model
    assert "automation rate" in ran.stdout and "budget invoice-budget: Ok" in ran.stdout
    assert "chunks written" in ran.stdout  # the corpus was ingested before the runs
    assert "Precision" in ran.stdout and "quality=ok" in ran.stdout  # scored against labels.jsonl
    assert "tiny RANDOM model" in ran.stderr  # said plainly, with the way to a real model
    assert "gateway of invoice-triage: 2 replica(s) running (spec.gateway.replicas 2)" in ran.stdout
    status = json.loads((state / "status.json").read_text())
    slo = status["AutonomousWorkflow/default/invoice-triage"]["slo"]
    assert slo["runs"] == len(SUBSET) - 1  # the undecodable file never became a run
    budget = status["BudgetPolicy/default/invoice-budget"]
    assert budget["state"] == "Ok" and budget["spentUSD"] > 0  # the gateway's ledger commits, read back


@pytest.mark.timeout(300)
def test_review_edit_acts_once_and_is_audited(example: Path, ran: subprocess.CompletedProcess[str]) -> None:
    assert ran.returncode == 0
    from pilothouse.serving.runs import RunStore

    cwd = example.parent
    url = f"sqlite:///{cwd / '.pilothouse' / 'pilothouse.db'}"
    store = RunStore(url, create=False)
    try:
        waiting = store.list(states=["review"], workflow="invoice-triage", limit=100)
    finally:
        store.close()
    assert waiting, "the tiny model's random output must park runs for review"
    run_id = waiting[0].id
    listed = pilothouse("review", "list", "--store-url", url, cwd=cwd)
    assert listed.returncode == 0 and run_id in listed.stdout
    fields = ["--set", "vendor=Acme Industrial Supplies Ltd", "--set", "invoice_number=AIS-1", "--set",
              "date=2024-05-01", "--set", "currency=GBP", "--set", "total=120.5"]
    edited = pilothouse("review", "edit", run_id, "--reviewer", "alice", "--reason", "fixed fields", *fields,
                        "--store-url", url, cwd=cwd)
    assert edited.returncode == 0, edited.stderr
    assert "completed" in edited.stdout and "action taken" in edited.stdout
    again = pilothouse("review", "approve", run_id, "--reviewer", "bob", "--store-url", url, cwd=cwd)
    assert again.returncode == 2 and "not waiting for review" in again.stderr
    with sqlite3.connect(cwd / ".pilothouse" / "erp.db") as erp:
        rows = erp.execute("SELECT idempotency_key, vendor, total FROM invoices").fetchall()
    assert rows == [(f"{run_id}-post", "Acme Industrial Supplies Ltd", 120.5)]
    shown = pilothouse("audit", "show", f"{run_id}/post", "--store-url", url, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    assert f"{run_id}-post" in shown.stdout  # the action with its idempotency key


def ingest_counts(stdout: str) -> dict[str, int]:
    """The rows of the ingest summary table."""
    return {label: int(count) for label, count in INGEST_COUNTS.findall(stdout)}


@pytest.mark.timeout(300)
def test_ingesting_the_corpus_again_changes_nothing(example: Path, ran: subprocess.CompletedProcess[str]) -> None:
    """`pilothouse run` ingested the corpus; `pilothouse ingest` of the same files finds nothing to do."""
    assert ran.returncode == 0
    first = ingest_counts(ran.stdout)
    files = len(list((example / "corpus").iterdir()))
    assert first["files added"] == files and first["chunks written"] > 0
    again = pilothouse("ingest", str(example / "corpus"), "--index", "invoice-docs", "-f", str(example),
                       cwd=example.parent)
    assert again.returncode == 0, again.stdout + again.stderr
    rows = first["rows in the collection"]
    assert ingest_counts(again.stdout) == {"files added": 0, "files changed": 0, "files unchanged": files,
                                           "chunks written": 0, "chunks removed": 0, "rows in the collection": rows}
    assert f"({rows} rows before)" in again.stdout


@pytest.mark.timeout(400)
def test_eval_gates_on_a_regressed_slice(example: Path, ran: subprocess.CompletedProcess[str]) -> None:
    """A real eval run, then its own predictions against a baseline in which one slice was perfect:
    the gate must fail and name that slice."""
    assert ran.returncode == 0
    cwd = example.parent
    report_file, predictions = cwd / "eval.json", cwd / "predictions.jsonl"
    first = pilothouse("eval", str(example), str(example / "labels.jsonl"), "--out", str(report_file),
                       "--save-predictions", str(predictions), cwd=cwd)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert json.loads(report_file.read_text())["items"] == len(SUBSET)
    assert len(predictions.read_text().splitlines()) == len(SUBSET)
    baseline = json.loads(report_file.read_text())
    target = next(k for k in baseline["slices"] if k.startswith("vendor="))
    scores = baseline["slices"][target]
    for counts in [*scores["fields"].values(), scores["overall"]]:
        counts["predicted"] = counts["correct"] = counts["labelled"]
    (cwd / "baseline.json").write_text(json.dumps(baseline))
    same = pilothouse("eval", str(example), str(example / "labels.jsonl"), "--predictions", str(predictions),
                      "--baseline", str(report_file), cwd=cwd)
    assert same.returncode == 0, same.stderr  # its own baseline: no regression
    gated = pilothouse("eval", str(example), str(example / "labels.jsonl"), "--predictions", str(predictions),
                       "--baseline", str(cwd / "baseline.json"), cwd=cwd)
    assert gated.returncode == 1, gated.stdout + gated.stderr
    assert f"slice {target}" in gated.stderr
