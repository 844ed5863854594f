"""API models: defaults, cross-field rules, and the helpers that turn them into decisions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pilothouse.operator import conditions, milvus
from pilothouse.operator.api import ModelDeployment, VectorIndex
from pilothouse.operator.conditions import Observation
from pilothouse.operator.manifests import describe, load


def test_defaults_make_a_minimal_model_deployment_useful() -> None:
    md = ModelDeployment.model_validate({"metadata": {"name": "m"}, "spec": {"model": {"name": "org/m"}}})
    assert md.spec.engine == "vllm" and md.spec.replicas.min == 1 and md.spec.vllm.gpu_memory_utilization == 0.9
    assert md.served_model_name == "m" and md.namespace == "default"
    assert md.dump()["spec"]["pricing"] == {"inputPerMillionUSD": 0.0, "outputPerMillionUSD": 0.0}


def test_unknown_fields_are_errors_not_silently_dropped() -> None:
    with pytest.raises(ValidationError) as caught:
        ModelDeployment.model_validate({"metadata": {"name": "m"},
                                        "spec": {"model": {"name": "x"}, "replica": {"min": 2}}})
    assert describe(caught.value) == ["spec.replica: Extra inputs are not permitted"]


def test_index_params_must_fit_the_index_type() -> None:
    with pytest.raises(ValidationError, match="nlist applies to IVF_\\* indexes only"):
        VectorIndex.model_validate({"metadata": {"name": "v"},
                                    "spec": {"fields": {"dimension": 8}, "index": {"type": "HNSW", "nlist": 4}}})
    vi = VectorIndex.model_validate({"metadata": {"name": "inv-docs"},
                                     "spec": {"fields": {"dimension": 8}, "index": {"type": "IVF_PQ"}}})
    assert vi.spec.index.params() == {"nlist": 128, "m": 8, "nbits": 8}
    assert vi.alias == "inv_docs"


def test_fingerprint_changes_with_index_and_schema_only() -> None:
    def fp(index: dict, dim: int = 8) -> str:
        vi = VectorIndex.model_validate({"metadata": {"name": "v"},
                                        "spec": {"fields": {"dimension": dim}, "index": index, "prewarm": False}})
        return vi.spec.index.fingerprint(vi.spec.fields)

    assert fp({"type": "HNSW"}) == fp({"type": "HNSW"})
    assert fp({"type": "HNSW"}) != fp({"type": "HNSW", "m": 32})
    assert fp({"type": "HNSW"}) != fp({"type": "HNSW"}, dim=16)


def test_milvus_lite_allow_list_rejects_what_lite_only_fails_at_load() -> None:
    vi = VectorIndex.model_validate({"metadata": {"name": "v"},
                                     "spec": {"fields": {"dimension": 8}, "index": {"type": "DISKANN"}}})
    with pytest.raises(milvus.IndexSpecInvalid, match="DISKANN is not supported by milvus-lite"):
        milvus.check_allowed(vi, "/tmp/x.db")
    milvus.check_allowed(vi, "http://milvus:19530")
    assert milvus.backend_of("./local.db") == "milvus-lite"


def test_conditions_keep_transition_time_until_status_changes() -> None:
    first = conditions.merge([], [Observation("Ready", False, "PodsNotReady")], 1)
    first[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = conditions.merge(first, [Observation("Ready", False, "PodsNotReady", "still")], 2)
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["observedGeneration"] == 2
    flipped = conditions.merge(same, [Observation("Ready", True, "ServeRunning")], 2)
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    assert conditions.transitions(same, flipped) == flipped
    assert conditions.transitions(flipped, flipped) == []


def test_manifest_loader_names_file_object_and_field(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: pilothouse.io/v1alpha1\nkind: BudgetPolicy\nmetadata: {name: b}\n"
        "spec: {limits: [{window: week, maxCostUSD: 1}]}\n---\n"
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {k: v}\n")
    bundle = load(tmp_path)
    assert [str(e) for e in bundle.errors] == [
        f"{tmp_path / 'a.yaml'} (BudgetPolicy/b): spec.limits[0].window: Input should be 'hour', 'day' or 'month' "
        "(got 'week')"]
    assert bundle.secrets == {("default", "s"): {"k": "v"}}
