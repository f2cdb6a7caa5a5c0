#!/usr/bin/env bash
# The pre-registered 60000-epoch assisted grid on one GPU, each CTR's 12 runs trained together
# (assisted.group_runs: ctr), with the benchmark of runs trained together. Two steps, so that the
# three slices can travel to a borrowed machine in two transfers:
#
#   bash workflow/benchmarks/gpu_grid.sh start  OUT_DIR PACKED_DIR CTR...   # unpack, bench (first call), start
#   bash workflow/benchmarks/gpu_grid.sh finish OUT_DIR PACKED_DIR DEADLINE_S CTR...
#
# start: unpacks PACKED_DIR/ctr<CTR>.npz or PACKED_DIR/ctr<CTR>/slice.packed.npz (workflow/benchmarks/
#   pack_slice.py; the second is the layout of run_assisted.py's archive, so PACKED_DIR may be that) into
#   $RESULTS/assisted/ctr<CTR>/slice.npz and builds its system.pt on the GPU; with BENCH=1 it then
#   runs bench_assisted.py --runs 1 3 9 18 on the first CTR's slice, alone on the GPU; then it starts
#   one equipet-assisted --out-root process per CTR (paper and poisson x scnn and cnn x seeds 0-2,
#   60000 epochs, config/config.yaml with training.checkpoint_every 5000) in its own session, so
#   that it outlives this command.
# finish: the same for its CTRs (no benchmark; none is fine: it then waits for the processes an
#   earlier call started), then waits for every process until DEADLINE_S seconds after its own
#   start. With STOP_AT=E (a multiple of training.checkpoint_every) a process is stopped once it is
#   past epoch E, its checkpoint of E written. With KEEP_RUNNING=1 it returns at the deadline if
#   some still run (the next call waits on), after packing their checkpoints; else it stops what
#   still runs (checkpoints stay) and writes, most needed first:
#   OUT_DIR/assisted_checkpoints.tar.xz.part_* (15 MB parts of the checkpoints and snapshots of the
#   runs that did not finish, as PACKED_DIR/checkpoints.tar.* takes them back),
#   OUT_DIR/assisted_runs.tar.xz.part_* (every run's metrics.csv, timing.json, summary.json and
#   eval.npz, the last snapshot of each finished run, and the logs) and OUT_DIR/loss_ctr<CTR>.tar.xz
#   (each run's loss.csv). xz -1 on every core keeps the packing to seconds.
# SPLIT=ctr (default) trains each CTR's 12 runs in one process; SPLIT=model in two, one per network
#   (6 runs each). On an H200 both give the same throughput, about 1650 run-epochs/s
#   (measured/README.md): the device is the limit, not one process's launches.
# $RESULTS (default /tmp/equipet_gpu) holds the runs; rerunning resumes them from their checkpoints,
# and PACKED_DIR/checkpoints.tar.gz* or .tar.xz* (parts of a tar of an earlier pass's
# assisted/ctr*/*/*/seed*/checkpoint.pt and snapshots/, relative to $RESULTS) are restored first
# (that pass's logs go to logs/earlier_pass/), so that a pass that ran out of device time
# continues on another machine.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODE="$1"; OUT="$2"; PACKED="$3"; shift 3
DEADLINE_S=0
if [ "$MODE" = finish ]; then DEADLINE_S="$1"; shift; fi
CTRS=("$@")
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
RESULTS="${RESULTS:-/tmp/equipet_gpu}"
EPOCHS="${EPOCHS:-60000}"
mkdir -p "$OUT" "$RESULTS/logs"
start=$(date +%s)
log() { printf '[%4ds] %s\n' "$(( $(date +%s) - start ))" "$*" | tee -a "$RESULTS/logs/gpu_grid.log"; }
cat > "$RESULTS/gpu.yaml" <<EOF
device: $DEVICE
training:
  checkpoint_every: ${CHECKPOINT_EVERY:-5000}
assisted:
  epochs: $EPOCHS
  snapshots: [$( "$PY" -c "print(', '.join(str(s) for s in [500, 1000, 5000, 20000, 60000] if s <= $EPOCHS) or $EPOCHS)" )]
