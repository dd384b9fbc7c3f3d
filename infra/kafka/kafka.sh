#!/usr/bin/env bash
# Single-node Apache Kafka 4.x broker (KRaft, combined broker+controller) for
# skyfuse development and CI, run from Maven Central jars only.
#
#   bash infra/kafka/kafka.sh up            install jars if needed, format, start, wait until ready
#   bash infra/kafka/kafka.sh down          stop the broker, keep its data
#   bash infra/kafka/kafka.sh down --purge  stop the broker and delete $KAFKA_STATE_DIR
#   bash infra/kafka/kafka.sh status        exit 0 if running, 3 if not
#   bash infra/kafka/kafka.sh certs         make the TLS files and SCRAM password if missing (`up` does too)
#
# Listeners: PLAINTEXT (no auth; what the tests and the demo use) and SASL_SSL (TLS with a local
# CA, then a SCRAM-SHA-256/512 or OAUTHBEARER login), both on 127.0.0.1. SASL_SSL clients find
# what they need in $KAFKA_TLS_DIR (git-ignored; made by `make kafka-tls`, or here when missing):
#   ca.pem                      the local CA to trust (ca.key, which signs, stays in the folder)
#   broker.pem                  the broker's key and certificate chain (SAN localhost, 127.0.0.1)
#   scram-user, scram-password  the SCRAM login ($KAFKA_SCRAM_USER, a generated password)
#   client.properties           for the Java tools (--command-config): SCRAM-SHA-512 over SASL_SSL
#
# Knobs (environment):
#   KAFKA_PORT=9092             PLAINTEXT listener, 127.0.0.1 only
#   KAFKA_CONTROLLER_PORT=9093  KRaft controller listener, 127.0.0.1 only
#   KAFKA_SASL_SSL_PORT=9094    SASL_SSL listener (SCRAM-SHA-256/512, OAUTHBEARER), 127.0.0.1 only
#   KAFKA_TLS_DIR=<repo>/.skyfuse/kafka-tls   certificates and the SCRAM password
#   KAFKA_SCRAM_USER=skyfuse    the SCRAM user, used when the TLS folder is made
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
SCRIPT_NAME=kafka
# shellcheck source=../lib/common.sh
source "$REPO/infra/lib/common.sh"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-9094}"
KAFKA_TLS_DIR="${KAFKA_TLS_DIR:-$REPO/.skyfuse/kafka-tls}"
KAFKA_SCRAM_USER="${KAFKA_SCRAM_USER:-skyfuse}"
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
SECURE_BOOTSTRAP="127.0.0.1:$KAFKA_SASL_SSL_PORT"
SCRAM_MARK="$KAFKA_STATE_DIR/scram.sha256"   # which user:password the metadata log holds
STARTED_WITH="$KAFKA_STATE_DIR/started-with" # TLS files and SASL_SSL port of the running broker

usage() {
  echo "usage: $0 up | down [--purge] | status | certs" >&2
  exit 2
}

# ---------------------------------------------------------------- install ---

installed() {
  file_holds "$STAMP" "$(sha_of "$POM")" &&
    compgen -G "$LIB/kafka_2.13-*.jar" >/dev/null &&
    compgen -G "$LIB/kafka-tools-*.jar" >/dev/null
}

