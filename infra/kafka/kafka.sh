#!/usr/bin/env bash
# Single-node Apache Kafka 4.x broker (KRaft, combined broker+controller) for
# skyfuse development and CI, run from Maven Central jars only.
#
#   bash infra/kafka/kafka.sh up            install jars if needed, format, start, wait until ready
#   bash infra/kafka/kafka.sh down          stop the broker, keep its data
#   bash infra/kafka/kafka.sh down --purge  stop the broker and delete $KAFKA_STATE_DIR
#   bash infra/kafka/kafka.sh status        exit 0 if running, 3 if not
#
# Knobs (environment):
#   KAFKA_PORT=9092             PLAINTEXT listener, 127.0.0.1 only
#   KAFKA_CONTROLLER_PORT=9093  KRaft controller listener, 127.0.0.1 only
#   KAFKA_STATE_DIR=<repo>/.skyfuse/kafka   config, data, pid file, logs
#   KAFKA_LOG_DIR=$KAFKA_STATE_DIR/logs     server.log, kafka.out
#   KAFKA_HEAP_OPTS="-Xms256m -Xmx512m"
#   KAFKA_JVM_OPTS="..."        extra JVM options for the broker
#   KAFKA_START_TIMEOUT=90      seconds `up` waits for the broker to answer
#   KAFKA_STOP_TIMEOUT=20       seconds `down` waits after SIGTERM before SIGKILL
#   JAVA=java  MVN=mvn
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_STATE_DIR="${KAFKA_STATE_DIR:-$REPO/.skyfuse/kafka}"
KAFKA_LOG_DIR="${KAFKA_LOG_DIR:-$KAFKA_STATE_DIR/logs}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:-}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-20}"
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA="${JAVA:-$JAVA_HOME/bin/java}"
else
  JAVA="${JAVA:-java}"
fi
MVN="${MVN:-mvn}"
export KAFKA_LOG_DIR   # read by log4j2.properties

LIB="$HERE/lib"
POM="$HERE/pom.xml"
STAMP="$LIB/.installed"
LOG4J="$HERE/log4j2.properties"
PROPS="$KAFKA_STATE_DIR/server.properties"
DATA="$KAFKA_STATE_DIR/data"
PIDFILE="$KAFKA_STATE_DIR/kafka.pid"
OUTFILE="$KAFKA_LOG_DIR/kafka.out"
SERVER_LOG="$KAFKA_LOG_DIR/server.log"
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

say() { echo "kafka: $*"; }
die() { echo "kafka: $*" >&2; exit 1; }

usage() {
  echo "usage: $0 up | down [--purge] | status" >&2
  exit 2
}

# ---------------------------------------------------------------- install ---

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

installed() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(pom_hash)" ]] &&
    compgen -G "$LIB/kafka_2.13-*.jar" >/dev/null &&
    compgen -G "$LIB/kafka-tools-*.jar" >/dev/null
}

