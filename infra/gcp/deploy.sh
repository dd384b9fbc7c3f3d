#!/usr/bin/env bash
# Deploy skyfuse's Google Cloud functions: the same functions-framework targets `skyfuse up`
# hosts locally (services/<fn>/gcp.py), as Cloud Run functions built from source, each fed its
# catalog topics by an Eventarc Kafka source, plus the timer cores on Cloud Scheduler.
#
#   PROJECT=my-project REGION=us-central1 KAFKA_BOOTSTRAP=host:9092 infra/gcp/deploy.sh          # print
#   PROJECT=my-project REGION=us-central1 KAFKA_BOOTSTRAP=host:9092 RUN=1 infra/gcp/deploy.sh    # run
#
# Without RUN=1 the script only prints the commands (read them first). Run from anywhere; it
# deploys the repo root (pyproject.toml installs skyfuse and services/). See infra/README.md.
#
# With DNS_ZONE (a Cloud DNS managed zone) and DNS_NAME, it also creates the fleet's one DNS name as
# a weighted round robin record set, one item per cloud: the gcp inference host with all the
# weight, AWS_INFERENCE_HOST and AZURE_INFERENCE_HOST (when set) with none, to be moved with
# `gcloud dns record-sets update … --routing-policy-data` (infra/README.md, "DNS front door").
set -euo pipefail

: "${PROJECT:?set PROJECT to the Google Cloud project id}"
: "${REGION:=us-central1}"
: "${KAFKA_BOOTSTRAP:?set KAFKA_BOOTSTRAP to host:port[,host:port] of the Kafka brokers}"
: "${STORE:=gs://skyfuse-gcp-${PROJECT}}"
: "${SERVICE_ACCOUNT:=skyfuse-functions@${PROJECT}.iam.gserviceaccount.com}"
: "${ALLOW_UNAUTHENTICATED:=0}"   # 1: the inference function is public
: "${MESSAGE_BUS:=skyfuse}"       # Eventarc Advanced bus the Kafka sources publish to
: "${DNS_ZONE:=}"                # Cloud DNS managed zone of the DNS front door; empty: none
: "${DNS_NAME:=}"                # the name callers use, e.g. api.skyfuse.example.
: "${DNS_TTL:=60}"
: "${AWS_INFERENCE_HOST:=}"      # host names (custom domains) of the other clouds' inference endpoints
: "${AZURE_INFERENCE_HOST:=}"
: "${RUN:=0}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# What the functions are built from: the repo's code and contracts, the public trust file, and a
# requirements.txt that installs skyfuse with the extras these functions import (the base install
# alone has no cloud libraries); the buildpack installs it.
SOURCE="$REPO/build/gcp-source"
# ";"-separated (gcloud's ^;^ delimiter), since the bootstrap list has commas
ENV_VARS="SKYFUSE_CLOUD=gcp;SKYFUSE_BUS__BACKEND=kafka;SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS=${KAFKA_BOOTSTRAP};SKYFUSE_CLOUDS__GCP__STORE=${STORE};SKYFUSE_CLOUDS__GCP__REGION=${REGION};SKYFUSE_EVENTS_DIR=/workspace/events;SKYFUSE_SIGNING__KEYS_DIR=/workspace/.skyfuse/keys"
# each function's event-signing key, from Secret Manager: skyfuse-signing-gcp-<fn> holds the PEM that
# `skyfuse keys init` wrote to .skyfuse/keys/private/gcp.<fn>.pem (infra/README.md, "Signed events");
# the staged source (below) carries .skyfuse/keys/trust.json, the public keys only
signing_key() { echo "SKYFUSE_SIGNING_KEY=skyfuse-signing-gcp-$1:latest"; }
PROJECT_NUMBER=PROJECT_NUMBER
if [[ "$RUN" == 1 ]]; then
  PROJECT_NUMBER="$(gcloud projects describe "$PROJECT" --format 'value(projectNumber)')"
fi

# function -> catalog topics it consumes (events/catalog.toml `consumers`; the tests keep them equal)
declare -A TOPICS=(
  [trainer]="skyfuse.shard.ready skyfuse.round.started"
  [exporter]="skyfuse.model.ready"
  [fuser]="skyfuse.onnx.ready"
  [scheduler]="skyfuse.fused.ready skyfuse.metrics.sampled skyfuse.deployment.status"
  [deployer]="skyfuse.placement.changed"
)
declare -A MEMORY=([trainer]=4Gi [exporter]=4Gi [fuser]=4Gi [scheduler]=512Mi [deployer]=1Gi)

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$RUN" == 1 ]]; then "$@"; fi
}

# --- the source folder
run rm -rf "$SOURCE"
run mkdir -p "$SOURCE/infra/gcp" "$SOURCE/.skyfuse/keys"
run cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/shared" "$REPO/services" "$REPO/events" "$SOURCE/"
run cp "$REPO/infra/gcp/timers.py" "$SOURCE/infra/gcp/"
run cp "$REPO/.skyfuse/keys/trust.json" "$SOURCE/.skyfuse/keys/"
if [[ "$RUN" == 1 ]]; then echo ".[train,serve,gcp]" > "$SOURCE/requirements.txt"; else echo "+ echo .[train,serve,gcp] > $SOURCE/requirements.txt"; fi

