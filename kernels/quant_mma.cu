// Weight-only quantized GEMV/GEMM for few tokens (M <= 8 * QM_NT) on tensor cores: y = x @ W_hat (+ bias).
//
// Why tensor cores at M = 1: the CUDA-core GEMV spends ~4.5 instructions per weight (decode to fp32, FMA), more
// than the SMs can issue while streaming 3-4-bit codes at full bandwidth. Here the CUDA cores only decode, two
// codes per LOP3 + FMA.x2 (the magic-number conversion: OR the code into the mantissa of a 16-bit float whose
// exponent makes the mantissa's unit 1, then subtract that float), and mma.sync m16n8k16 does every
// multiply-add in fp32 accumulators, so the sums are exact products summed in fp32 (no fp16 overflow). On the
// H100 (docs/benchmarks.md) a Llama-3.1-8B layer at 3 bits takes 54 us at M = 1 against 61 for the Triton GEMV,
// and M = 2-8 cost what M = 1 costs; the large layer still streams at only ~2 TB/s.
//
// Mapping. The MMA's A operand is 16 weight columns x 16 positions along K; its B operand the same 16 positions
// x 8 tokens. Positions along K may be assigned in any order as long as A and B agree, so lane (g, t) of a warp
// (g = lane / 4, t = lane % 4) supplies chunk t (32 codes) of each 128-code step for 4 adjacent columns, and
// the 16 code pairs that the decode produces (codes lo and hi of pair p in one register) become the A
// registers of k-step p / 2; B gets the matching pairs of activations, gathered with one PRMT each. A warp
// thus covers 32 columns x 128 K per step: every lane loads `bits` 16-byte vectors (4 columns of one word of
// its chunk), contiguous across lanes in both weight layouts. The scale and minimum of each group are applied
// to the step's fp32 partial sums: acc += scale * sum(q * x) + min * sum(x), where sum(x) comes from one more
// MMA with an all-ones A. The warps of a block split K; a shared-memory sum joins them at the end.
//
// Pairs. At 2, 4 and 8 bits codes never straddle a 16-bit half, so a pair is two codes at the same offset in
// the two halves of one word. At 3, 5 and 6 bits a pair is codes p and p + 16 of the chunk, 16 * bits bits
// apart: one PRMT per register puts bitstream half-words k and bits + k side by side, so both codes of a pair
// sit at the same offset of the two halves (a code crossing half-words is joined from two registers).
//
// Compile-time parameters (-D): QM_BITS (2, 3, 4, 5, 6, 8), QM_BF16 (1: bf16 activations and scales, else
// fp16), QM_BLOCKED (16, 32 or 64: the row-blocked layout of quant_pack.to_row_blocks with that many columns
// per block; 0: the flat [K-rows, N] one), QM_NT (token tiles of 8), QM_STAGES (steps of loads in flight per warp, in registers), QM_MIN_BLOCKS
// (blocks per SM the register allocation must allow), QM_MAX_THREADS (256; 512 for 16 warps), QM_PDL
// (programmatic dependent launch, sm_90+: 1 lets the next grid launch as soon as this one's blocks are past
// their wait, 2 once they are past their main loops, 3 as soon as they have started),
// QM_PRELOAD (with QM_PDL: each warp's first steps of weights, scales and minimums loaded before
// griddepcontrol.wait, x after it; kept by ptxas at QM_PDL 3 only, below),
// QM_LOAD_ONLY (a diagnostic: every load kept, decode and MMA replaced by an XOR, the output meaningless; it
// tells the memory side's rate from the issue side's). No headers: the source compiles as is with nvcc or NVRTC.
//
// PDL: launched with programmatic stream serialization, the next GEMV's blocks can be scheduled while this one
// drains instead of after it has fully completed. Only x can come from the previous kernel: the weights are
// written at load time, so with QM_PRELOAD a block scheduled beside the draining grid issues its first weight
// loads at once and waits (griddepcontrol.wait) only before reading x; without it every block waits before it
// reads anything. Every read of x and every write of out comes after the wait, which returns once the previous
// grid has completed and its writes are visible to this grid; that grid completed only after its own wait, so
// all older grids have completed too, however early each one let the next launch (3: three grids in flight).
//
// So under PDL x is read with plain ld.global, never ld.global.nc: the non-coherent path is for data that stays
// read-only for the kernel's whole lifetime (true of x only without PDL), and ptxas moves such loads freely,
// above griddepcontrol.wait (ACQBULK in SASS) too. With x on that path it did so in 13 of the 16 launch shapes
// of the GPU chain test with the trigger before the wait: x read before the previous GEMV had written it, wrong
// outputs in CUDA-graph replays, where launches really overlap (docs/benchmarks.md). A coherent load stays below
// the wait. ptxas also hoists the wait itself above the preloaded weight loads unless the trigger sits between
// them, so at 1 and 2 the preload does not survive into SASS; at 3 the trigger comes right after it and the
// weights are in flight before the wait.

