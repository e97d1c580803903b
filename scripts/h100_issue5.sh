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
# at $QOLM, row blocks of 16; with $QOBASE, an older quant_mma.cu, also its previous default launch, in turns),
# stream (quant_gemv.py --sweep stream: wider blocks of the CUDA kernel, full and load-only, and plain reads
# of the same bytes, $QBITS x $QSM on layouts $QSLAYOUTS), pdledge (whether stream capture keeps the CUDA kernel's
# PDL launch as a programmatic graph edge), pdlproof (the trigger before the wait, pdl 3, with x read through the
# non-coherent path as before the fix, in a copy of the tree edited so: the GPU chain tests of pdl 3 there, which
# must fail, then on both trees chains of GEMVs in graph replays with the caching allocator recycling buffers or
# every buffer kept alive, counting wrong replays).
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
        --m ${QOM:-1} --layouts 16 --layer --layer-m ${QOLM:-1 4} ${QOBASE:+--baseline-source "$QOBASE"} \
        --out "$OUT/quant_overlap.json" ;;
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
    pdlproof)
      setup "${CLEAN:-.clean.tar}" /tmp/broken
      sed -i 's/ld\.global\.v4\.u32/ld.global.nc.v4.u32/' /tmp/broken/src/kernels/quant_mma.cu
      HOME=/tmp/home_broken run /tmp/broken 150 python3 -m pytest -q -p no:cacheprovider -n 6 \
        -k "dependent_launch and pdl3" tests/test_kernels_quant.py
      cat > /tmp/pdlproof.py <<'EOF'
import itertools

import torch
from treadle.kernels.quant_matmul import QuantMatmulConfig, quant_matmul
from treadle.kernels.quant_mma import SOURCE, MmaConfig
from treadle.kernels.quantize import quantize_rtn

torch.manual_seed(0)
print("x through the coherent path:", "ld.global.v4.u32" in SOURCE.read_text())
qws = [quantize_rtn(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02, b, 128, 16)
       for b in (3, 4, 2)]


def chain(x, mma, held):
    for i, qw in enumerate(qws * 4):
        x = quant_matmul(x, qw, config=QuantMatmulConfig(False, 1, 32, 4, 1, mma=mma))
        if i % 3 == 2:
            x = x / x.float().norm(dim=1, keepdim=True).to(x.dtype)
        if held is not None:
            held.append(x)
    return x


for warps, m, keep in itertools.product((8, 16), (1, 16), (False, True)):
    cfg, plain = MmaConfig(warps, pdl=3, preload=True), MmaConfig(warps)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    chain(x, cfg, None)
    held = [] if keep else None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x, cfg, held)
    bad = 0
    for _ in range(20):
        x.copy_(torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        want = chain(x, plain, None)
        torch.cuda.synchronize()
        bad += not torch.equal(out, want)
    print(f"pdl 3, {warps} warps, M={m}, buffers {'kept' if keep else 'recycled'}: {bad}/20 replays wrong")
EOF
      HOME=/tmp/home_broken run /tmp/broken 120 python3 /tmp/pdlproof.py
      run /tmp/new 120 python3 /tmp/pdlproof.py
      command -v cuobjdump >/dev/null || echo "no cuobjdump: SASS not checked" | tee -a "$log"
      for home in /tmp/home_broken "$HOME"; do  # each tree's NVRTC cubins: loads but the preload above the wait
        for f in "$home"/.cache/treadle/quant_mma/*.cubin; do
          cuobjdump -sass -fun quant_mma_gemv "$f" 2>/dev/null | awk '/ACQBULK/ {w = 1; exit}
            /LDG/ && !/LDG.E.NA.128.CONSTANT|LDG.E.64.CONSTANT/ {n++}
            END {print w ? n + 0 " x loads above the wait" : "no wait"}'
        done | sort | uniq -c | sed "s|^|$home: |" | tee -a "$log"
      done ;;
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