EOF

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$RESULTS/logs/gpu.txt"
"$PY" -c "import torch, escnn, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)" \
    2>&1 | tee -a "$RESULTS/logs/gpu.txt"

if ls "$PACKED"/checkpoints.tar.* >/dev/null 2>&1 && [ ! -f "$RESULTS/.checkpoints_restored" ]; then
    log "restore the checkpoints of an earlier pass ($PACKED/checkpoints.tar.*)"
    # that pass's logs (and its process ids) go to logs/earlier_pass/, out of this pass's way
    z=z; ls "$PACKED"/checkpoints.tar.xz* >/dev/null 2>&1 && z=J
    cat "$PACKED"/checkpoints.tar.* | tar "x${z}f" - -C "$RESULTS" --transform 's,^logs/,logs/earlier_pass/,' \
        && touch "$RESULTS/.checkpoints_restored"
fi
for ctr in "${CTRS[@]}"; do
    dir="$RESULTS/assisted/ctr$ctr"
    mkdir -p "$dir"
    if [ ! -f "$dir/system.pt" ]; then
        log "unpack ctr$ctr and build its stored matrix"
        packed="$PACKED/ctr$ctr.npz"   # else the layout of run_assisted.py's archive
        [ -f "$packed" ] || packed="$PACKED/ctr$ctr/slice.packed.npz"
        "$PY" workflow/benchmarks/pack_slice.py unpack "$packed" "$dir/slice.npz" || exit 1
        "$PY" workflow/benchmarks/pack_slice.py system "$dir/slice.npz" config/config.yaml "$RESULTS/gpu.yaml" 2>&1 \
            | tee -a "$RESULTS/logs/gpu_grid.log" || exit 1
    fi
done

if [ "${BENCH:-0}" = 1 ]; then
    log "bench_assisted --runs 1 3 9 18 (alone on the device)"
    "$PY" workflow/benchmarks/bench_assisted.py --config config/config.yaml --slice "$RESULTS/assisted/ctr${CTRS[0]}/slice.npz" \
        --events 2000000 --epochs "${BENCH_EPOCHS:-20}" --device "$DEVICE" --methods paper poisson --runs 1 3 9 18 \
        --out "$OUT/bench_assisted_runs.csv" 2>&1 | grep -v Warning | tee "$OUT/bench_assisted_runs.txt"
fi

case "${SPLIT:-ctr}" in
    ctr) GROUPS_OF=("scnn cnn") ;;
    model) GROUPS_OF=(scnn cnn) ;;
    *) echo "SPLIT must be ctr or model, got ${SPLIT}" >&2; exit 2 ;;
