#!/bin/bash
# make slurm-test: a one-node Slurm (slurmctld + slurmd on localhost, munge auth) runs
# tools/slurm/train.sbatch (srun launcher, 2 CPU tasks) on tiny synthetic data: the job
# must complete; a second job gets the preemption warning (USR1) mid-run, must requeue
# itself and resume at the step it saved. Skips (exit 0, "SKIP: reason") where Slurm
# cannot start. Not part of `make test`.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY="$ROOT/.venv/bin/python"
DIR=${SLURM_TEST_DIR:-/tmp/pfc-slurm-test}
skip() { echo "SKIP: $*"; exit 0; }
fail() { echo "FAIL: $*"; exit 1; }

if ! command -v slurmctld >/dev/null; then
    [ "$(id -u)" = 0 ] || skip "slurm-wlm is not installed and this is not root"
    (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm) \
        >/dev/null 2>&1 || skip "apt-get install slurm-wlm failed"
fi
[ "$(id -u)" = 0 ] || skip "slurmd needs root here"
rm -rf "$DIR" && mkdir -p "$DIR/state" "$DIR/spool" "$DIR/data"
export SLURM_CONF="$DIR/slurm.conf"
cat >"$SLURM_CONF" <<CONF
ClusterName=pfctest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
NodeName=localhost CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

PIDS=()
cleanup() {
    scancel --quiet --user root 2>/dev/null
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
}
trap cleanup EXIT
if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null
    [ -s /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1
    su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force 2>/dev/null \
        || skip "munged does not start"
fi
slurmctld -f "$SLURM_CONF" || skip "slurmctld does not start (see $DIR/slurmctld.log)"
slurmd -f "$SLURM_CONF" -N localhost || skip "slurmd does not start (see $DIR/slurmd.log)"
for _ in $(seq 30); do
    sinfo -h -o %t 2>/dev/null | grep -q idle && break
    sleep 1
done
sinfo -h -o %t | grep -q idle || skip "the node never became idle: $(sinfo 2>&1 | tail -1)"
echo "slurm up: $(sinfo -h -o '%P %D %t %c')"

"$PY" -c "
from datasets.synthetic import SyntheticConfig, generate
generate('$DIR/data', SyntheticConfig(8, 8, 2, 1, seed=3), workers=0)" || fail "synthetic data"

script() {  # $1: output dir, $2: epochs
    (cd "$ROOT" && "$PY" -m tools.slurm configs/demo "data.root=$DIR/data" \
        data.num_classes=8 data.num_images=64 data.batch_size=4 data.num_workers=0 \
        "train.output=$1" "train.epochs=$2" eval.targets= eval.at_start=false \
        log.tensorboard=false log.every_steps=2 checkpoint.every_steps=0 \
        --launcher srun --nodes 1 --gpus-per-node 0 --procs-per-node 2 --cpus-per-proc 1 \
        --time 15:00 --output "$1.slurm.out" --python "$PY" --env OMP_NUM_THREADS=1)
}
state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
wait_done() {  # $1 job id, $2 timeout s
    for _ in $(seq "$2"); do
        case "$(state "$1")" in COMPLETED) return 0 ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL) return 1 ;; esac
        sleep 1
    done
    return 1
}

# 1. a 2-task job completes
script "$DIR/run1" 2 >"$DIR/run1.sbatch"
JOB=$(sbatch --parsable "$DIR/run1.sbatch") || fail "sbatch refused the script"
wait_done "$JOB" 400 || fail "job $JOB: $(state "$JOB"); $(tail -20 "$DIR/run1.slurm.out")"
[ -f "$DIR/run1/backbone.pt" ] || fail "job $JOB completed without backbone.pt"
echo "PASS: job $JOB (2 tasks) completed"

# 2. the preemption warning mid-run: saves, requeues itself, resumes and completes
script "$DIR/run2" 40 >"$DIR/run2.sbatch"
JOB=$(sbatch --parsable "$DIR/run2.sbatch") || fail "sbatch refused the script"
for _ in $(seq 300); do
    grep -q "step 6/" "$DIR/run2/train.log" 2>/dev/null && break
    sleep 1
done
scancel --batch --signal=USR1 "$JOB" || fail "scancel --signal USR1"
for _ in $(seq 120); do
    [ "$(scontrol show job "$JOB" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)" -ge 1 ] && break
    sleep 1
done
scontrol release "$JOB" 2>/dev/null  # a requeued job may be held
# Slurm holds a requeued job back for about 2 minutes (EligibleTime) before it reruns
wait_done "$JOB" 900 || fail "job $JOB after requeue: $(state "$JOB"); $(tail -20 "$DIR/run2.slurm.out")"
SAVED=$(grep -o "preempted ([A-Z0-9a-z' ]*) at step [0-9]*" "$DIR/run2.slurm.out" | grep -o '[0-9]*$' | head -1)
[ -n "$SAVED" ] || fail "no preemption line in $DIR/run2.slurm.out"
grep -q "starting at step $SAVED" "$DIR/run2/train.log" || fail "the requeued job did not resume at step $SAVED"
echo "PASS: job $JOB preempted at step $SAVED (exit 75), requeued, resumed at step $SAVED, completed"
