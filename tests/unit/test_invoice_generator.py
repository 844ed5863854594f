"""The invoice-triage example's data: reproducible, labelled truthfully, and consistent with its corpus."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from datetime import date
from pathlib import Path
from types import ModuleType

import pytest

from pilothouse.serving.evaluation import load_dataset

EXAMPLE = Path(__file__).parents[2] / "examples" / "invoice-triage"
SCRIPT = EXAMPLE / "generate_invoices.py"
FRENCH_MONTHS = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
                 "novembre", "décembre")


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_invoices", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def generate(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          check=False, timeout=60)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "labels.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default")
    assert generate(out).returncode == 0
    return out


def test_committed_example_is_what_the_generator_writes(default_set: Path) -> None:
    committed = {name: data for name, data in tree(EXAMPLE).items()
                 if name == "labels.jsonl" or name.startswith(("invoices/", "corpus/"))}
    assert committed == tree(default_set), "regenerate with: python examples/invoice-triage/generate_invoices.py"


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path, default_set: Path) -> None:
    assert generate(tmp_path / "again").returncode == 0
    assert generate(tmp_path / "other", "--seed", "8").returncode == 0
    assert tree(tmp_path / "again") == tree(default_set)
    assert tree(tmp_path / "other")["labels.jsonl"] != tree(default_set)["labels.jsonl"]


def test_smaller_count_leaves_no_stale_inputs(tmp_path: Path) -> None:
    assert generate(tmp_path, "--count", "12").returncode == 0
    assert generate(tmp_path, "--count", "6").returncode == 0
    assert sorted(p.name for p in (tmp_path / "invoices").iterdir()) == [f"inv-{i:04d}.txt" for i in range(1, 7)]


def test_too_small_count_is_a_clear_usage_error(tmp_path: Path) -> None:
    result = generate(tmp_path, "--count", "3")
    assert result.returncode == 2 and "--count must be at least 5" in result.stderr


def test_default_set_loads_as_a_valid_dataset(default_set: Path) -> None:
    loaded = load_dataset(default_set / "labels.jsonl", fields=("vendor", "invoice_number", "date", "currency",
                                                                "total"))
    assert loaded.problems == [] and len(loaded.items) == 24


def date_renderings(day: date) -> set[str]:
    return {day.isoformat(), day.strftime("%d.%m.%Y"), f"{day.day} {day.strftime('%B')} {day.year}",
            f"{day.strftime('%B')} {day.day}, {day.year}", f"{day.day} {FRENCH_MONTHS[day.month - 1]} {day.year}"}


def test_labels_say_what_the_well_formed_text_shows(default_set: Path) -> None:
    well_formed = [line for line in lines(default_set) if line["slices"]["quality"] == "ok"]
    assert len(well_formed) == 20
    for line in well_formed:
        text = (default_set / line["input"]).read_text(encoding="utf-8")
        labels = line["labels"]
        assert 250 <= len(text) <= 900, (line["id"], len(text))
        assert labels["vendor"] in text and labels["invoice_number"] in text, line["id"]
        assert any(shown in text for shown in date_renderings(date.fromisoformat(labels["date"]))), line["id"]
        digits = re.sub(r"[ .,']", "", text)  # 1.234,56 · 1,234.56 · 1'234.56 all become 123456
        assert f"{labels['total']:.2f}".replace(".", "") in digits, line["id"]
        assert labels["currency"] in ("EUR", "USD", "GBP", "CHF")


def test_every_malformed_kind_is_present_and_labelled_as_broken(default_set: Path) -> None:
    by_quality = {line["slices"]["quality"]: line for line in lines(default_set)}
    assert {"empty", "truncated", "garbage", "missing-total"} <= set(by_quality)
    assert (default_set / by_quality["empty"]["input"]).read_bytes() == b""
    assert by_quality["empty"]["labels"] is None
    with pytest.raises(UnicodeDecodeError):
        (default_set / by_quality["garbage"]["input"]).read_bytes().decode("utf-8")
    assert by_quality["garbage"]["labels"] is None
    missing = by_quality["missing-total"]
    assert missing["labels"]["total"] is None and missing["labels"]["invoice_number"] is not None
    truncated = by_quality["truncated"]
    text = (default_set / truncated["input"]).read_text(encoding="utf-8")
    assert truncated["labels"]["total"] is None  # cut off before the total
    assert truncated["labels"]["vendor"] in text and truncated["labels"]["invoice_number"] in text


def test_slices_cover_every_vendor_layout_currency_and_language(default_set: Path, generator: ModuleType) -> None:
    slices = [line["slices"] for line in lines(default_set)]
    assert {s["vendor"] for s in slices if "vendor" in s} == {v.key for v in generator.VENDORS}
    assert {s["layout"] for s in slices if "layout" in s} == {"letter", "table", "keyvalue"}
    assert {s["currency"] for s in slices if "currency" in s} == {"EUR", "USD", "GBP", "CHF"}
    assert {s["language"] for s in slices if "language" in s} == {"en", "de", "fr"}


def test_corpus_describes_every_vendor_the_invoices_name(default_set: Path, generator: ModuleType) -> None:
    corpus = {p.name: p.read_text(encoding="utf-8") for p in (default_set / "corpus").glob("*.md")}
    master = {name: text for name, text in corpus.items() if "doc_type: vendor" in text}
    named = {line["labels"]["vendor"] for line in lines(default_set) if line["labels"]}
    for vendor in named:
        pages = [text for text in master.values() if f"Legal name: {vendor}\n" in text]
        assert len(pages) == 1, vendor
    for v in generator.VENDORS:
        page = corpus[f"vendor-{v.key}.md"]
        assert all(fact in page for fact in (v.vat_id, v.iban, *v.aliases, f"net {v.payment_days} days"))
    policies = {name for name, text in corpus.items() if "doc_type: policy" in text}
    assert policies == {"approval-thresholds.md", "duplicate-invoices.md", "currency-policy.md"}


def test_ibans_carry_valid_check_digits(generator: ModuleType) -> None:
    for v in generator.VENDORS:
        compact = v.iban.replace(" ", "")
        rearranged = compact[4:] + compact[:4]
        assert int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1, v.key
