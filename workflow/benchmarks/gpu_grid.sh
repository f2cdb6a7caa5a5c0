#!/usr/bin/env bash
# The pre-registered 60000-epoch assisted grid on one GPU, each CTR's 12 runs trained together
# (assisted.group_runs: ctr), with the benchmark of runs trained together. Two steps, so that the
# three slices can travel to a borrowed machine in two transfers:
#
#   bash workflow/benchmarks/gpu_grid.sh start  OUT_DIR PACKED_DIR CTR...   # unpack, bench (first call), start
#   bash workflow/benchmarks/gpu_grid.sh finish OUT_DIR PACKED_DIR DEADLINE_S CTR...
#
# start: unpacks PACKED_DIR/ctr<CTR>.npz (workflow/benchmarks/pack_slice.py) into
#   $RESULTS/assisted/ctr<CTR>/slice.npz and builds its system.pt on the GPU; with BENCH=1 it then
#   runs bench_assisted.py --runs 1 3 9 18 on the first CTR's slice, alone on the GPU; then it starts
#   one equipet-assisted --out-root process per CTR (paper and poisson x scnn and cnn x seeds 0-2,
#   60000 epochs, config/config.yaml with training.checkpoint_every 5000) in its own session, so
#   that it outlives this command.
# finish: the same for its CTRs (no benchmark), then waits for every CTR's process until
#   DEADLINE_S seconds after its own start, stops what still runs (checkpoints stay), and writes
#   OUT_DIR/loss_ctr<CTR>.tar.xz (each run's loss.csv), OUT_DIR/assisted_runs.tar.gz (every run's
#   metrics.csv, timing.json, summary.json, eval.npz and the logs) and
#   OUT_DIR/assisted_checkpoints.tar.gz (the checkpoints of runs that did not finish).
# $RESULTS (default /tmp/equipet_gpu) holds the runs; rerunning resumes them from their checkpoints,
# and PACKED_DIR/checkpoints.tar.gz* (parts of a tar.gz of an earlier pass's assisted/ctr*/*/*/seed*/
# checkpoint.pt and snapshots/, relative to $RESULTS) are restored first, so that a pass that ran
# out of device time continues on another machine.
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

if ls "$PACKED"/checkpoints.tar.gz* >/dev/null 2>&1 && [ ! -f "$RESULTS/.checkpoints_restored" ]; then
    log "restore the checkpoints of an earlier pass ($PACKED/checkpoints.tar.gz*)"
    cat "$PACKED"/checkpoints.tar.gz* | tar xzf - -C "$RESULTS" && touch "$RESULTS/.checkpoints_restored"
fi
for ctr in "${CTRS[@]}"; do
    dir="$RESULTS/assisted/ctr$ctr"
    mkdir -p "$dir"
    if [ ! -f "$dir/system.pt" ]; then
        log "unpack ctr$ctr and build its stored matrix"
        "$PY" workflow/benchmarks/pack_slice.py unpack "$PACKED/ctr$ctr.npz" "$dir/slice.npz" || exit 1
        "$PY" - "$dir/slice.npz" "$DEVICE" <<'EOF' 2>&1 | tee -a "$RESULTS/logs/gpu_grid.log" || exit 1
import sys, time, numpy as np, torch
from equipet.assisted.central_slice import slice_system_matrix
t0 = time.perf_counter()
system = slice_system_matrix(dict(np.load(sys.argv[1])), sys.argv[2], 1 << 20)
torch.save(system.to("cpu").state_dict(), sys.argv[1].replace("slice.npz", "system.pt"))
print(f"system.pt: {system.n_events} events, {system.nnz} non-zeros, built and saved in {time.perf_counter() - t0:.1f} s")
EOF
    fi
done

if [ "${BENCH:-0}" = 1 ]; then
    log "bench_assisted --runs 1 3 9 18 (alone on the device)"
    "$PY" workflow/benchmarks/bench_assisted.py --config config/config.yaml --slice "$RESULTS/assisted/ctr${CTRS[0]}/slice.npz" \
        --events 2000000 --epochs "${BENCH_EPOCHS:-20}" --device "$DEVICE" --methods paper poisson --runs 1 3 9 18 \
        --out "$OUT/bench_assisted_runs.csv" 2>&1 | grep -v Warning | tee "$OUT/bench_assisted_runs.txt"
fi

for ctr in "${CTRS[@]}"; do
    log "start the 12 runs of ctr$ctr together"
    setsid "$PY" -c "from equipet.commands.assisted.methods import main; main()" --config config/config.yaml "$RESULTS/gpu.yaml" \
        --slice "$RESULTS/assisted/ctr$ctr/slice.npz" --system "$RESULTS/assisted/ctr$ctr/system.pt" \
        --method paper poisson --model scnn cnn --seed 0 1 2 --out-root "$RESULTS/assisted/ctr$ctr" \
        --log "$RESULTS/logs/assisted_ctr${ctr}.log" > "$RESULTS/logs/assisted_ctr${ctr}.out" 2>&1 < /dev/null &
    echo $! > "$RESULTS/logs/assisted_ctr${ctr}.pid"
done
[ "$MODE" = start ] && { log "started"; exit 0; }

pids=$(cat "$RESULTS"/logs/assisted_ctr*.pid)
while [ $(( $(date +%s) - start )) -lt "$DEADLINE_S" ]; do
    running=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && running=$((running + 1)); done
    [ "$running" -eq 0 ] && break
    sleep 5
done
for p in $pids; do
    if kill -0 "$p" 2>/dev/null; then log "deadline: stopping process $p"; kill -TERM "$p"; fi
done
sleep 3
log "runs:"
for f in "$RESULTS"/assisted/ctr*/*/*/seed*/loss.csv; do
    [ -f "$f" ] && log "$f: $(($(wc -l < "$f") - 1)) epochs$([ -f "$(dirname "$f")/metrics.csv" ] && echo ', finished')"
done
tail -n 5 "$RESULTS"/logs/assisted_ctr*.out | tee -a "$RESULTS/logs/gpu_grid.log"
cd "$RESULTS"
for ctr in assisted/ctr*; do
    tar cJf "$OUT/loss_${ctr#assisted/}.tar.xz" $(ls "$ctr"/*/*/seed*/loss.csv 2>/dev/null)
done
tar czf "$OUT/assisted_runs.tar.gz" --exclude=checkpoint.pt --exclude=model.pt --exclude=snapshots --exclude=slice.npz \
    --exclude=system.pt --exclude=loss.csv assisted logs
unfinished=$(for d in assisted/ctr*/*/*/seed*; do [ -f "$d/metrics.csv" ] || echo "$d/checkpoint.pt"; done \
             | while read -r f; do [ -f "$f" ] && echo "$f"; done)
[ -n "$unfinished" ] && tar czf "$OUT/assisted_checkpoints.tar.gz" $unfinished
ls -la "$OUT"
