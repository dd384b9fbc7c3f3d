#!/usr/bin/env bash
# Local stand-ins for the three clouds' object stores, for skyfuse development and CI:
#
#   localstack  AWS (S3, SQS, SSM, EventBridge, API Gateway)   http://127.0.0.1:4566    bucket    skyfuse-aws
#               and Route 53                                                            zone      skyfuse.example.
#   gcs         Google Cloud Storage (fake-gcs-server)         http://127.0.0.1:9023    bucket    skyfuse-gcp
#   azurite     Azure Blob Storage (Azurite)                   http://127.0.0.1:10000   container skyfuse-azure
#
#   bash infra/emulators/emulators.sh up [SERVICE...]       install on first use, start, wait until each
#                                                         answers, create the buckets (idempotent)
#   bash infra/emulators/emulators.sh down [--purge] [SERVICE...]
#                                                         stop (SIGTERM, then SIGKILL after a timeout);
#                                                         --purge also deletes $EMULATORS_STATE_DIR
#   bash infra/emulators/emulators.sh status [SERVICE...]   one line each; exit 0 if all run, 3 if not
#   bash infra/emulators/emulators.sh install [SERVICE...]  install only
#   bash infra/emulators/emulators.sh env                   print the `export` lines the stores read:
#                                                         eval "$(bash infra/emulators/emulators.sh env)"
#
# Every emulator keeps its objects in memory: `down` loses them, `up` creates the empty buckets again.
#
# Installed on first use (and again when a pin below changes), all git-ignored:
#   infra/emulators/.venv-localstack  localstack-core 2026.3.0 and its pinned dependencies
#                                     (localstack-requirements.txt) in a venv of Python >= 3.13
#   infra/emulators/node_modules      azurite 3.35.0 (package.json, package-lock.json; npm ci)
#   infra/emulators/bin               fake-gcs-server, built from its Go module at FAKE_GCS_VERSION
#
# Knobs (environment):
#   EMULATORS_STATE_DIR=<repo>/.skyfuse/emulators   pid files, logs/, LocalStack's volume dir
#   LOCALSTACK_PORT=4566  GCS_PORT=9023  AZURITE_PORT=10000   (all bound to 127.0.0.1 only)
#   EMULATORS_START_TIMEOUT=90   seconds `up` waits for each emulator to answer
#   EMULATORS_STOP_TIMEOUT=8     seconds `down` waits after SIGTERM before SIGKILL
#   LOCALSTACK_PYTHON            a Python >= 3.13 for LocalStack's venv (default: the first found of
#                                python3.14, python3.13 on PATH, then pyenv's versions)
#   SKYFUSE_PYTHON=<repo>/.venv/bin/python   runs bootstrap.py (needs boto3, google-cloud-storage,
#                                azure-storage-blob: `make install`)
#   EMULATORS_SKIP_BOOTSTRAP=1   start the servers but create no buckets
#   NODE=node  NPM=npm  GO=go
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SCRIPT_NAME=emulators
# shellcheck source=../lib/common.sh
source "$REPO/infra/lib/common.sh"

STATE="${EMULATORS_STATE_DIR:-$REPO/.skyfuse/emulators}"
LOGS="$STATE/logs"
LOCALSTACK_PORT="${LOCALSTACK_PORT:-4566}"
GCS_PORT="${GCS_PORT:-9023}"
AZURITE_PORT="${AZURITE_PORT:-10000}"
START_TIMEOUT="${EMULATORS_START_TIMEOUT:-90}"
STOP_TIMEOUT="${EMULATORS_STOP_TIMEOUT:-8}"
SKYFUSE_PYTHON="${SKYFUSE_PYTHON:-$REPO/.venv/bin/python}"
NODE="${NODE:-node}"
NPM="${NPM:-npm}"
GO="${GO:-go}"

FAKE_GCS_MODULE="github.com/fsouza/fake-gcs-server"
FAKE_GCS_VERSION="v1.56.1"

