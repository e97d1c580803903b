#!/usr/bin/env bash
# Issue 5 on the H100 test machine (the device `run` tool): unpack the committed tree ($CLEAN, .clean.tar by
# default, and .base.tar for an A/B of the decode step when carried), then run the steps named in $STEPS, each
# under its own timeout, logs and JSON under $OUT. Steps: decode (decode_step.py, --profile), quant (quant_gemv.py sweep, $QBITS x $QM on the
# weight layouts $QLAYOUTS), qdefault (quant_gemv.py default_config only, every bit width, $QDM, layouts
# $QDLAYOUTS: flat and row-blocked by default, each against the Triton-only default; widths $QDBITS if set, whole
# layers if $QDLAYER), mma (quant_gemv.py, the CUDA tensor-core kernel's launch shapes, $QBITS x $QMM on layouts
# $QMLAYOUTS, also on .base.tar when carried),
# tests (kernel tests at real shapes, $TJOBS pytest workers, only those matching $TK if set), parity
# (gpu_parity.py + decode_parity.py), overlap (quant_gemv.py --sweep overlap --layer: the previous launch shape
# with PDL, weights loaded before the wait or not, triggers, 16-warp blocks; the load-only diagnostic, plain
# reads, and whole layers back to back with and without a small kernel between the GEMVs, $QBITS x $QOM, layers
# at $QOLM, row blocks of 16),
# stream (quant_gemv.py --sweep stream: wider blocks of the CUDA kernel, full and load-only, and plain reads
# of the same bytes, $QBITS x $QSM on layouts $QSLAYOUTS), pdledge (whether stream capture keeps the CUDA kernel's
# PDL launch as a programmatic graph edge).
set -u
export PYTHONUNBUFFERED=1
repo=$PWD
log=$OUT/log.txt
setup() {  # $1: tarball, $2: root
  mkdir -p "$2/src" "$2/t/treadle" && tar xf "$1" -C "$2/src"
  for d in engine server kernels grammars configs; do ln -sfn "$2/src/$d" "$2/t/treadle/$d"; done
}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
setup "${CLEAN:-.clean.tar}" /tmp/new
[ -f .base.tar ] && setup .base.tar /tmp/base
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$log"
run() {  # $1: root, $2: seconds, rest: command
  local root=$1 secs=$2; shift 2
  echo "=== [$root] $* ($(date +%T))" | tee -a "$log"
  (cd "$root/src" && PYTHONPATH="$root/t:/tmp/site" timeout "$secs" "$@") 2>&1 | tee -a "$log"
}
for step in ${STEPS:-decode quant}; do
  case $step in
    decode)
      run /tmp/new 240 python3 benchmarks/decode_step.py --shapes ${DSHAPES:-llama-3.1-8b} --batches ${DBATCH:-1 8} \
        ${DPROFILE---profile} --out "$OUT/decode_new.json"
      [ -f .base.tar ] && run /tmp/base 200 python3 benchmarks/decode_step.py --shapes ${DSHAPES:-llama-3.1-8b} \
        --batches ${DBATCH:-1 8} --out "$OUT/decode_base.json" ;;
    quant)
      run /tmp/new ${QSECS:-240} python3 benchmarks/quant_gemv.py --bits ${QBITS:-3 4} --m ${QM:-1 4} \
        --layouts ${QLAYOUTS:-8} --out "$OUT/quant_sweep.json" ;;
    mma)
      run /tmp/new ${QMSECS:-200} python3 benchmarks/quant_gemv.py --sweep mma --bits ${QBITS:-3 4} --m ${QMM:-1 16} \
        --layouts ${QMLAYOUTS:-0 16} --out "$OUT/quant_mma.json"
      [ -f .base.tar ] && run /tmp/base ${QMSECS:-200} python3 benchmarks/quant_gemv.py --sweep mma --bits ${QBITS:-3 4} \
        --m ${QMM:-1 16} --layouts ${QMLAYOUTS:-0 16} --out "$OUT/quant_mma_base.json" ;;
    qdefault)
      run /tmp/new ${QDSECS:-300} python3 benchmarks/quant_gemv.py --no-sweep --m ${QDM:-1 2 4 16 64} \
        ${QDBITS:+--bits $QDBITS} --layouts ${QDLAYOUTS:-0 16} ${QDLAYER:+--layer} --out "$OUT/quant_default.json" ;;
    overlap)
      run /tmp/new ${QOSECS:-240} python3 benchmarks/quant_gemv.py --sweep overlap --bits ${QBITS:-3 4} \
        --m ${QOM:-1} --layouts 16 --layer --layer-m ${QOLM:-1 4} --out "$OUT/quant_overlap.json" ;;
    stream)
      run /tmp/new ${QSSECS:-240} python3 benchmarks/quant_gemv.py --sweep stream --bits ${QBITS:-3 4} \
        --m ${QSM:-1} --layouts ${QSLAYOUTS:-16} --out "$OUT/quant_stream.json" ;;
    pdledge)
      run /tmp/new 60 python3 - <<'EOF'
import torch
from cuda.bindings import driver
from treadle.kernels.quant_matmul import QuantMatmulConfig, quant_matmul
from treadle.kernels.quant_mma import MmaConfig
from treadle.kernels.quantize import quantize_rtn
qw = quantize_rtn(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02, 4, 128, 16)
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
cfg = QuantMatmulConfig(False, 1, 32, 4, 1, mma=MmaConfig(8, 1, 2, 1, preload=True))
quant_matmul(quant_matmul(x, qw, config=cfg), qw, config=cfg)
g = torch.cuda.CUDAGraph(keep_graph=True)
with torch.cuda.graph(g):
    y = quant_matmul(quant_matmul(x, qw, config=cfg), qw, config=cfg)
err, frm, to, data, n = driver.cuGraphGetEdges(driver.CUgraph(g.raw_cuda_graph()), 16)
print("pdl graph edges:", err, n, [(int(d.type), int(d.from_port), int(d.to_port)) for d in data[:n]])
EOF
      ;;
    tests)
      run /tmp/new ${TSECS:-200} python3 -m pytest -q --maxfail=3 -p no:cacheprovider -n ${TJOBS:-8} \
        ${TK:+-k "$TK"} tests/test_kernels_quant.py tests/test_kernels_quant_linear.py ;;
    parity)  # the random checkpoint takes the carried SmolLM2 tokenizer (.tok): no embedded model there
      run /tmp/new 120 python3 scripts/make_random_checkpoint.py --shape llama-3.2-1b \
        --out /tmp/treadle-random-llama-3.2-1b --tokenizer "$repo/.tok"
      run /tmp/new 200 python3 benchmarks/gpu_parity.py
      run /tmp/new ${PSECS:-200} python3 benchmarks/decode_parity.py ;;
  esac
done
echo "=== done $(date +%T)" | tee -a "$log"