#ifndef QM_BITS
#define QM_BITS 4
#endif
#ifndef QM_BF16
#define QM_BF16 1
#endif
#ifndef QM_BLOCKED
#define QM_BLOCKED 16
#endif
#ifndef QM_NT
#define QM_NT 1
#endif
#ifndef QM_STAGES
#define QM_STAGES 1
#endif
#ifndef QM_PDL
#define QM_PDL 0
#endif
#ifndef QM_LOAD_ONLY
#define QM_LOAD_ONLY 0
#endif
#ifndef QM_PRELOAD
#define QM_PRELOAD 0
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

namespace qm {

constexpr int BITS = QM_BITS;
constexpr bool BF16 = QM_BF16;
constexpr int NT = QM_NT;
constexpr int STAGES = QM_STAGES;
constexpr bool HALVES = 16 % BITS == 0;  // fields never cross a 16-bit half
constexpr int MANT = BF16 ? 7 : 10;      // mantissa bits of the 16-bit float the codes are decoded into
constexpr bool VIA_F32 = BF16 && BITS > MANT;  // 8-bit codes do not fit bf16's mantissa: decode through fp32
constexpr int PER_SHIFT = VIA_F32 ? 1 : MANT / BITS;  // fields that one shift brings under the mantissa

// Pair p (0..15) of a chunk: source register, bit offset in each half, and the chunk indices of its two codes.
__device__ constexpr int pair_reg(int p) { return HALVES ? p / (16 / BITS) : p * BITS / 16; }
__device__ constexpr int pair_off(int p) { return HALVES ? p % (16 / BITS) * BITS : p * BITS % 16; }
__device__ constexpr int pair_lo(int p) { return HALVES ? pair_reg(p) * (32 / BITS) + p % (16 / BITS) : p; }
__device__ constexpr int pair_hi(int p) { return pair_lo(p) + (HALVES ? 16 / BITS : 16); }
// First field offset in register k, and the shift that brings the field at offset o under the mantissa: fields
// are shifted in runs of MANT / BITS, so one shift serves several of them.
__device__ constexpr int first_off(int k) { return HALVES ? 0 : (BITS - 16 * k % BITS) % BITS; }
__device__ constexpr int shift_for(int k, int o) {
  return o + BITS <= MANT ? 0 : first_off(k) + (o - first_off(k)) / BITS / PER_SHIFT * PER_SHIFT * BITS;
}
__device__ constexpr u32 halves(u32 v) { return v | v << 16; }
__device__ constexpr u32 magic(int o) { return halves(BF16 ? u32(134 - o) << 7 : u32(25 - o) << 10); }
constexpr u32 ONE = BF16 ? 0x3F803F80u : 0x3C003C00u;

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ float as_float(u32 v) {
  float f;
  asm("mov.b32 %0, %1;" : "=f"(f) : "r"(v));
  return f;
}

__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {  // (a & b) | c
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {  // a * b + c on two 16-bit floats
  u32 d;
  if (BF16)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  else
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Register k of the chunk's words w: at 3, 5, 6 bits bitstream half-words k (low) and BITS + k (high).
__device__ __forceinline__ u32 pair_source(const u32 (&w)[BITS], int k) {
  if (HALVES) return w[k];
  const int lo = k, hi = BITS + k;
  const u32 sel = (2 * (lo % 2)) | (2 * (lo % 2) + 1) << 4 | (4 + 2 * (hi % 2)) << 8 | (5 + 2 * (hi % 2)) << 12;
  return prmt(w[lo / 2], w[hi / 2], sel);
}

// Pair p of codes as two 16-bit floats holding the integers q_lo (low half) and q_hi (high half), exactly.
__device__ __forceinline__ u32 decode_pair(const u32 (&r)[BITS], int p) {
  const int k = pair_reg(p), o = pair_off(p);
  if (VIA_F32) {  // 8-bit codes into bf16: bytes o / 8 and 2 + o / 8 of word k as fp32 2^23 + q, then round
    const float lo = as_float(prmt(r[k], 0x4B000000u, (o / 8) | 0x7540u)) - 8388608.0f;
    const float hi = as_float(prmt(r[k], 0x4B000000u, (2 + o / 8) | 0x7540u)) - 8388608.0f;
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
  }
  u32 src;
  int at;
  if (o + BITS > 16) {  // crosses into register k + 1: its low 16 - o bits from k, the rest from k + 1
    const int low = 16 - o;
    const u32 keep = halves((1u << low) - 1);
    src = ((r[k] >> o) & keep) | ((r[k + 1] << low) & ~keep);
    at = 0;
  } else {
    const int sh = shift_for(k, o);
    src = r[k] >> sh;
    at = o - sh;
  }
  const u32 m = magic(at);
  return fma2(lop3_and_or(src, halves(((1u << BITS) - 1) << at), m), ONE, m | 0x80008000u);
}

// Activations of pair p from the lane's 32 activations of its chunk (16 registers of two).
__device__ __forceinline__ u32 x_pair(const u32 (&x)[16], int p) {
  const int lo = pair_lo(p), hi = pair_hi(p);
  const u32 sel = (2 * (lo % 2)) | (2 * (lo % 2) + 1) << 4 | (4 + 2 * (hi % 2)) << 8 | (5 + 2 * (hi % 2)) << 12;
  return prmt(x[lo / 2], x[hi / 2], sel);
}

__device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  if (BF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float to_f32(u32 h) {  // a 16-bit float in the low half
  if (BF16) return as_float(h << 16);
  float f;
  unsigned short s = (unsigned short)h;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
  return f;
}

struct U4 {
  u32 x, y, z, w;
};
struct U2 {
  u32 x, y;
};
constexpr U4 ZERO4 = {0, 0, 0, 0};

__device__ __forceinline__ U4 ld_stream(const void *p) {  // weights are read once: keep them out of L1
  U4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ U4 ld_x(const void *p) {  // activations: under PDL never non-coherent (above)
  U4 v;
  if (QM_PDL)
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ U2 ld_pair(const void *p) {  // 4 scales or minimums
  U2 v;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// What one lane loads for one step: its words (4 columns each), its tokens' activations, scales and minimums.
struct Stage {
  U4 w[BITS];
  U4 x[NT][4];
  U2 s, z;
};

struct Args {
  const u32 *w;
  const unsigned short *s, *z;
  const unsigned short *x;
  const unsigned short *bias;
  unsigned short *out;
  int m, n, steps, groups;  // steps: K / 128; groups: K / group_size
  int group_shift;          // log2(group_size / 128)
  int stride_x, stride_out;  // in elements
};

// A step's weight words, scales and minimums: they never depend on the previous kernel in the stream.
__device__ __forceinline__ void load_w(Stage &st, const Args &a, int step, int col, bool live, int t) {
  const int grp = step >> a.group_shift;
  const int chunk = (step << 2) + t;
  const u32 *w;
  const unsigned short *s, *z;
  if (QM_BLOCKED) {  // block col / LB: runs of RUN chunks of BITS words of LB columns, contiguous along K
    constexpr int LB = QM_BLOCKED ? QM_BLOCKED : 1;  // this branch is compiled, not taken, in the flat build
    constexpr int LOG_LB = LB == 64 ? 6 : LB == 32 ? 5 : 4;
    const int run = 4 << a.group_shift, blk = col >> LOG_LB, in = col & (LB - 1), c = chunk & (run - 1);
    w = a.w + (u64)blk * a.groups * run * BITS * LB + ((u64)grp * BITS * run + c) * LB + in;
    s = a.s + ((u64)blk * a.groups + grp) * LB + in;
    z = a.z + ((u64)blk * a.groups + grp) * LB + in;
#pragma unroll
    for (int j = 0; j < BITS; ++j)
      st.w[j] = live ? ld_stream(w + j * run * LB) : ZERO4;
  } else {
    w = a.w + (u64)chunk * BITS * a.n + col;
    s = a.s + (u64)grp * a.n + col;
    z = a.z + (u64)grp * a.n + col;
#pragma unroll
    for (int j = 0; j < BITS; ++j)
      st.w[j] = live ? ld_stream(w + (u64)j * a.n) : ZERO4;
  }
  st.s = live ? ld_pair(s) : U2{0, 0};
  st.z = live ? ld_pair(z) : U2{0, 0};
}

// A step's activations: written by the previous kernel, so read only after griddepcontrol.wait under PDL.
__device__ __forceinline__ void load_x(Stage &st, const Args &a, int step, int t, int g) {
  const int chunk = (step << 2) + t;
#pragma unroll
  for (int u = 0; u < NT; ++u) {
    const int tok = u * 8 + g;
    const unsigned short *xp = a.x + (u64)tok * a.stride_x + chunk * 32;
#pragma unroll
    for (int i = 0; i < 4; ++i) st.x[u][i] = tok < a.m ? ld_x(xp + 8 * i) : ZERO4;
  }
}

__device__ __forceinline__ void load(Stage &st, const Args &a, int step, int col, bool live, int t, int g) {
  load_w(st, a, step, col, live, t);
  load_x(st, a, step, t, g);
}

// QM_LOAD_ONLY: fold every loaded word into the sums with one XOR each, so no load is dead code.
__device__ __forceinline__ void fold(const Stage &st, float (&acc)[NT][2][4]) {
  u32 h = st.s.x ^ st.s.y ^ st.z.x ^ st.z.y;
#pragma unroll
  for (int j = 0; j < BITS; ++j) h ^= st.w[j].x ^ st.w[j].y ^ st.w[j].z ^ st.w[j].w;
#pragma unroll
  for (int u = 0; u < NT; ++u)
#pragma unroll
    for (int i = 0; i < 4; ++i) h ^= st.x[u][i].x ^ st.x[u][i].y ^ st.x[u][i].z ^ st.x[u][i].w;
  acc[0][0][0] += as_float(h & 0x3F7FFFFFu);
}

__device__ __forceinline__ u32 comp(const U4 &v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// acc[u][tile][e]: token tile u; tile 0 holds columns 0, 1 of the lane's four, tile 1 columns 2, 3 (MMA rows g
// and g + 8); e as the MMA's accumulator fragment (e / 2: which column, e % 2: token 2t or 2t + 1).
__device__ __forceinline__ void compute(const Stage &st, float (&acc)[NT][2][4]) {
  u32 xs[NT][16];
#pragma unroll
  for (int u = 0; u < NT; ++u) {
    u32 x[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[4 * i] = st.x[u][i].x, x[4 * i + 1] = st.x[u][i].y, x[4 * i + 2] = st.x[u][i].z, x[4 * i + 3] = st.x[u][i].w;
    }
#pragma unroll
    for (int p = 0; p < 16; ++p) xs[u][p] = x_pair(x, p);
  }
  float xsum[NT][4];
#pragma unroll
  for (int u = 0; u < NT; ++u) {
    xsum[u][0] = xsum[u][1] = xsum[u][2] = xsum[u][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) mma(xsum[u], ONE, ONE, ONE, ONE, xs[u][2 * ks], xs[u][2 * ks + 1]);
  }
  const u32 sc[2] = {st.s.x, st.s.y}, zc[2] = {st.z.x, st.z.y};
#pragma unroll
  for (int tile = 0; tile < 2; ++tile) {
    u32 wa[BITS], wb[BITS], ra[BITS], rb[BITS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) wa[j] = comp(st.w[j], 2 * tile), wb[j] = comp(st.w[j], 2 * tile + 1);
#pragma unroll
    for (int k = 0; k < BITS; ++k) ra[k] = pair_source(wa, k), rb[k] = pair_source(wb, k);
    float part[NT][4];
#pragma unroll
    for (int u = 0; u < NT; ++u) part[u][0] = part[u][1] = part[u][2] = part[u][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
      const u32 a0 = decode_pair(ra, 2 * ks), a1 = decode_pair(rb, 2 * ks);
      const u32 a2 = decode_pair(ra, 2 * ks + 1), a3 = decode_pair(rb, 2 * ks + 1);
#pragma unroll
      for (int u = 0; u < NT; ++u) mma(part[u], a0, a1, a2, a3, xs[u][2 * ks], xs[u][2 * ks + 1]);
    }
    const float s0 = to_f32(sc[tile] & 0xFFFF), s1 = to_f32(sc[tile] >> 16);
    const float z0 = to_f32(zc[tile] & 0xFFFF), z1 = to_f32(zc[tile] >> 16);
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      acc[u][tile][0] += part[u][0] * s0 + xsum[u][0] * z0;
      acc[u][tile][1] += part[u][1] * s0 + xsum[u][1] * z0;
      acc[u][tile][2] += part[u][2] * s1 + xsum[u][0] * z1;
      acc[u][tile][3] += part[u][3] * s1 + xsum[u][1] * z1;
    }
  }
}

__device__ __forceinline__ unsigned short from_f32(float f) {
  unsigned short h;
  if (BF16)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

}  // namespace qm

// One block: 32 output columns (two 16-column row blocks), its warps splitting K in interleaved 128-code steps.
// QM_MAX_THREADS 512 allows 16 warps (registers then capped at 128), for grids of about one block per SM, where
// 8 warps keep too few bytes in flight (H100: a plain read of down's words by 128 blocks of 256 threads ran at
// 2.0-2.1 TB/s against 2.3-2.5 with 2-4 blocks per SM; the GEMV on down with 16 warps 8-13% faster).
#ifndef QM_MIN_BLOCKS
#define QM_MIN_BLOCKS 1
#endif
#ifndef QM_MAX_THREADS
#define QM_MAX_THREADS 256
#endif
extern "C" __global__ void __launch_bounds__(QM_MAX_THREADS, QM_MIN_BLOCKS)
    quant_mma_gemv(const u32 *w, const unsigned short *s, const unsigned short *z, const unsigned short *x,
                   const unsigned short *bias, unsigned short *out, int m, int n, int steps, int groups,
                   int group_shift, int stride_x, int stride_out) {
  using namespace qm;
  const Args a = {w, s, z, x, bias, out, m, n, steps, groups, group_shift, stride_x, stride_out};
  extern __shared__ float partial[];  // [warps][NT * 8][32]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int col = blockIdx.x * 32 + (g >> 2) * 16 + (g & 3) * 4;  // the first of the lane's four columns
  const bool live = QM_BLOCKED ? col < (a.n + QM_BLOCKED - 1) / QM_BLOCKED * QM_BLOCKED : col < a.n;
  float acc[NT][2][4];
#pragma unroll
  for (int u = 0; u < NT; ++u)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[u][i / 4][i % 4] = 0.0f;

  Stage st[STAGES];
#if QM_PRELOAD
#pragma unroll
  for (int d = 0; d < STAGES; ++d) load_w(st[d], a, imin(warp + d * warps, a.steps - 1), col, live, t);
#endif
#if QM_PDL == 3
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#if QM_PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the previous grid's writes (x) are visible from here
#endif
#if QM_PDL == 1
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#pragma unroll
  for (int d = 0; d < STAGES; ++d) {
    const int step = imin(warp + d * warps, a.steps - 1);
    if (!QM_PRELOAD) load_w(st[d], a, step, col, live, t);
    load_x(st[d], a, step, t, g);
  }
  for (int s = warp; s < a.steps; s += STAGES * warps) {
#pragma unroll
    for (int d = 0; d < STAGES; ++d) {
      const int sd = s + d * warps;
      if (sd < a.steps) {
        Stage next;
        load(next, a, imin(sd + STAGES * warps, a.steps - 1), col, live, t, g);
        if (QM_LOAD_ONLY)
          fold(st[d], acc);
        else
          compute(st[d], acc);
        st[d] = next;
      }
    }
  }
#if QM_PDL == 2
  asm volatile("griddepcontrol.launch_dependents;");
#endif

#pragma unroll
  for (int u = 0; u < NT; ++u)
#pragma unroll
    for (int i = 0; i < 8; ++i) partial[(warp * NT * 8 + u * 8 + i) * 32 + lane] = acc[u][i / 4][i % 4];
  __syncthreads();
  for (int e = threadIdx.x; e < NT * 8 * 32; e += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) sum += partial[w * NT * 8 * 32 + e];
    const int u = e / 256, i = e / 32 % 8, l = e % 32;
    const int lg = l >> 2, lt = l & 3;
    const int c = blockIdx.x * 32 + (lg >> 2) * 16 + (lg & 3) * 4 + 2 * (i / 4) + (i % 4) / 2;
    const int tok = u * 8 + 2 * lt + i % 2;
    if (c < a.n && tok < a.m) {
      if (a.bias) sum += to_f32(a.bias[c]);
      a.out[(u64)tok * a.stride_out + c] = from_f32(sum);
    }
  }
}

// A diagnostic for benchmarks: read n 16-byte vectors and nothing else, 4 loads in flight per thread, as the
// in-run ceiling of a weight stream. grid_stride 0: block b reads vectors [b * per_block, (b + 1) * per_block);
// 1: the whole grid sweeps the buffer together, block b taking every gridDim.x-th run of blockDim.x * 4.
extern "C" __global__ void __launch_bounds__(1024)
    stream_read(const u32 *p, long long n, long long per_block, int grid_stride, u32 *sink) {
  using namespace qm;
  const long long run = (long long)blockDim.x * 4;
  long long begin = (long long)blockIdx.x * (grid_stride ? run : per_block), end = n, jump = run;
  if (grid_stride)
    jump = run * gridDim.x;
  else if (begin + per_block < n)
    end = begin + per_block;
  u32 h = 0;
  for (long long base = begin; base < end; base += jump) {
    U4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long i = base + u * blockDim.x + threadIdx.x;
      v[u] = i < end ? ld_stream(p + 4 * i) : ZERO4;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) h ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (h == 0x9E3779B9u) sink[0] = h;  // keeps the loads; a chance hit only writes the sink
}
