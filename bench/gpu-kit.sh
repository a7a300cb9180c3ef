#!/usr/bin/env bash
# Packs what one GPU session needs into .gpu-kit/ (git-ignored), for a GPU machine with CUDA but
# no Node.js and no network (the tool library's `device`): this machine's node binary, the
# runtime packages, dist/, the addon built with CUDA, emorl_gpu_check, the original EfficientMORL
# code (if a copy is given, for timing it on the same GPU), and run.sh, the session's one call:
#
#   npm run gpu:kit [-- /path/to/EfficientMORL]          here (nvcc needed; about 10 min on 2 cores)
#   device run: bash .gpu-kit/run.sh   with carry [".gpu-kit"], timeout_s 600
#
# run.sh writes its report to $OUT/report.txt: the kernel checks and timings (emorl_gpu_check), training
# steps on cuda:0 against the CPU and the golden fixture there (bench/gpu-session.ts), the step benchmark on cuda:0, a short
# --gpus 1 run through NCCL, the step benchmark on the machine's CPU, and the original's step on
# the GPU.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ORIGINAL=${1:-}
KIT=$ROOT/.gpu-kit
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
cd "$ROOT"
JOBS=$(nproc)

echo "== the addon with CUDA (build-cuda/) and emorl_gpu_check (build-gpu/)"
EMORL_CUDA=1 npx cmake-js compile --out build-cuda --config Release --parallel "$JOBS" >/dev/null
cmake -S . -B build-gpu -DEMORL_CUDA=ON -DEMORL_GPU_CHECK=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-gpu --target emorl_gpu_check -j "$JOBS" >/dev/null
npm run build >/dev/null

echo "== staging"
APP=$STAGE/app
mkdir -p "$STAGE/bin" "$APP/build-cuda" "$APP/node_modules"
cp "$(readlink -f "$(command -v node)")" "$STAGE/bin/node"
cp -r dist configs package.json "$APP/"
cp build-cuda/Release/emorl_native.node "$APP/build-cuda/"
cp build-gpu/emorl_gpu_check "$APP/"
cp bench/original.py "$APP/"
# the golden PyTorch fixture, for bench/gpu-session.ts
GOLDEN=$ROOT/../shared/fixtures/tetrominoes-small-gaussian.h5
if [ -f "$GOLDEN" ]; then mkdir -p "$APP/fixtures" && cp "$GOLDEN" "$APP/fixtures/"; fi
# the packages the library loads at run time, with their own dependencies (not the build tools or
# the dev dependencies); of the @tensorflow packages only package.json and the bundle that Node
# loads (their "main", one file each: the rest is browser builds and typings)
node -e '
const fs = require("fs"), path = require("path");
const seen = new Set();
const visit = (name) => {
  if (seen.has(name)) return;
  seen.add(name);
  const pkg = JSON.parse(fs.readFileSync(path.join("node_modules", name, "package.json"), "utf8"));
  for (const d of Object.keys(pkg.dependencies || {})) if (fs.existsSync(path.join("node_modules", d, "package.json"))) visit(d);
};
for (const n of ["@tensorflow/tfjs", "@tensorflow/tfjs-core", "@tensorflow/tfjs-backend-cpu", "commander", "cli-progress", "h5wasm"]) visit(n);
console.log([...seen].join("\n"));
' | while read -r pkg; do
  dst=$APP/node_modules/$pkg
  mkdir -p "$dst"
  case $pkg in
    @tensorflow/*)
      main=$(node -p "require('./node_modules/$pkg/package.json').main")
      mkdir -p "$dst/$(dirname "$main")"
      cp "node_modules/$pkg/package.json" "$dst/"
      cp "node_modules/$pkg/$main" "$dst/$main" ;;
    *) cp -r "node_modules/$pkg/." "$dst/" ;;
  esac
done
if [ -n "$ORIGINAL" ]; then
  mkdir -p "$APP/EfficientMORL"
  (cd "$ORIGINAL" && tar --exclude=.git -cf - .) | (cd "$APP/EfficientMORL" && tar -xf -)
fi

echo "== packing"
rm -rf "$KIT"
mkdir -p "$KIT"
tar -C "$STAGE" -cf - bin app | xz -T0 -6 > "$KIT/kit.tar.xz"
cat > "$KIT/run.sh" <<'RUN'
#!/usr/bin/env bash
# One GPU session's checks and timings (bench/gpu-kit.sh made this); the report is $OUT/report.txt.
set -uo pipefail
KIT=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$KIT/out}
mkdir -p "$OUT"
W=/tmp/emorl-kit
rm -rf "$W" && mkdir -p "$W" && xz -dc "$KIT/kit.tar.xz" | tar -C "$W" -xf -
export PATH=$W/bin:$PATH EMORL_NATIVE_PATH=$W/app/build-cuda/emorl_native.node
cd "$W/app"
# every step's output into one report ($OUT brings back at most 8 files)
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)" | tee -a "$OUT/report.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/report.txt"
  echo "(exit ${PIPESTATUS[0]})" | tee -a "$OUT/report.txt"
}
# NCCL from the machine's Python packages where it is not on the library path (the session's
# one-rank check and the --gpus 1 run below use it)
NCCL=$(python3 -c 'import os, nvidia.nccl as m; print(os.path.join(list(m.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null || true)
if [ -n "$NCCL" ] && [ -z "${EMORL_NCCL_LIBRARY:-}" ]; then export EMORL_NCCL_LIBRARY=$NCCL; fi
# most important first; the limits add up to under the device call's 10 minutes
step device 15 nvidia-smi
step gpu_check 180 ./emorl_gpu_check
step session 100 node dist/bench/gpu-session.js
step step-train-cuda 60 node dist/bench/step.js --config tetrominoes --batch 32 --mode train --device cuda:0 --steps 20
# data parallel through NCCL (one rank: the library loading, the communicator, the device allreduce)
step data 20 node dist/bin/emorl-data.js generate tetrominoes --out /tmp/emorl-tet.h5 --train 256 --test 32 --no-progress
# run as npx runs it: by its #! line, with the training Node flags
step train-gpus1 75 ./dist/bin/emorl-train.js --gpus 1 --data /tmp/emorl-tet.h5 --batch-size 8 --steps 20 --checksum-every 10 \
  --out /tmp/emorl-run --no-progress
step step-infer-cuda 30 node dist/bench/step.js --config tetrominoes --batch 32 --mode infer --device cuda:0 --steps 10
step step-train-cpu 45 node dist/bench/step.js --config tetrominoes --batch 32 --mode train --steps 3
if [ -d EfficientMORL ]; then
  step original-train-cuda 60 python3 original.py --repo EfficientMORL --mode train --steps 10 --device cuda --threads "$(nproc)"
fi
RUN
chmod +x "$KIT/run.sh"
du -sh "$KIT"/*
