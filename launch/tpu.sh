#!/usr/bin/env bash
# Runs a stage on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods included), detached from
# this terminal, and keeps it going through preemptions.
#
#   export TPU_NAME=my-v4-64 ZONE=us-central2-b          # PROJECT=... optional
#   bash launch/tpu.sh create                            # queued resource; ACCELERATOR_TYPE=v4-64, SPOT=1
#   bash launch/tpu.sh run --config=configs/pretrain.py:imagenet,r50_2x_sk1 --workdir=gs://b/r50/pretrain
#   bash launch/tpu.sh status                            # running / exited N, last log line, per worker
#   bash launch/tpu.sh logs                              # last lines of every worker's log
#   WORKER=0 FOLLOW=1 bash launch/tpu.sh logs            # follow worker 0
#   bash launch/tpu.sh stop                              # SIGTERM: the run saves a checkpoint and exits
#   bash launch/tpu.sh delete                            # the queued resource and its TPU VM
#   KEEP_ALIVE=1 bash launch/tpu.sh run ARGS             # and recreate + resume after each preemption
#   DRY_RUN=1 bash launch/tpu.sh ...                     # print every gcloud command, run none
#
# run: copies this checkout to ~/$REMOTE_DIR on all workers, installs it with the TPU extra (first
# run only), then starts `python -m $MODULE ARGS` on all workers at once with nohup + setsid, so the
# job outlives the ssh session. Each worker logs to ~/$REMOTE_DIR/logs/run.log and writes its exit
# code to logs/run.exit; `status`, `logs` and `stop` read those. Every worker joins the job through
# jax.distributed.initialize() and reads its own shard of the data. Put workdir and data on GCS
# (gs://...) so every worker sees them: a restarted run resumes from the workdir's last checkpoint.
#
# KEEP_ALIVE=1 keeps this terminal watching (every POLL_S seconds): when the queued resource is
# preempted (SUSPENDED / FAILED), it is deleted, created again, and the same command relaunched,
# which resumes from the checkpoint; at most MAX_RESTARTS times. It ends when worker 0's run exits
# (0: done; anything else is reported, with the logs command, and not retried).
#
# Settings (environment): TPU_NAME, ZONE (required); PROJECT; MODULE (simclrv2_jax.main, or
# simclrv2_jax.run_all for the whole pipeline); REMOTE_DIR (simclrv2_jax); ACCELERATOR_TYPE (v4-8);
# RUNTIME_VERSION (tpu-ubuntu2204-base); SPOT (1: spot capacity); QR_ID ($TPU_NAME-qr);
# POLL_S (60); MAX_RESTARTS (20); WORKER (logs: all); LOG_LINES (logs: 100); FOLLOW (logs: 0); DRY_RUN.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
}

command="${1:-}"
case "$command" in
  run | logs | status | stop | create | delete) shift ;;
  --*) command=run ;;  # `tpu.sh --config=... --workdir=...`, as before the subcommands
  help | -h | --help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
PROJECT="${PROJECT:-}"
MODULE="${MODULE:-simclrv2_jax.main}"
REMOTE_DIR="${REMOTE_DIR:-simclrv2_jax}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
QR_ID="${QR_ID:-$TPU_NAME-qr}"
POLL_S="${POLL_S:-60}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
DRY_RUN="${DRY_RUN:-0}"
KEEP_ALIVE="${KEEP_ALIVE:-0}"
LOGS="~/$REMOTE_DIR/logs"

log() { echo "[tpu] $*" >&2; }

# Every gcloud call goes through here: DRY_RUN=1 prints it instead.
g() {
  local where=(--zone="$ZONE")
  [ -n "$PROJECT" ] && where+=(--project="$PROJECT")
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ gcloud'
    printf ' %q' "$@" "${where[@]}"
    printf '\n'
    return 0
  fi
  gcloud "$@" "${where[@]}"
}

on_workers() {  # on_workers WORKER COMMAND
  g compute tpus tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

qr_state() {
  g compute tpus queued-resources describe "$QR_ID" --format='value(state.state)' 2>/dev/null || true
}

create() {
  local spot=()
  [ "$SPOT" = 1 ] && spot=(--spot)
  log "creating queued resource $QR_ID: $ACCELERATOR_TYPE ($RUNTIME_VERSION) named $TPU_NAME${spot:+, spot}"
  g compute tpus queued-resources create "$QR_ID" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
  [ "$DRY_RUN" = 1 ] && return 0
  local state
  while true; do
    state=$(qr_state)
    case "$state" in
      ACTIVE) log "$QR_ID is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED) log "$QR_ID is $state: capacity not granted"; return 1 ;;
      *) log "$QR_ID is ${state:-not listed yet}; waiting ${POLL_S}s"; sleep "$POLL_S" ;;
    esac
  done
}

delete() {
  log "deleting queued resource $QR_ID and its TPU VM"
  g compute tpus queued-resources delete "$QR_ID" --force --quiet
}