install_jars() {
  if installed; then
    return 0
  fi
  command -v "$MVN" >/dev/null || die "maven ($MVN) not found; it is needed once to fetch the Kafka jars"
  say "installing broker jars from Maven Central into infra/kafka/lib ..."
  local t0=$SECONDS
  rm -rf "$LIB"
  # Output is captured: Debian's Maven 3.8 prints stray ANSI resets even with -q.
  local out
  if ! out="$("$MVN" -B -q -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
        -DoutputDirectory="$LIB" -DincludeScope=runtime 2>&1)"; then
    echo "$out" >&2
    rm -rf "$LIB"
    die "maven could not fetch the jars (see the output above)"
  fi
  pom_hash >"$STAMP"   # written last: an interrupted install is redone
  say "installed $(compgen -G "$LIB/*.jar" | wc -l) jars in $((SECONDS - t0)) s"
}

# Run a Kafka command-line class (StorageTool, the readiness probe) in a small,
# fast-starting JVM. Its log4j output goes to tools.log, never to server.log.
TOOL_JAVA=("$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto
  -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$LOG4J" -Dkafka.log.file=tools.log
  -cp "$LIB/*")
run_tool() { "${TOOL_JAVA[@]}" "$@"; }

# Ready = the broker answers an ApiVersions + Metadata round trip.
broker_answers() {
  timeout 30 "${TOOL_JAVA[@]}" org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$BOOTSTRAP" >/dev/null 2>&1
}

# ---------------------------------------------------------------- process ---

port_open() {   # port_open PORT: something accepts TCP connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Is PID a live broker started from our server.properties? (guards against a
# stale pid file whose number was reused by another process)
is_our_broker() {
  local pid="$1" cmd
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmd" == *" kafka.Kafka $PROPS"* ]]
}

# Print the PID of our running broker, if any: from the pid file, else by
# looking for a java process started with exactly our server.properties.
broker_pid() {
  local pid=""
  if [[ -f "$PIDFILE" ]]; then
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    if is_our_broker "$pid"; then
      echo "$pid"
      return 0
    fi
  fi
  local d
  for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    if is_our_broker "$pid"; then
      echo "$pid" >"$PIDFILE"
      echo "$pid"
      return 0
    fi
  done
  return 1
}

who_listens() {   # best effort: which process holds 127.0.0.1:PORT
  command -v ss >/dev/null || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -1
}

show_log_tail() {
  local f
  for f in "$SERVER_LOG" "$OUTFILE"; do
    if [[ -s "$f" ]]; then
      echo "kafka: ---- last 40 lines of $f ----" >&2
      tail -n 40 "$f" >&2
    fi
  done
}

# ------------------------------------------------------------------ config ---

write_config() {
  mkdir -p "$KAFKA_STATE_DIR" "$DATA" "$KAFKA_LOG_DIR"
  cat >"$PROPS.tmp" <<EOF
# Written by infra/kafka/kafka.sh on every 'up'; edits here are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
EOF
  mv "$PROPS.tmp" "$PROPS"
}

format_storage() {
  if [[ -f "$DATA/meta.properties" ]]; then
    return 0
  fi
  local id out
  id="$(run_tool kafka.tools.StorageTool random-uuid | tail -n 1 | tr -d '[:space:]')"
  [[ -n "$id" ]] || die "StorageTool random-uuid printed no cluster id"
  if ! out="$(run_tool kafka.tools.StorageTool format --standalone -t "$id" -c "$PROPS" 2>&1)"; then
    echo "$out" >&2
    die "formatting the KRaft storage in $DATA failed"
  fi
  say "formatted storage in $DATA (cluster id $id)"
}

# --------------------------------------------------------------- commands ---

cmd_up() {
  local pid
  if pid="$(broker_pid)"; then
    say "already running (pid $pid, $BOOTSTRAP)"
    return 0
  fi
  rm -f "$PIDFILE"

  local port holder
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    if port_open "$port"; then
      holder="$(who_listens "$port")"
      die "port 127.0.0.1:$port is already taken by another process${holder:+ ($holder)}; stop it or set KAFKA_PORT / KAFKA_CONTROLLER_PORT"
    fi
  done

  install_jars
  write_config
  format_storage

  : >"$OUTFILE"
  local t0=$SECONDS
  # setsid: the broker leaves our process group, so it outlives this script
  # and a Ctrl-C in the calling terminal.
  # shellcheck disable=SC2086  # heap/JVM options are word lists on purpose
  setsid nohup "$JAVA" $KAFKA_HEAP_OPTS \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J" -Dkafka.log.file=server.log \
    -Dkafka.logs.dir="$KAFKA_LOG_DIR" \
    $KAFKA_JVM_OPTS \
    -cp "$LIB/*" kafka.Kafka "$PROPS" \
    </dev/null >>"$OUTFILE" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$PIDFILE"
  printf 'kafka: starting (pid %s) ' "$pid"

  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo
      rm -f "$PIDFILE"
      show_log_tail
      die "broker exited during startup"
    fi
    if port_open "$KAFKA_PORT" && broker_answers; then
      echo
      say "up on $BOOTSTRAP (pid $pid, ready in $((SECONDS - t0)) s; logs in $KAFKA_LOG_DIR)"
      return 0
    fi
    printf '.'
    sleep 1
  done
  echo
  show_log_tail
  say "broker did not answer within ${KAFKA_START_TIMEOUT} s; stopping it"
  stop_pid "$pid"
  rm -f "$PIDFILE"
  exit 1
}

stop_pid() {   # stop_pid PID: SIGTERM, wait, SIGKILL
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < KAFKA_STOP_TIMEOUT * 5; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  say "pid $pid still alive after ${KAFKA_STOP_TIMEOUT} s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

cmd_down() {
  local purge=0
  case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) usage ;;
  esac
  local pid
  if pid="$(broker_pid)"; then
    local t0=$SECONDS
    stop_pid "$pid"
    say "stopped (pid $pid, $((SECONDS - t0)) s)"
  else
    say "not running"
  fi
  rm -f "$PIDFILE"
  if ((purge)); then
    case "$KAFKA_STATE_DIR" in
      "" | / | "$REPO" | "$HOME") die "refusing to purge KAFKA_STATE_DIR=$KAFKA_STATE_DIR" ;;
    esac
    rm -rf "$KAFKA_STATE_DIR"
    say "purged $KAFKA_STATE_DIR"
  fi
}

cmd_status() {
  local pid
  if pid="$(broker_pid)"; then
    if port_open "$KAFKA_PORT"; then
      say "running (pid $pid, $BOOTSTRAP)"
    else
      say "running (pid $pid), but $BOOTSTRAP is not accepting connections (yet)"
    fi
    return 0
  fi
  say "not running"
  return 3
}

with_lock() {   # serialise up/down against concurrent callers
  if [[ "$1" == cmd_up ]]; then mkdir -p "$KAFKA_STATE_DIR"; fi
  if [[ -d "$KAFKA_STATE_DIR" ]] && command -v flock >/dev/null; then
    exec 9>"$KAFKA_STATE_DIR/.lock"
    flock -w 120 9 || die "another kafka.sh holds $KAFKA_STATE_DIR/.lock"
  fi
  "$@"
}

case "${1:-}" in
  up) shift; [[ $# -eq 0 ]] || usage; with_lock cmd_up ;;
  down) shift; [[ $# -le 1 ]] || usage; with_lock cmd_down "$@" ;;
  status) shift; [[ $# -eq 0 ]] || usage; cmd_status ;;
  *) usage ;;
esac