LS_VENV="$HERE/.venv-localstack"
LS_REQS="$HERE/localstack-requirements.txt"
AZ_MAIN="$HERE/node_modules/azurite/dist/src/blob/main.js"
GCS_BIN="$HERE/bin/fake-gcs-server"

# Azurite's fixed, publicly documented development account (not a secret).
AZURITE_ACCOUNT="devstoreaccount1"
AZURITE_KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_CONN="DefaultEndpointsProtocol=http;AccountName=$AZURITE_ACCOUNT;AccountKey=$AZURITE_KEY;BlobEndpoint=http://127.0.0.1:$AZURITE_PORT/$AZURITE_ACCOUNT;"

ALL=(localstack gcs azurite)

usage() {
  echo "usage: $0 up [SERVICE...] | down [--purge] [SERVICE...] | status [SERVICE...] | install [SERVICE...] | env" >&2
  echo "       SERVICE: ${ALL[*]}" >&2
  exit 2
}

port_of() {
  case "$1" in
    localstack) echo "$LOCALSTACK_PORT" ;;
    gcs) echo "$GCS_PORT" ;;
    azurite) echo "$AZURITE_PORT" ;;
  esac
}

url_of() { echo "http://127.0.0.1:$(port_of "$1")"; }

# ---------------------------------------------------------------- install ---

find_python313() {   # print a Python >= 3.13 interpreter, or fail
  local cand root
  local -a cands=()
  [[ -n "${LOCALSTACK_PYTHON:-}" ]] && cands+=("$LOCALSTACK_PYTHON")
  cands+=(python3.14 python3.13)
  if command -v pyenv >/dev/null; then
    root="$(pyenv root 2>/dev/null || true)"
    if [[ -n "$root" ]]; then
      for cand in $(compgen -G "$root/versions/3.1[3-9]*/bin/python3" | sort -rV); do cands+=("$cand"); done
    fi
  fi
  cands+=(/usr/local/bin/python3.13 /usr/bin/python3.13 python3)
  for cand in "${cands[@]}"; do
    if "$cand" -c 'import sys, venv; sys.exit(sys.version_info < (3, 13))' >/dev/null 2>&1; then
      command -v "$cand"
      return 0
    fi
  done
  return 1
}

installed() {
  case "$1" in
    localstack) [[ -x "$LS_VENV/bin/python" ]] && file_holds "$LS_VENV/.installed" "$(sha_of "$LS_REQS")" ;;
    azurite) [[ -f "$AZ_MAIN" ]] && file_holds "$HERE/node_modules/.installed" "$(sha_of "$HERE/package-lock.json")" ;;
    gcs) [[ -x "$GCS_BIN" ]] && file_holds "$HERE/bin/.installed" "$FAKE_GCS_VERSION" ;;
  esac
}

install_localstack() {
  local py
  py="$(find_python313)" || die "LocalStack needs Python >= 3.13 (3.11 and 3.12 cannot run it): install one (e.g. pyenv install 3.13) or set LOCALSTACK_PYTHON"
  rm -rf "$LS_VENV"
  "$py" -m venv "$LS_VENV"
  # --no-compile: byte-compiling ~500 MB of packages triples the install time (61 s → 19 s with warm
  # caches here); Python compiles what LocalStack imports on its first start instead (about +1 s).
  "$LS_VENV/bin/pip" install --quiet --disable-pip-version-check --no-compile -r "$LS_REQS"
  sha_of "$LS_REQS" >"$LS_VENV/.installed"   # written last: an interrupted install is redone
}

install_azurite() {
  need "$NPM" "npm ($NPM)" "install Azurite"
  rm -rf "$HERE/node_modules"
  (cd "$HERE" && "$NPM" ci --omit=dev --no-audit --no-fund --loglevel=error)
  sha_of "$HERE/package-lock.json" >"$HERE/node_modules/.installed"
}

