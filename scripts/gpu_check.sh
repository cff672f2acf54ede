#!/usr/bin/env bash
# The GPU check: everything that needs CUDA, in one run that fits in about 8 minutes on one large GPU.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# 1. the tests marked `gpu` (tiny model: inductor on CUDA for every method, 2:4 semi-structured SALR);
# 2. a 50-step SmolLM2 run per method in bf16, eager and with train.compile=true;
# 3. LoRA under DeepSpeed ZeRO-2 on one GPU; 4. LoRA on an nf4 (QLoRA) base;
# 5. `python -m scripts.bench_throughput` on CUDA.
# Each step has its own time limit (150 s; the runs go 4 at a time) and the script goes on past a failure, so the
# block always comes out. It writes
# one markdown block, DIR/gpu_check.md (default DIR: gpu_check/), to paste into docs/RESULTS.md.
# --dry-run (CPU, CI): composes and validates every run's config and prints the plan; trains nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=gpu_check
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "usage: scripts/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

BIN=${BIN:-.venv/bin}
PARALLEL=${PARALLEL:-4}
PYTHON="$BIN/python"
METHODS=(lora droplora prunedlora loraprune salr adalora)
COMMON=(model=smollm2_135m task=gsm8k train.max_steps=50 train.save_every=50 train.bf16=true train.batch_size=8
        train.seq_len=512 train.packing=true train.device=cuda eval.enabled=false logging.progress=false)

# One run per line: "<name> <overrides...>" (the name is the run directory under $OUT/runs).
RUNS=()
for method in "${METHODS[@]}"; do
    RUNS+=("$method-eager method=$method")
    RUNS+=("$method-compile method=$method train.compile=true")
done
RUNS+=("lora-zero2 method=lora distributed=deepspeed_zero2")
RUNS+=("lora-nf4 method=lora model.quantization=nf4")

if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "${RUNS[@]}" | "$PYTHON" -c '
import sys
from prunedlora.compose import compose_config
from prunedlora.validation import validate
common = sys.argv[1:]
for line in sys.stdin:
    name, *overrides = line.split()
    validate(compose_config([*common, *overrides]))
    print("would run", name + ": prunedlora-train", *overrides, f"(+ {len(common)} shared overrides)")
' "${COMMON[@]}" || exit 1
    echo "would run: pytest -m gpu; python -m scripts.bench_throughput --device cuda"
    echo "dry run: every run composes and validates"
    exit 0
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch; use --dry-run on a CPU machine" >&2
    exit 2
fi
mkdir -p "$OUT/runs"
BLOCK="$OUT/gpu_check.md"
START=$(date +%s)
{
    echo "## GPU check"
    echo
    echo "$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%d)."
    echo
} > "$BLOCK"

echo "[1/4] tests marked gpu"
timeout 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
echo "- \`pytest -m gpu\` (rc $?): $(tail -n 1 "$OUT/pytest.log")" >> "$BLOCK"

echo "[2/4] SmolLM2 runs, $PARALLEL at a time"
run_one() {  # <name> <overrides...>: one run, its exit code in runs/<name>.rc
    local name=$1
    shift
    timeout 150 "$BIN/prunedlora-train" "${COMMON[@]}" "$@" "hydra.run.dir=$OUT/runs/$name" \
        > "$OUT/runs/$name.log" 2>&1
    echo $? > "$OUT/runs/$name.rc"
}
for line in "${RUNS[@]}"; do
    # shellcheck disable=SC2086  # the overrides are words on purpose
    run_one $line &
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
done
wait
STATUS=()
for line in "${RUNS[@]}"; do
    name=${line%% *}
    STATUS+=("$name $(cat "$OUT/runs/$name.rc" 2>/dev/null || echo '?')")
done
echo "  exit codes: ${STATUS[*]}"
"$BIN/prunedlora-report" "$OUT/runs" --out "$OUT/report" > /dev/null 2>&1
{
    echo
    echo "50 steps of 8 x 512 packed GSM8K tokens per run, bf16, $PARALLEL runs sharing the GPU at a time (so tokens/s"
    echo "here are not the benchmark's); exit codes: ${STATUS[*]}."
    echo
    cat "$OUT/report/report.md" 2>/dev/null || echo "(no report: see $OUT/runs/*.log)"
    echo
} >> "$BLOCK"

echo "[3/4] throughput benchmark"
timeout 150 "$PYTHON" -m scripts.bench_throughput --device cuda --threads 16 --rounds 1 --steps 20 --warmup 5 \
    --compile-methods lora --batch-size 8 --seq-len 512 --no-write > "$OUT/throughput.log" 2>&1
echo "- throughput benchmark (rc $?):" >> "$BLOCK"
sed -n '/^## Training throughput/,$p' "$OUT/throughput.log" | tail -n +2 >> "$BLOCK"

echo "[4/4] done in $(( $(date +%s) - START )) s"
echo >> "$BLOCK"
echo "Wall time of the whole check: $(( $(date +%s) - START )) s (\`scripts/gpu_check.sh\`)." >> "$BLOCK"
cat "$BLOCK"