esac
for ctr in "${CTRS[@]}"; do
    for models in "${GROUPS_OF[@]}"; do
        name="ctr${ctr}$([ "${#GROUPS_OF[@]}" -gt 1 ] && echo "_$models")"
        log "start the runs of $name together (paper poisson x $models x seeds 0-2)"
        # shellcheck disable=SC2086  # $models is one or two network names
        OMP_NUM_THREADS=1 setsid "$PY" -c "from equipet.commands.assisted.methods import main; main()" \
            --config config/config.yaml "$RESULTS/gpu.yaml" \
            --slice "$RESULTS/assisted/ctr$ctr/slice.npz" --system "$RESULTS/assisted/ctr$ctr/system.pt" \
            --method paper poisson --model $models --seed 0 1 2 --out-root "$RESULTS/assisted/ctr$ctr" \
            --log "$RESULTS/logs/assisted_${name}.log" > "$RESULTS/logs/assisted_${name}.out" 2>&1 < /dev/null &
        echo $! > "$RESULTS/logs/assisted_${name}.pid"
    done
done
[ "$MODE" = start ] && { log "started"; exit 0; }

epoch_of() {   # the last epoch a process's progress bar shows
    tr '\r' '\n' < "$1" | grep -ao "[0-9]*/$EPOCHS" | tail -n 1 | cut -d/ -f1
}
progress() {
    for f in "$RESULTS"/assisted/ctr*/*/*/seed*/loss.csv; do
        [ -f "$f" ] && log "$f: $(($(wc -l < "$f") - 1)) epochs$([ -f "$(dirname "$f")/metrics.csv" ] && echo ', finished')"
    done
    for f in "$RESULTS"/logs/assisted_ctr*.out; do
        log "$(basename "$f"): $(tr '\r' '\n' < "$f" | grep -a 'runs' | tail -n 1)"
    done
}
pack_checkpoints() {   # first, since they are what a later pass needs (fast: xz -1 on every core)
    rm -f "$OUT"/assisted_checkpoints.tar.xz.part_*
    local unfinished
    unfinished=$(cd "$RESULTS" && for d in assisted/ctr*/*/*/seed*; do
                     [ -f "$d/metrics.csv" ] || [ ! -f "$d/checkpoint.pt" ] || echo "$d/checkpoint.pt $d/snapshots"; done)
    # shellcheck disable=SC2086
    [ -n "$unfinished" ] && (cd "$RESULTS" && tar cf - $unfinished 2>/dev/null | xz -T0 -1 \
        | split -b 15000000 - "$OUT/assisted_checkpoints.tar.xz.part_")
    log "checkpoints packed: $(ls "$OUT"/assisted_checkpoints.tar.xz.part_* 2>/dev/null | wc -l) part(s)"
}

pids=$(cat "$RESULTS"/logs/assisted_ctr*.pid)
running=0
while [ $(( $(date +%s) - start )) -lt "$DEADLINE_S" ]; do
    running=0
    for f in "$RESULTS"/logs/assisted_ctr*.pid; do
        p=$(cat "$f")
        kill -0 "$p" 2>/dev/null || continue
        e=$(epoch_of "${f%.pid}.out")
        if [ -n "${STOP_AT:-}" ] && [ "${e:-0}" -gt $((STOP_AT + 10)) ]; then   # its checkpoint of STOP_AT is written
            log "$(basename "${f%.pid}") passed epoch $STOP_AT ($e): stopped"; kill -TERM "$p"; continue
        fi
        running=$((running + 1))
    done
    [ "$running" -eq 0 ] && break
    sleep 2
done
if [ "${KEEP_RUNNING:-0}" = 1 ] && [ "$running" -gt 0 ]; then
    log "deadline: $running process(es) still run; the next call waits on"
    progress
    pack_checkpoints
    exit 0
fi
for p in $pids; do
    if kill -0 "$p" 2>/dev/null; then log "deadline: stopping process $p"; kill -TERM "$p"; fi
done
sleep 3
log "runs:"
progress
grep -ah -B2 -A8 'Error' "$RESULTS"/logs/assisted_ctr*.out | tail -n 40 | tee -a "$RESULTS/logs/gpu_grid.log"
pack_checkpoints
cd "$RESULTS"
last=$(for d in assisted/ctr*/*/*/seed*; do [ -f "$d/metrics.csv" ] && ls "$d"/snapshots/*.npy 2>/dev/null | sort | tail -n 1; done)
tar cf "$RESULTS/runs.tar" --exclude=checkpoint.pt --exclude=model.pt --exclude=snapshots --exclude=slice.npz \
    --exclude=system.pt --exclude=loss.csv assisted logs
# shellcheck disable=SC2086
[ -n "$last" ] && tar rf "$RESULTS/runs.tar" $last
xz -T0 -1 -c "$RESULTS/runs.tar" | split -b 15000000 - "$OUT/assisted_runs.tar.xz.part_"
rm -f "$RESULTS/runs.tar"
for ctr in assisted/ctr*; do
    losses=$(ls "$ctr"/*/*/seed*/loss.csv 2>/dev/null)
    # shellcheck disable=SC2086
    [ -n "$losses" ] && tar cf - $losses | xz -T0 -1 > "$OUT/loss_${ctr#assisted/}.tar.xz"
done
ls -la "$OUT"