install_jars() {
  if installed; then
    return 0
  fi
  need "$MVN" "maven ($MVN)" "fetch the Kafka jars"
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
  sha_of "$POM" >"$STAMP"   # written last: an interrupted install is redone
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

# The same through the SASL_SSL listener: TLS to our CA, then a SCRAM-SHA-512 login.
secure_broker_answers() {
  timeout 30 "${TOOL_JAVA[@]}" org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$SECURE_BOOTSTRAP" --command-config "$KAFKA_TLS_DIR/client.properties" >/dev/null 2>&1
}

# -------------------------------------------------------------------- TLS ---

certs_ok() {   # complete, and the broker certificate good for another day (when openssl can tell)
  local f
  for f in ca.pem broker.pem scram-user scram-password client.properties; do
    [[ -s "$KAFKA_TLS_DIR/$f" ]] || return 1
  done
  ! command -v openssl >/dev/null || openssl x509 -checkend 86400 -noout -in "$KAFKA_TLS_DIR/broker.pem" >/dev/null 2>&1
}

# The CA, broker certificate and SCRAM login (make-certs.sh), made in a temporary folder and
# renamed into place, so that a half-made set is never used.
make_certs() {
  if certs_ok; then
    return 0
  fi
  need openssl openssl "make the broker's TLS certificates"
  mkdir -p "$(dirname "$KAFKA_TLS_DIR")"
  local tmp out
  tmp="$(mktemp -d "${KAFKA_TLS_DIR%/}.tmp.XXXXXX")"
  if ! out="$(bash "$HERE/make-certs.sh" "$tmp" "$KAFKA_TLS_DIR" "$KAFKA_SCRAM_USER" 2>&1)"; then
    echo "$out" >&2
    rm -rf "$tmp"
    die "openssl could not make the TLS files for $KAFKA_TLS_DIR (see the output above)"
  fi
  rm -rf "$KAFKA_TLS_DIR"   # an incomplete or expiring set
  mv -T "$tmp" "$KAFKA_TLS_DIR"
  say "made a local CA, the broker certificate and a SCRAM password for '$KAFKA_SCRAM_USER' in $KAFKA_TLS_DIR"
}

scram_user() { tr -d '[:space:]' <"$KAFKA_TLS_DIR/scram-user"; }
scram_password() { tr -d '[:space:]' <"$KAFKA_TLS_DIR/scram-password"; }
scram_hash() { printf '%s:%s' "$(scram_user)" "$(scram_password)" | sha256sum | cut -d' ' -f1; }
started_with() {
  printf '%s:%s' "$(cat "$KAFKA_TLS_DIR/broker.pem" "$KAFKA_TLS_DIR/scram-password" | sha256sum | cut -d' ' -f1)" \
    "$KAFKA_SASL_SSL_PORT"
}

# ---------------------------------------------------------------- process ---

# Is PID a live broker started from our server.properties?
is_our_broker() {
  local cmd
  cmd="$(proc_cmdline "$1")" || return 1
  [[ "$cmd" == *" kafka.Kafka $PROPS"* ]]
}

# Print the PID of our running broker, if any: from the pid file, else by
# looking for a java process started with exactly our server.properties.
broker_pid() {
  local pid
  if pid="$(pid_in_file "$PIDFILE" is_our_broker)"; then
    echo "$pid"
    return 0
  fi
  pid="$(find_pid is_our_broker)" || return 1
  echo "$pid" >"$PIDFILE"
  echo "$pid"
}

show_log_tail() {
  tail_log "$SERVER_LOG" 40
  tail_log "$OUTFILE" 40
}

# ------------------------------------------------------------------ config ---

write_config() {
  mkdir -p "$KAFKA_STATE_DIR" "$DATA" "$KAFKA_LOG_DIR"
  cat >"$PROPS.tmp" <<EOF
# Written by infra/kafka/kafka.sh on every 'up'; edits here are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
# SASL_SSL: TLS with the broker certificate of $KAFKA_TLS_DIR (clients show none), then a SCRAM
# login checked against the credentials in the metadata log, or OAUTHBEARER with Kafka's
# development validator (unsigned JWTs: it tests token providers; a real cluster checks them).
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$KAFKA_TLS_DIR/broker.pem
listener.name.sasl_ssl.ssl.client.auth=none
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,OAUTHBEARER
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;
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
  # The SCRAM credentials go into the first metadata records: SASL logins work from the start.
  # (The password is on this short-lived tool's command line: a local, generated one.)
  local user pw m scram=()
  user="$(scram_user)" pw="$(scram_password)"
  for m in SCRAM-SHA-256 SCRAM-SHA-512; do scram+=(--add-scram "$m=[name=$user,password=$pw]"); done
  if ! out="$(run_tool kafka.tools.StorageTool format --standalone -t "$id" -c "$PROPS" "${scram[@]}" 2>&1)"; then
    echo "${out//$pw/<redacted>}" >&2
    die "formatting the KRaft storage in $DATA failed"
  fi
  scram_hash >"$SCRAM_MARK"
  say "formatted storage in $DATA (cluster id $id, SCRAM user $user)"
}

# Storage formatted before the SASL_SSL listener existed, or a TLS folder made anew since: set
# the SCRAM credentials through the local, unauthenticated PLAINTEXT listener (an upsert), then
# wait until a SCRAM login over SASL_SSL works.
ensure_scram_users() {
  local want
  want="$(scram_hash)"
  if file_holds "$SCRAM_MARK" "$want"; then
    return 0
  fi
  local out user pw m
  user="$(scram_user)" pw="$(scram_password)"
  for m in SCRAM-SHA-256 SCRAM-SHA-512; do   # one mechanism per request: the broker refuses two
    if ! out="$(run_tool org.apache.kafka.tools.ConfigCommand --bootstrap-server "$BOOTSTRAP" --alter \
        --entity-type users --entity-name "$user" --add-config "$m=[password=$pw]" 2>&1)"; then
      echo "${out//$pw/<redacted>}" >&2
      return 1
    fi
  done
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  until secure_broker_answers; do
    ((SECONDS < deadline)) || { say "a SCRAM login on $SECURE_BOOTSTRAP still fails" >&2; return 1; }
    sleep 1
  done
  echo "$want" >"$SCRAM_MARK"
  say "set the SCRAM credentials of '$user' (the storage had other or none)"
}

# --------------------------------------------------------------- commands ---

cmd_up() {
  local pid
  with_certs_lock make_certs
  if pid="$(broker_pid)"; then
    say "already running (pid $pid, $BOOTSTRAP, SASL_SSL $SECURE_BOOTSTRAP)"
    # Started by an older kafka.sh (no SASL_SSL) or before the TLS folder was made anew: say so
    # rather than restart a broker someone may be using.
    if ! file_holds "$STARTED_WITH" "$(started_with)"; then
      say "warning: it runs with other TLS/SASL settings than $KAFKA_TLS_DIR; restart it to apply them:" \
        "bash infra/kafka/kafka.sh down && bash infra/kafka/kafka.sh up" >&2
    fi
    return 0
  fi
  rm -f "$PIDFILE"

  local port holder
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_SSL_PORT"; do
    if port_open "$port"; then
      holder="$(who_listens "$port")"
      die "port 127.0.0.1:$port is already taken by another process${holder:+ ($holder)}; stop it or set KAFKA_PORT / KAFKA_CONTROLLER_PORT / KAFKA_SASL_SSL_PORT"
    fi
  done

  install_jars
  write_config
  format_storage

  : >"$OUTFILE"
  local t0=$SECONDS
  # shellcheck disable=SC2086  # heap/JVM options are word lists on purpose
  start_detached "$OUTFILE" "$JAVA" $KAFKA_HEAP_OPTS \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J" -Dkafka.log.file=server.log \
    -Dkafka.logs.dir="$KAFKA_LOG_DIR" \
    $KAFKA_JVM_OPTS \
    -cp "$LIB/*" kafka.Kafka "$PROPS"
  pid=$!
  echo "$pid" >"$PIDFILE"
  started_with >"$STARTED_WITH"
  printf 'kafka: starting (pid %s) ' "$pid"

  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo
      rm -f "$PIDFILE"
      show_log_tail
      die "broker exited during startup"
    fi
    if port_open "$KAFKA_PORT" && port_open "$KAFKA_SASL_SSL_PORT" && broker_answers; then
      echo
      if ! ensure_scram_users; then
        say "SCRAM logins on $SECURE_BOOTSTRAP do not work (see $SERVER_LOG); stopping the broker"
        stop_pid "$pid" "$KAFKA_STOP_TIMEOUT"
        rm -f "$PIDFILE"
        exit 1
      fi
      say "up on $BOOTSTRAP and SASL_SSL $SECURE_BOOTSTRAP (pid $pid, ready in $((SECONDS - t0)) s; logs in $KAFKA_LOG_DIR)"
      return 0
    fi
    printf '.'
    sleep 1
  done
  echo
  show_log_tail
  say "broker did not answer within ${KAFKA_START_TIMEOUT} s; stopping it"
  stop_pid "$pid" "$KAFKA_STOP_TIMEOUT"
  rm -f "$PIDFILE"
  exit 1
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
    stop_pid "$pid" "$KAFKA_STOP_TIMEOUT"
    say "stopped (pid $pid, $((SECONDS - t0)) s)"
  else
    say "not running"
  fi
  rm -f "$PIDFILE" "$STARTED_WITH"
  if ((purge)); then
    purge_dir KAFKA_STATE_DIR "$KAFKA_STATE_DIR"
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

with_certs_lock() {   # two callers at once make one set, not two
  mkdir -p "$(dirname "$KAFKA_TLS_DIR")"
  if command -v flock >/dev/null; then
    exec 8>"${KAFKA_TLS_DIR%/}.lock"
    flock -w 120 8 || die "another kafka.sh holds ${KAFKA_TLS_DIR%/}.lock"
  fi
  "$@"
  if command -v flock >/dev/null; then exec 8>&-; fi
}

with_lock() {   # serialise up/down against concurrent callers
  if [[ "$1" == cmd_up ]]; then mkdir -p "$KAFKA_STATE_DIR"; fi
  if [[ -d "$KAFKA_STATE_DIR" ]]; then lock_state "$KAFKA_STATE_DIR/.lock" 120; fi
  "$@"
}

case "${1:-}" in
  up) shift; [[ $# -eq 0 ]] || usage; with_lock cmd_up ;;
  down) shift; [[ $# -le 1 ]] || usage; with_lock cmd_down "$@" ;;
  status) shift; [[ $# -eq 0 ]] || usage; cmd_status ;;
  certs) shift; [[ $# -eq 0 ]] || usage; with_certs_lock make_certs ;;
  *) usage ;;
esac
