#!/usr/bin/env bash
# `make pipeline-run`: the quickstart pipeline on a throwaway kind cluster with Kubeflow
# Pipelines 2.17 (standalone), end to end:
#   preflight -> kind cluster -> KFP install -> CPU image build + kind load -> chart (MLflow,
#   RBAC, S3 wiring to KFP's MinIO) -> compile + submit (target kind) -> wait.
#
# Preflight fails fast (exit 2) naming everything missing: docker CLI, a running docker
# daemon, kind, kubectl, helm. Tools can be pointed at with DOCKER, KIND, KUBECTL, HELM.
# `--preflight` runs only the checks. Other settings (env): CLUSTER (kubedistill),
# KFP_VERSION (2.17.0), NAMESPACE (kubeflow), RECIPE (recipes/quickstart.yaml),
# PYTHON (.venv/bin/python), KFP_PORT (8888).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-docker}"
KIND="${KIND:-kind}"
KUBECTL="${KUBECTL:-kubectl}"
HELM="${HELM:-helm}"
CLUSTER="${CLUSTER:-kubedistill}"
KFP_VERSION="${KFP_VERSION:-2.17.0}"
NAMESPACE="${NAMESPACE:-kubeflow}"
RECIPE="${RECIPE:-recipes/quickstart.yaml}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
KFP_PORT="${KFP_PORT:-8888}"

say() { printf 'pipeline-run: %s\n' "$*"; }

preflight() {
  local missing=()
  if ! command -v "$DOCKER" >/dev/null 2>&1; then
    missing+=("docker (the docker CLI, '$DOCKER', is not on PATH)")
  elif ! "$DOCKER" info >/dev/null 2>&1; then
    missing+=("docker daemon ('$DOCKER info' failed: start dockerd or fix permissions)")
  fi
  command -v "$KIND" >/dev/null 2>&1 || missing+=("kind ('$KIND' is not on PATH; https://kind.sigs.k8s.io)")
  command -v "$KUBECTL" >/dev/null 2>&1 || missing+=("kubectl ('$KUBECTL' is not on PATH)")
  command -v "$HELM" >/dev/null 2>&1 || missing+=("helm ('$HELM' is not on PATH; or set HELM=/path/to/helm)")
  if ((${#missing[@]})); then
    say "cannot run: missing prerequisites:" >&2
    for m in "${missing[@]}"; do printf '  - %s\n' "$m" >&2; done
    say "the local pipeline needs none of these: make run" >&2
    exit 2
  fi
  say "preflight ok (docker, kind, kubectl, helm)"
}

preflight
[[ "${1:-}" == "--preflight" ]] && exit 0
cd "$ROOT"

# 1. Cluster
if ! "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "creating kind cluster $CLUSTER"
  "$KIND" create cluster --name "$CLUSTER" --wait 180s
fi
"$KUBECTL" config use-context "kind-$CLUSTER" >/dev/null

# 2. Kubeflow Pipelines, standalone (upstream manifests at the release tag)
say "installing Kubeflow Pipelines $KFP_VERSION"
KFP_MANIFESTS="github.com/kubeflow/pipelines/manifests/kustomize"
"$KUBECTL" apply -k "$KFP_MANIFESTS/cluster-scoped-resources?ref=$KFP_VERSION"
"$KUBECTL" wait --for condition=established --timeout=120s crd/applications.app.k8s.io
"$KUBECTL" apply -k "$KFP_MANIFESTS/env/platform-agnostic?ref=$KFP_VERSION"
"$KUBECTL" -n "$NAMESPACE" wait --for=condition=Available deployment --all --timeout=1200s

# 3. Runtime image, loaded into the kind nodes (no registry needed)
IMAGE="$(make -s -C images print-cpu-image)"
say "building $IMAGE"
make -C images build-cpu DOCKER="$DOCKER"
"$KIND" load docker-image "$IMAGE" --name "$CLUSTER"

# 4. Chart: MLflow with artifacts in KFP's MinIO, RBAC for TrainJobs
b64d() { base64 --decode 2>/dev/null || base64 -D; }
S3_KEY="$("$KUBECTL" -n "$NAMESPACE" get secret mlpipeline-minio-artifact -o jsonpath='{.data.accesskey}' | b64d)"
S3_SECRET="$("$KUBECTL" -n "$NAMESPACE" get secret mlpipeline-minio-artifact -o jsonpath='{.data.secretkey}' | b64d)"
S3_ENDPOINT="http://minio-service.$NAMESPACE.svc.cluster.local:9000"
say "installing the kubedistill chart"
"$HELM" upgrade --install kubedistill charts/kubedistill --namespace "$NAMESPACE" --wait \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
  --set s3.endpoint="$S3_ENDPOINT" --set s3.secret.create=true \
  --set s3.secret.accessKeyId="$S3_KEY" --set s3.secret.secretAccessKey="$S3_SECRET" \
  --set mlflow.artifactsDestination="s3://mlpipeline/kubedistill/mlflow"

# 5. Compile + submit (target kind: CPU, MinIO credentials as plain env) and wait
"$KUBECTL" -n "$NAMESPACE" port-forward svc/ml-pipeline "$KFP_PORT:8888" >/dev/null 2>&1 &
PF_PID=$!
trap 'kill "$PF_PID" 2>/dev/null || true' EXIT
sleep 5
say "submitting $RECIPE"
"$PYTHON" -m kubedistill.cli pipeline submit --host "http://localhost:$KFP_PORT" \
  --recipe "$RECIPE" --pipeline off_policy_kd --target kind --image "$IMAGE" \
  --work-dir "s3://mlpipeline/kubedistill/runs/$(basename "$RECIPE" .yaml)" \
  --env "AWS_ACCESS_KEY_ID=$S3_KEY" --env "AWS_SECRET_ACCESS_KEY=$S3_SECRET" \
  --env "AWS_ENDPOINT_URL=$S3_ENDPOINT" --wait
say "done; MLflow: $KUBECTL -n $NAMESPACE port-forward svc/kubedistill-mlflow 5000"