# --- the store bucket (functions read/write runs/, scheduler/, serving/)
run gcloud storage buckets create "$STORE" --project "$PROJECT" --location "$REGION" \
  --uniform-bucket-level-access || true
run gcloud storage buckets add-iam-policy-binding "$STORE" \
  --member "serviceAccount:${SERVICE_ACCOUNT}" --role roles/storage.objectUser

# --- Kafka-triggered functions: Cloud Run functions (functions-framework target = function name)
for fn in trainer exporter fuser scheduler deployer; do
  run gcloud run deploy "skyfuse-${fn}" --project "$PROJECT" --region "$REGION" \
    --source "$SOURCE" --function "$fn" --base-image python312 \
    --set-build-env-vars "GOOGLE_FUNCTION_SOURCE=services/${fn}/gcp.py" \
    --set-env-vars "^;^${ENV_VARS}" --set-secrets "$(signing_key "$fn")" \
    --service-account "$SERVICE_ACCOUNT" --memory "${MEMORY[$fn]}" --cpu 2 --timeout 900 \
    --concurrency 1 --no-allow-unauthenticated
  # Kafka records already are binary-mode CloudEvents (ce_* headers): one Eventarc Kafka source
  # per topic (consumer group gcp.<fn>), delivered to the function through an Eventarc pipeline.
  # Eventarc Advanced's Kafka source is in preview: check `gcloud beta eventarc kafka-sources create --help`.
  for topic in ${TOPICS[$fn]}; do
    name="skyfuse-${fn}-${topic//./-}"
    run gcloud beta eventarc kafka-sources create "$name" --project "$PROJECT" --location "$REGION" \
      --bootstrap-servers "$KAFKA_BOOTSTRAP" --topics "$topic" --consumer-group-id "gcp.${fn}" \
      --initial-offset oldest --message-bus "$MESSAGE_BUS"
  done
  run gcloud eventarc pipelines create "skyfuse-${fn}" --project "$PROJECT" --location "$REGION" \
    --destinations "http_endpoint_uri=https://skyfuse-${fn}-${PROJECT_NUMBER}.${REGION}.run.app/"
done

# --- inference: one HTTP function for every route
AUTH_FLAG=--no-allow-unauthenticated
if [[ "$ALLOW_UNAUTHENTICATED" == 1 ]]; then AUTH_FLAG=--allow-unauthenticated; fi
run gcloud run deploy skyfuse-inference --project "$PROJECT" --region "$REGION" \
  --source "$SOURCE" --function inference --base-image python312 \
  --set-build-env-vars "GOOGLE_FUNCTION_SOURCE=services/inference/gcp.py" \
  --set-env-vars "^;^${ENV_VARS}" --set-secrets "$(signing_key inference)" \
  --service-account "$SERVICE_ACCOUNT" --memory 2Gi --cpu 2 --concurrency 8 "$AUTH_FLAG"

# --- timer cores: HTTP functions in infra/gcp/timers.py, called every minute by Cloud Scheduler
for target in monitor_timer fuser_quorum_timer; do
  svc="skyfuse-${target//_/-}"
  run gcloud run deploy "$svc" --project "$PROJECT" --region "$REGION" \
    --source "$SOURCE" --function "$target" --base-image python312 \
    --set-build-env-vars "GOOGLE_FUNCTION_SOURCE=infra/gcp/timers.py" \
    --set-env-vars "^;^${ENV_VARS}" --set-secrets "$(signing_key "${target%%_*}")" \
    --service-account "$SERVICE_ACCOUNT" --memory 4Gi --timeout 900 --no-allow-unauthenticated
  run gcloud scheduler jobs create http "$svc" --project "$PROJECT" --location "$REGION" \
    --schedule "* * * * *" --http-method POST \
    --uri "https://${svc}-${PROJECT_NUMBER}.${REGION}.run.app/" \
    --oidc-service-account-email "$SERVICE_ACCOUNT"
done

# --- the DNS front door (optional): Cloud DNS weighted round robin over the clouds' inference hosts
if [[ -n "$DNS_ZONE" ]]; then
  : "${DNS_NAME:?set DNS_NAME to the name callers use, e.g. api.skyfuse.example.}"
  # weight=rrdata items, ";"-separated; a CNAME's target is fully qualified (final dot)
  wrr="1=skyfuse-inference-${PROJECT_NUMBER}.${REGION}.run.app."
  for host in "$AWS_INFERENCE_HOST" "$AZURE_INFERENCE_HOST"; do
    if [[ -n "$host" ]]; then wrr+=";0=${host%.}."; fi
  done
  run gcloud dns record-sets create "${DNS_NAME%.}." --project "$PROJECT" --zone "$DNS_ZONE" --type CNAME \
    --ttl "$DNS_TTL" --routing-policy-type WRR --routing-policy-data "$wrr"
fi