launch() {  # launch ARGS...: copy, install, start detached on every worker
  local tmp args
  tmp=$(mktemp -d /tmp/simclrv2_jax_launch.XXXXXX)
  args=$(printf '%q ' "$@")
  git ls-files -z | tar --null -cf "$tmp/project.tar" -T -
  # The job as a script on the workers, so that no quoting survives two shells.
  cat >"$tmp/job.sh" <<EOF
#!/usr/bin/env bash
# Written by launch/tpu.sh: the command every worker runs.
cd "\$(dirname "\$0")"
trap 'true' TERM  # a stop signals the whole group: Python saves and exits, then its code is kept
SIMCLR_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m $MODULE $args
echo \$? > logs/run.exit
EOF
  tar -rf "$tmp/project.tar" -C "$tmp" job.sh
  gzip -f "$tmp/project.tar"
  log "copying the project to all workers of $TPU_NAME"
  g compute tpus tpu-vm scp "$tmp/project.tar.gz" "$TPU_NAME":/tmp/simclrv2_jax.tar.gz --worker=all
  rm -rf "$tmp"
  log "installing (skipped where already done)"
  on_workers all "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/simclrv2_jax.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && \
bash launch/setup.sh && .venv/bin/pip install -q -e '.[tpu]'"
  log "starting $MODULE on all workers, detached: $args"
  on_workers all "cd ~/$REMOTE_DIR && mkdir -p logs && \
if [ ! -f logs/run.exit ] && [ -f logs/run.pid ] && kill -0 \$(cat logs/run.pid) 2>/dev/null; then echo 'a run is already going (launch/tpu.sh stop)' >&2; exit 1; fi && \
rm -f logs/run.exit && (nohup setsid bash job.sh >>logs/run.log 2>&1 </dev/null & echo \$! >logs/run.pid)"
  log "started; follow with: TPU_NAME=$TPU_NAME ZONE=$ZONE bash launch/tpu.sh logs   (or status / stop)"
}

status() {
  on_workers "${WORKER:-all}" "cd $LOGS 2>/dev/null || { echo \"\$(hostname): never started\"; exit 0; }; \
if [ -f run.exit ]; then s=\"exited \$(cat run.exit)\"; elif [ -f run.pid ] && kill -0 \$(cat run.pid) 2>/dev/null; then s=\"running (pid \$(cat run.pid))\"; else s='not running'; fi; \
echo \"\$(hostname): \$s | \$(tail -n 1 run.log 2>/dev/null)\""
}

worker0_exit() {
  g compute tpus tpu-vm ssh "$TPU_NAME" --worker=0 --command="cat $LOGS/run.exit 2>/dev/null || true" 2>/dev/null || true
}

keep_alive() {  # keep_alive ARGS...
  local restarts=0 state code
  if [ "$DRY_RUN" = 1 ]; then
    log "dry run: would now poll every ${POLL_S}s (queued-resources describe; worker 0's logs/run.exit)"
    return 0
  fi
  while true; do
    sleep "$POLL_S"
    state=$(qr_state)
    if [ "$state" = ACTIVE ]; then
      code=$(worker0_exit | tr -d '[:space:]')
      if [ -z "$code" ]; then continue; fi
      if [ "$code" = 0 ]; then log "the run finished (exit 0)"; return 0; fi
      log "the run stopped with exit code $code (not a preemption; not retried). See: bash launch/tpu.sh logs"
      return 1
    fi
    restarts=$((restarts + 1))
    if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
      log "$QR_ID is ${state:-gone}; $MAX_RESTARTS restarts used, giving up"
      return 1
    fi
    log "$QR_ID is ${state:-gone}: preempted; restart $restarts of $MAX_RESTARTS (resumes from the checkpoint)"
    delete || true
    until create; do
      log "retrying the queued resource in ${POLL_S}s"
      delete || true
      sleep "$POLL_S"
    done
    launch "$@"
  done
}

case "$command" in
  create) create ;;
  delete) delete ;;
  status)
    state=$(qr_state)
    if [ -n "$state" ]; then log "queued resource $QR_ID: $state"; fi
    status
    ;;
  logs)
    if [ "${FOLLOW:-0}" = 1 ]; then
      on_workers "${WORKER:-0}" "tail -n ${LOG_LINES:-100} -F $LOGS/run.log"
    else
      on_workers "${WORKER:-all}" "echo \"== \$(hostname)\"; tail -n ${LOG_LINES:-100} $LOGS/run.log"
    fi
    ;;
  stop)
    log "SIGTERM to the run on all workers: it saves a checkpoint and exits"
    on_workers "${WORKER:-all}" "[ -f $LOGS/run.pid ] && kill -TERM -- -\$(cat $LOGS/run.pid) 2>/dev/null; true"
    ;;
  run)
    if [ "$#" -eq 0 ]; then
      usage
      exit 2
    fi
    launch "$@"
    if [ "$KEEP_ALIVE" = 1 ]; then keep_alive "$@"; fi
    ;;
esac
