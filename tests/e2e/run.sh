#!/usr/bin/env bash
# `make e2e`: the e2e scenarios against a real Kubernetes cluster.
#
#   1. KUBECONFIG is set, or ~/.kube/config exists: that cluster, as it is. Install Pilothouse there
#      first (helm install pilothouse charts/pilothouse) plus the KubeRay CRDs; nothing is installed
#      or removed by this script.
#   2. Otherwise, with kind and a working Docker engine: a throwaway kind cluster (pilothouse-e2e)
#      with the image built from this checkout, the KubeRay CRDs, the Pilothouse CRDs and the chart;
#      deleted on exit (PILOTHOUSE_E2E_KEEP=1 keeps it).
#   3. Otherwise: pytest still runs, and every e2e test is skipped with a reason saying what to install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

PY="${PY:-$ROOT/.venv/bin/python}"
CLUSTER="${PILOTHOUSE_E2E_CLUSTER:-pilothouse-e2e}"
IMAGE="pilothouse:e2e"
NAMESPACE="pilothouse-system"
RELEASE="pilothouse"
KUBERAY_CRDS="github.com/ray-project/kuberay/ray-operator/config/crd?ref=v1.3.0"

run_tests() {
  "$PY" -m pytest -m e2e tests/e2e -p no:cacheprovider "$@"
}

log() { printf '\n==> %s\n' "$*" >&2; }

if [[ -n "${KUBECONFIG:-}" || -f "$HOME/.kube/config" ]]; then
  log "using the cluster from ${KUBECONFIG:-$HOME/.kube/config}"
  run_tests "$@"
  exit $?
fi

if ! command -v kind >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1 \
   || ! command -v kubectl >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  log "no cluster configured and no kind + kubectl + Docker engine here: the e2e tests will be skipped"
  run_tests "$@"
  exit $?
fi

WORK="$(mktemp -d)"
export KUBECONFIG="$WORK/kubeconfig"  # kind writes here; the user's own kubeconfig is left alone

dump() {
  # What went wrong, before the cluster disappears.
  kubectl -n "$NAMESPACE" get deploy,pods -o wide || true
  kubectl -n "$NAMESPACE" describe deploy "$RELEASE" || true
  kubectl -n "$NAMESPACE" logs "deploy/$RELEASE" --tail=200 || true
}

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "failed (exit $rc): operator state"
    dump
  fi
  if [[ "${PILOTHOUSE_E2E_KEEP:-}" == "1" ]]; then
    log "keeping kind cluster $CLUSTER (kubeconfig: $KUBECONFIG)"
  else
    log "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "deleting the leftover kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
fi

log "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s

log "building $IMAGE"
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "installing the KubeRay CRDs ($KUBERAY_CRDS)"
kubectl apply --server-side -k "$KUBERAY_CRDS"

log "installing the Pilothouse CRDs"
kubectl apply --server-side -f charts/pilothouse/crds
kubectl wait --for condition=Established --timeout=60s \
  crd/modeldeployments.pilothouse.io crd/vectorindexes.pilothouse.io \
  crd/budgetpolicies.pilothouse.io crd/autonomousworkflows.pilothouse.io crd/rayservices.ray.io

log "installing the chart (release $RELEASE, namespace $NAMESPACE, image $IMAGE)"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
"$PY" - "$RELEASE" "$NAMESPACE" >"$WORK/chart.yaml" <<'EOF'
"""Render charts/pilothouse like `helm template` would, with Helm's Go SDK (no helm binary)."""
import sys

import helm_python as helm
import yaml

release, namespace = sys.argv[1], sys.argv[2]
values = {"image": {"repository": "pilothouse", "tag": "e2e", "pullPolicy": "Never"}}
with helm.Chart.load("charts/pilothouse") as chart:
    manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
docs = [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text) if doc]
print(yaml.safe_dump_all(docs, sort_keys=False), end="")
EOF
kubectl apply -f "$WORK/chart.yaml"

log "waiting for the operator Deployment to be Available"
kubectl -n "$NAMESPACE" rollout status "deploy/$RELEASE" --timeout=180s
kubectl -n "$NAMESPACE" wait --for condition=Available --timeout=60s "deploy/$RELEASE"

log "running the e2e tests"
run_tests "$@"