install_gcs() {
  need "$GO" "go ($GO)" "build fake-gcs-server"
  rm -rf "${HERE:?}/bin"
  mkdir -p "$HERE/bin"
  # The module's own go.mod pins every dependency (go.sum checked); GOTOOLCHAIN=local never fetches a toolchain.
  GOBIN="$HERE/bin" CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
    "$GO" install -trimpath -ldflags=-s "$FAKE_GCS_MODULE@$FAKE_GCS_VERSION"
  echo "$FAKE_GCS_VERSION" >"$HERE/bin/.installed"
}

# Install what is missing, the services in parallel; each one's output goes to logs/install-NAME.log.
install_services() {
  local s t0=$SECONDS
  local -a todo=() workers=()
  for s in "$@"; do installed "$s" || todo+=("$s"); done
  ((${#todo[@]})) || return 0
  mkdir -p "$LOGS"
  say "installing ${todo[*]} (first use; logs in $LOGS/install-*.log) ..."
  for s in "${todo[@]}"; do
    ( t=$SECONDS; "install_$s"; echo "installed $s in $((SECONDS - t)) s" ) >"$LOGS/install-$s.log" 2>&1 &
    workers+=("$!")
  done
  local i failed=0
  for i in "${!todo[@]}"; do
    if ! wait "${workers[$i]}"; then
      failed=1
      say "installing ${todo[$i]} failed; last lines of $LOGS/install-${todo[$i]}.log:" >&2
      tail -n 30 "$LOGS/install-${todo[$i]}.log" >&2
    fi
  done
  ((failed == 0)) || exit 1
  say "installed ${todo[*]} in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- process ---

pidfile() { echo "$STATE/$1.pid"; }
logfile() { echo "$LOGS/$1.log"; }

is_ours() {   # is_ours NAME PID: is PID a live emulator NAME of ours?
  local name="$1" cmd
  cmd="$(proc_cmdline "$2")" || return 1
  case "$name" in
    localstack) [[ "$cmd" == *"$LS_VENV/bin/python"*"localstack.runtime.main"* ]] ;;
    gcs) [[ "$cmd" == *"$GCS_BIN "*"-port $GCS_PORT "* ]] ;;
    azurite) [[ "$cmd" == *"$AZ_MAIN "*"--blobPort $AZURITE_PORT "* ]] ;;
  esac
}

# Our emulators lead their own process group (setsid); a child with the same command line does not.
is_our_leader() {   # is_our_leader NAME PID
  is_ours "$1" "$2" && [[ "$(ps -o pgid= -p "$2" 2>/dev/null | tr -d ' ')" == "$2" ]]
}

running_pid() {   # print the PID of our running emulator NAME, if any: from its pid file, else
  local name="$1" pid f   # by looking for it (a pid file deleted by `make clean`, say)
  f="$(pidfile "$name")"
  if pid="$(pid_in_file "$f" is_ours "$name")"; then
    echo "$pid"
    return 0
  fi
  pid="$(find_pid is_our_leader "$name")" || return 1
  mkdir -p "$STATE"
  echo "$pid" >"$f"
  echo "$pid"
}

# Ready = the emulator answers its API over HTTP (not merely an open port).
answers() {
  local name="$1" url code
  url="$(url_of "$name")"
  if ! command -v curl >/dev/null; then
    port_open "$(port_of "$name")"
    return
  fi
  case "$name" in
    localstack)
      curl -sf --max-time 3 "$url/_localstack/health" 2>/dev/null | grep -Eq '"s3": *"(available|running)"' ;;
    gcs)
      curl -sf --max-time 3 -o /dev/null "$url/storage/v1/b?project=skyfuse" ;;
    azurite)   # any HTTP answer from the account endpoint (403 without a signature) means it serves
      code="$(curl -s --max-time 3 -o /dev/null -w '%{http_code}' "$url/$AZURITE_ACCOUNT?comp=list" 2>/dev/null || true)"
      [[ "$code" =~ ^[1-5][0-9][0-9]$ ]] ;;
  esac
}

