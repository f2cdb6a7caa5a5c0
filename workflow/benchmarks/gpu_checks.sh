#!/usr/bin/env bash
# Every GPU measurement of equipet in one pass, for a machine with one CUDA GPU:
#
#   bash workflow/benchmarks/gpu_checks.sh OUT_DIR [DEADLINE_S] [SEEDS]
#
# 1. alone on the GPU (clean timings): bench_projector.py and bench_assisted.py (the
#    paper acquisition's slice events when results/assisted/ctr100/slice.npz exists);
# 2. then, side by side until DEADLINE_S seconds after the start (default 3000):
#    * the paper configuration's assisted runs at CTR 100 ps, every method of
#      assisted.methods, both networks, the given seeds (default "0"), 60000 epochs (or to the
#      plateau with ASSISTED_CFG=config/early_stop.yaml), on the slice of the paper
#      acquisition (its stored matrix is built here on the GPU);
#    * the pre-registered ablation (run_ablation.py --only all: screen, selection,
#      confirmation, then the rest of the grid).
#    Runs still going at the deadline are stopped: their checkpoint.pt and loss.csv stay, and
#    rerunning the script (or the workflow) resumes them.
# OUT_DIR receives the benchmark CSVs, the logs and tar.gz archives of the finished runs
# (checkpoints and model weights left out). Python: $PYTHON (default python3), with equipet
# importable.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${1:?usage: gpu_checks.sh OUT_DIR [DEADLINE_S] [SEEDS]}"
DEADLINE_S="${2:-3000}"
SEEDS="${3:-0}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"                         # cpu: a dry run of this script's mechanics
CFG="${CFG:-config/config.yaml}"
ABLATION_CFG="${ABLATION_CFG:-config/ablation.yaml}"
SLICE=results/assisted/ctr100/slice.npz
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }
log() { printf '[%4ds] %s\n' "$(( $(date +%s) - start ))" "$*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
"$PY" -c "import torch, escnn, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'escnn', escnn.__version__ if hasattr(escnn, '__version__') else '?')"

log "bench_projector (GPU and the machine's CPU)"
base_arg=()
[ -n "${BASELINE:-}" ] && base_arg=(--baseline "$BASELINE")   # e.g. the previous projector.py
"$PY" workflow/benchmarks/bench_projector.py --config "$CFG" --events 200000 --device "$DEVICE" "${base_arg[@]}" \
    --out "$OUT/bench_projector.csv" 2>&1 | grep -v Warning | tee "$OUT/bench_projector.txt"
log "bench_assisted (GPU, 1.5e6 slice events)"
slice_arg=()
[ -f "$SLICE" ] && slice_arg=(--slice "$SLICE")
"$PY" workflow/benchmarks/bench_assisted.py --config "$CFG" --events "${ASSISTED_EVENTS:-1500000}" --epochs 30 --device "$DEVICE" \
    "${slice_arg[@]}" --out "$OUT/bench_assisted.csv" 2>&1 | grep -v Warning | tee "$OUT/bench_assisted.txt"

pids=()
if [ -f "$SLICE" ]; then
    log "stored slice matrix of $SLICE"
    "$PY" - "$SLICE" <<'EOF' 2>&1 | tee "$OUT/system.txt"
import sys, time, numpy as np, torch
from equipet.assisted.central_slice import slice_system_matrix
t0 = time.perf_counter()
data = dict(np.load(sys.argv[1]))
system = slice_system_matrix(data, "cuda" if torch.cuda.is_available() else "cpu", 1 << 20)
torch.save(system.to("cpu").state_dict(), sys.argv[1].replace("slice.npz", "system.pt"))
print(f"system.pt: {system.n_events} events, {system.nnz} non-zeros, built and saved in {time.perf_counter() - t0:.1f} s")
EOF
    methods=$("$PY" -c "from equipet.config import load_config; print(' '.join(load_config(['$CFG'])['assisted']['methods']))")
    for method in $methods; do for model in scnn cnn; do for seed in $SEEDS; do
        dir=results/assisted/ctr100/$method/$model/seed$seed
        mkdir -p "$dir" results/logs/assisted
        log "start assisted $method $model seed $seed"
        "$PY" -c "from equipet.commands.assisted.methods import main; main()" --config "$CFG" ${ASSISTED_CFG:-} --slice "$SLICE" \
            --system results/assisted/ctr100/system.pt --method "$method" --model "$model" --seed "$seed" \
            --out-dir "$dir" --log "results/logs/assisted/ctr100_${method}_${model}_seed${seed}.log" \
            > "$OUT/assisted_${method}_${model}_seed${seed}.txt" 2>&1 &
        pids+=($!)
    done; done; done
fi
log "ablation (run_ablation.py --only all)"
"$PY" workflow/benchmarks/run_ablation.py --configfile "$CFG" "$ABLATION_CFG" --device "$DEVICE" --jobs "${JOBS:-10}" \
    --only all > "$OUT/ablation.txt" 2>&1 &
abl=$!

while [ "$(left)" -gt 0 ]; do
    running=0
    for p in "${pids[@]}" "$abl"; do kill -0 "$p" 2>/dev/null && running=$((running + 1)); done
    [ "$running" -eq 0 ] && break
    sleep 5
done
if [ "$(left)" -le 0 ]; then
    log "deadline: stopping what still runs"
    pkill -TERM -P "$abl" 2>/dev/null; kill -TERM "$abl" "${pids[@]}" 2>/dev/null
    pkill -TERM -f "equipet.commands.study.ablation import main" 2>/dev/null
    sleep 3
fi
for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
log "assisted runs:"
for f in results/assisted/ctr100/*/*/seed*/timing.json; do [ -f "$f" ] && echo "$f: $(tr -d '\n ' < "$f")"; done
for f in results/assisted/ctr100/*/*/seed*/loss.csv; do [ -f "$f" ] && echo "$f: $(($(wc -l < "$f") - 1)) epochs"; done
tail -n 40 "$OUT/ablation.txt"
tar czf "$OUT/assisted_ctr100.tar.gz" --exclude=checkpoint.pt --exclude=model.pt --exclude=snapshots \
    results/assisted/ctr100/*/ results/logs/assisted 2>/dev/null
tar czf "$OUT/ablation.tar.gz" --exclude=checkpoint.pt --exclude=model.pt --exclude=snapshots \
    results/ablation results/logs 2>/dev/null
ls -la "$OUT"
log "done"
