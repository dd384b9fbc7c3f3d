# shellcheck shell=bash
# Helpers shared by infra/kafka/kafka.sh and infra/emulators/emulators.sh: messages, install stamps,
# ports, and the life of a background server (find it by pid file or /proc, start it detached, stop
# it), the state lock and purging the state folder.
#
# Sourced, not run. The sourcing script runs under `set -euo pipefail` and sets, before sourcing:
#   SCRIPT_NAME   the message prefix and the script's name without .sh ("kafka", "emulators")
#   REPO          the repository root (purge_dir never deletes it)

say() { echo "$SCRIPT_NAME: $*"; }
die() { echo "$SCRIPT_NAME: $*" >&2; exit 1; }

need() {   # need CMD WHAT WHY: die unless CMD can be run ("WHAT not found; it is needed once to WHY")
  command -v "$1" >/dev/null || die "$2 not found; it is needed once to $3"
}

# ---------------------------------------------------------------- install ---

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

file_holds() {   # file_holds FILE TEXT: FILE exists and holds exactly TEXT (an install stamp, a marker)
  [[ -f "$1" && "$(cat "$1")" == "$2" ]]
}

# ------------------------------------------------------------------ ports ---

port_open() {   # port_open PORT: something accepts TCP connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

who_listens() {   # best effort: which process holds 127.0.0.1:PORT
  command -v ss >/dev/null || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -1
}

# -------------------------------------------------------------- processes ---

proc_cmdline() {   # proc_cmdline PID: print the command line of the live process PID, arguments joined by spaces
  local pid="$1"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null
}

# The checks below are called as `CHECK ARG... PID` and tell whether PID is our server (its pid file
# may be stale, its number reused by another process).

pid_in_file() {   # pid_in_file PIDFILE CHECK [ARG...]: print the pid PIDFILE holds if CHECK accepts it
  local file="$1" pid
  shift
  [[ -f "$file" ]] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  "$@" "$pid" || return 1
  echo "$pid"
}

find_pid() {   # find_pid CHECK [ARG...]: print the first pid in /proc that CHECK accepts (its pid file lost, say)
  local d pid
  for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    if "$@" "$pid"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# start_detached LOG CMD...: run CMD in the background in its own session (setsid: it outlives this
# script and a Ctrl-C in the calling terminal), input closed, output appended to LOG, without the
# state lock's fd 9. Its pid is in $! afterwards.
start_detached() {
  local log="$1"
  shift
  setsid nohup "$@" </dev/null >>"$log" 2>&1 9>&- &
}

signal_pid() {   # signal_pid SIG PID GROUP: send SIG to PID's process group if GROUP is 1 (else, or if that fails, to PID)
  if (($3)) && kill -"$1" -- "-$2" 2>/dev/null; then
    return 0
  fi
  kill -"$1" "$2" 2>/dev/null
}

stop_pid() {   # stop_pid [--group] PID SECONDS: SIGTERM (to PID's process group with --group), wait, then SIGKILL
  local group=0 pid secs i
  if [[ "$1" == --group ]]; then
    group=1
    shift
  fi
  pid="$1" secs="$2"
  signal_pid TERM "$pid" "$group" || return 0
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  say "pid $pid still alive ${secs} s after SIGTERM; sending SIGKILL"
  signal_pid KILL "$pid" "$group" || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

tail_log() {   # tail_log FILE LINES: the last LINES lines of FILE on stderr, under a heading, if it has any
  if [[ -s "$1" ]]; then
    echo "$SCRIPT_NAME: ---- last $2 lines of $1 ----" >&2
    tail -n "$2" "$1" >&2
  fi
}

# ------------------------------------------------------------------ state ---

# lock_state FILE SECONDS: hold an flock on FILE until this script exits, so that concurrent callers
# take turns (none where flock is missing). On fd 9, which start_detached closes: a server must not
# hold the lock after we exit.
lock_state() {
  command -v flock >/dev/null || return 0
  exec 9>"$1"
  flock -w "$2" 9 || die "another $SCRIPT_NAME.sh holds $1"
}

purge_dir() {   # purge_dir VAR DIR: delete the state folder DIR (set by VAR), never /, the repository or $HOME
  case "$2" in
    "" | / | "$REPO" | "$HOME") die "refusing to purge $1=$2" ;;
  esac
  rm -rf "$2"
  say "purged $2"
}
