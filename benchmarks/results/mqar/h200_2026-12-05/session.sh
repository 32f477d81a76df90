#!/usr/bin/env bash
# The first device call of the sixth session (2026-12-05): timings while the GPU is idle, then the MQAR sweeps
# started detached (the later calls wait on them with benchmarks/mqar_gpu_session.sh wait).
#   1. seconds per epoch of issue 17's setting (rebased, d_model 128, seq 2048): tf32x3 and bf16 alone, then
#      four tf32x3 runs packed on the GPU (the GPU seconds one run costs);
#   2. generation (issue 20): the compiled decode step at B = 1 for both 360M models, the Transformer++ grid, and
#      the hybrid's B = 64 x 64k prefill that failed on int32 offsets;
#   3. the sweeps, bf16 like the 12 settings already run: Based at d_model 64 and 128, seq 1024 (the L 1024 row's
#      missing half), and beside them, one at a time, ReBased and Based at d_model 64, seq 2048.
# Every step has a time box; the sum stays inside one 600 s command.
set -u
cd "$(dirname "$0")/../../../.."
R="$OUT/r"
mkdir -p "$R" runs
budget() {  # seconds left for a step: its own box, or what is left of the command's 560 s
  local left=$((560 - SECONDS))
  ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$R/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >>"$R/gpu.txt" 2>&1
git log -1 --format=%H >>"$R/gpu.txt" 2>/dev/null || true
echo "[$SECONDS s] mqar speed alone" >>"$R/timeline.txt"
timeout "$(budget 200)" python -m benchmarks.mqar_speed --out runs/speed1 --settings rebased:128:2048 --epochs 2 \
  --variant tf32x3=train.precision=tf32x3 --variant bf16=train.precision=bf16 >"$R/speed_alone.log" 2>&1
cp runs/speed1/mqar_speed.json "$R/mqar_speed_alone.json" 2>/dev/null
echo "[$SECONDS s] generation, compiled step at B = 1" >>"$R/timeline.txt"
timeout "$(budget 140)" python -m benchmarks.generate_speed --models rebased_360m,transformer_360m --batches 1 \
  --prompts 2048 --steps 32 --compiled --out runs/gen_compiled >"$R/generate_compiled.log" 2>&1
cp runs/gen_compiled/* "$R/" 2>/dev/null
echo "[$SECONDS s] mqar speed packed" >>"$R/timeline.txt"
timeout "$(budget 150)" python -m benchmarks.mqar_speed --out runs/speed4 --settings rebased:128:2048 --epochs 3 \
  --concurrent 4 --variant tf32x3=train.precision=tf32x3 >"$R/speed_packed.log" 2>&1
cp runs/speed4/mqar_speed.json "$R/mqar_speed_packed.json" 2>/dev/null
echo "[$SECONDS s] generation, Transformer++ grid" >>"$R/timeline.txt"
timeout "$(budget 90)" python -m benchmarks.generate_speed --models transformer_360m --batches 1,16,64 \
  --prompts 2048,16384,65536 --steps 32 --out runs/gen_tpp >"$R/generate_tpp.log" 2>&1
for f in runs/gen_tpp/*; do cp "$f" "$R/tpp_$(basename "$f")"; done 2>/dev/null
echo "[$SECONDS s] generation, hybrid B = 64 x 65536" >>"$R/timeline.txt"
timeout "$(budget 60)" python -m benchmarks.generate_speed --models rebased_360m --batches 64 --prompts 65536 \
  --steps 32 --out runs/gen_64k >"$R/generate_64k.log" 2>&1
for f in runs/gen_64k/*; do cp "$f" "$R/64k_$(basename "$f")"; done 2>/dev/null
echo "[$SECONDS s] sweeps" >>"$R/timeline.txt"
S=benchmarks/mqar_gpu_session.sh
bash $S start runs/a --mixers based --d-models 64 128 --seq-lens 1024 --lrs 1e-3 3e-3 --gpus 0 \
  --runs-per-gpu 4 train.precision=bf16 >>"$R/timeline.txt" 2>&1
bash $S start runs/b --mixers rebased based --d-models 64 --seq-lens 2048 --lrs 1e-3 3e-3 --gpus 0 \
  --runs-per-gpu 1 train.precision=bf16 >>"$R/timeline.txt" 2>&1
sleep 15
nvidia-smi >>"$R/timeline.txt" 2>&1
echo "[$SECONDS s] done" >>"$R/timeline.txt"
tar czf "$OUT/r1.tgz" -C "$OUT" r && rm -rf "$R"