launch() {   # launch NAME: start it detached (own session, so it outlives us); print its pid
  local name="$1" port
  port="$(port_of "$name")"
  local -a cmd
  case "$name" in
    localstack)
      # TMPDIR keeps LocalStack's temporary folder in ours (S3 object bodies still spool under
      # /tmp/localstack-s3-storage: a path fixed in LocalStack 2026.3.0)
      rm -rf "$STATE/localstack/tmp"
      mkdir -p "$STATE/localstack/tmp"
      cmd=(env GATEWAY_SERVER=hypercorn "GATEWAY_LISTEN=127.0.0.1:$port" DNS_ADDRESS=0
        SKIP_SSL_CERT_DOWNLOAD=1 DISABLE_EVENTS=1 "LOCALSTACK_VOLUME_DIR=$STATE/localstack"
        "TMPDIR=$STATE/localstack/tmp" "$LS_VENV/bin/python" -m localstack.runtime.main) ;;
    gcs)
      cmd=("$GCS_BIN" -scheme http -host 127.0.0.1 -port "$port" -backend memory
        -external-url "http://127.0.0.1:$port" -public-host "127.0.0.1:$port" -log-level warn) ;;
    azurite)
      cmd=("$NODE" "$AZ_MAIN" --blobHost 127.0.0.1 --blobPort "$port" --inMemoryPersistence
        --skipApiVersionCheck --disableTelemetry --silent) ;;
  esac
  {
    echo "---- $(date -u +%FT%TZ) emulators.sh up: ${cmd[*]}"
  } >>"$(logfile "$name")"
  start_detached "$(logfile "$name")" "${cmd[@]}"
  echo $!
}

stop_emulator() {   # stop_emulator PID: SIGTERM to its process group, wait, then SIGKILL
  stop_pid --group "$1" "$STOP_TIMEOUT"
}

show_log_tail() { tail_log "$(logfile "$1")" 30; }

# --------------------------------------------------------------- commands ---

bootstrap() {   # create the buckets in the emulators named
  [[ "${EMULATORS_SKIP_BOOTSTRAP:-0}" == 1 ]] && return 0
  [[ -x "$SKYFUSE_PYTHON" ]] || die "no $SKYFUSE_PYTHON to create the buckets with: run \`make install\` first (or set SKYFUSE_PYTHON)"
  local -a args=()
  local s
  for s in "$@"; do
    case "$s" in
      localstack) args+=(--s3 "$(url_of localstack)" --route53 "$(url_of localstack)") ;;
      gcs) args+=(--gcs "$(url_of gcs)") ;;
      azurite) args+=(--azure "$AZURITE_CONN") ;;
    esac
  done
  "$SKYFUSE_PYTHON" "$HERE/bootstrap.py" "${args[@]}"
}

cmd_up() {
  local s pid port holder t0=$SECONDS
  local -a start=()
  if [[ "${EMULATORS_SKIP_BOOTSTRAP:-0}" != 1 && ! -x "$SKYFUSE_PYTHON" ]]; then
    die "no $SKYFUSE_PYTHON to create the buckets with: run \`make install\` first (or set SKYFUSE_PYTHON, or EMULATORS_SKIP_BOOTSTRAP=1)"
  fi
  for s in "$@"; do
    if pid="$(running_pid "$s")"; then
      say "$s already running (pid $pid, $(url_of "$s"))"
      continue
    fi
    rm -f "$(pidfile "$s")"
    port="$(port_of "$s")"
    if port_open "$port"; then
      holder="$(who_listens "$port")"
      die "port 127.0.0.1:$port for $s is taken by another process${holder:+ ($holder)}; stop it or set $(tr '[:lower:]' '[:upper:]' <<<"$s")_PORT"
    fi
    start+=("$s")
  done

  if ((${#start[@]})); then
    install_services "${start[@]}"
    mkdir -p "$STATE" "$LOGS"
    local -A pids=() since=()
    for s in "${start[@]}"; do
      pid="$(launch "$s")"
      echo "$pid" >"$(pidfile "$s")"
      pids[$s]=$pid
      since[$s]=$SECONDS
    done
    local -a waiting=("${start[@]}") still
    local deadline=$((SECONDS + START_TIMEOUT)) failed=0
    while ((${#waiting[@]})); do
      still=()
      for s in "${waiting[@]}"; do
        pid="${pids[$s]}"
        if ! kill -0 "$pid" 2>/dev/null; then
          show_log_tail "$s"
          rm -f "$(pidfile "$s")"
          say "$s exited during startup (log: $(logfile "$s"))" >&2
          failed=1
        elif answers "$s"; then
          say "$s up on $(url_of "$s") (pid $pid, ready in $((SECONDS - since[$s])) s)"
        else
          still+=("$s")
        fi
      done
      waiting=("${still[@]+"${still[@]}"}")
      ((${#waiting[@]})) || break
      if ((SECONDS >= deadline)); then
        for s in "${waiting[@]}"; do
          show_log_tail "$s"
          say "$s did not answer within ${START_TIMEOUT} s; stopping it"
          stop_emulator "${pids[$s]}"
          rm -f "$(pidfile "$s")"
        done
        failed=1
        break
      fi
      sleep 0.3
    done
    ((failed == 0)) || exit 1
  fi
  bootstrap "$@"
  say "ready in $((SECONDS - t0)) s; logs in $LOGS; for the stores: eval \"\$(bash infra/emulators/emulators.sh env)\""
}

cmd_down() {   # stops them all at once
  local s pid
  for s in "$@"; do
    if pid="$(running_pid "$s")"; then
      ( t0=$SECONDS; stop_emulator "$pid"; rm -f "$(pidfile "$s")"; say "$s stopped (pid $pid, $((SECONDS - t0)) s)" ) &
    else
      rm -f "$(pidfile "$s")"
      say "$s not running"
    fi
  done
  wait
}

cmd_status() {
  local s pid rc=0
  for s in "$@"; do
    if pid="$(running_pid "$s")"; then
      if answers "$s"; then
        say "$s running (pid $pid, $(url_of "$s"))"
      else
        say "$s running (pid $pid), but $(url_of "$s") does not answer (yet)"
      fi
    else
      say "$s not running$(installed "$s" || echo ' (not installed)')"
      rc=3
    fi
  done
  return $rc
}

cmd_env() {
  cat <<EOF
export AWS_ENDPOINT_URL=$(url_of localstack)
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_DEFAULT_REGION=us-east-1
export STORAGE_EMULATOR_HOST=$(url_of gcs)
export AZURE_STORAGE_CONNECTION_STRING='$AZURITE_CONN'
EOF
}

with_lock() {   # serialise up/down/install against concurrent callers
  mkdir -p "$STATE"
  lock_state "$STATE/.lock" 300
  "$@"
}

services() {   # validate SERVICE arguments; none = all
  local s
  if (($# == 0)); then
    echo "${ALL[*]}"
    return 0
  fi
  for s in "$@"; do
    [[ " ${ALL[*]} " == *" $s "* ]] || { say "unknown service '$s'" >&2; usage; }
  done
  echo "$*"
}

action="${1:-}"
[[ $# -gt 0 ]] && shift
purge=0
if [[ "$action" == down && "${1:-}" == --purge ]]; then purge=1; shift; fi
if [[ "$action" != env ]]; then
  names="$(services "$@")" || exit 2
  read -ra S <<<"$names"
fi
case "$action" in
  up) with_lock cmd_up "${S[@]}" ;;
  down)
    with_lock cmd_down "${S[@]}"
    if ((purge)); then purge_dir EMULATORS_STATE_DIR "$STATE"; fi ;;
  status) cmd_status "${S[@]}" ;;
  install) with_lock install_services "${S[@]}" ;;
  env)
    [[ $# -eq 0 ]] || usage
    cmd_env ;;
  *) usage ;;
esac
