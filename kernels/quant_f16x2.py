"""The GEMV's decode of one 32-code chunk into packed fp16 pairs, as a straight-line program, and its PTX.

Why: the portable decode (quant_matmul's `_decode_slot`) spends two fp32 instructions per weight to make an
exact float code, plus the FMA with x, which makes the GPU's issue rate the limit at <= 4 bits. Here two codes
travel in the two halves of one 32-bit register, so one LOP3 (mask the two fields, OR in an fp16 exponent: the
"magic number" conversion of FasterTransformer and Marlin), one SUB.F16X2 (remove the magic) and one FMA.F16X2
(times two activations) handle two weights.

At 2, 4 and 8 bits no code straddles a half-word, so the pairs are the codes at equal offsets in the two halves
of each word. At 3, 5 and 6 bits a pair is codes e and e + 16 of the chunk: they sit 16 * bits apart in the
bitstream, so after one PRMT per word that puts bitstream half-words k and bits + k side by side, both codes
of every pair have the same bit offset in the two halves of one register. A code whose field ends above bit 10
of its half (the fp16 mantissa) is first shifted down; shifts are shared by the fields of a register. A code that
straddles two half-words (3, 5, 6 bits) is assembled from both with a funnel of two shifts and a select.

Each pair decodes to q * 2**-bits in fp16 (exact: the magic's exponent is chosen per field offset), so a
product never exceeds |x|. Four FMA.F16X2 chains of four pairs each, summed pairwise in fp16 and then in fp32,
keep the fp16 rounding to short runs (~1e-3 relative on a chunk's sum) and the values far from fp16's range.

`plan` is the program; `ptx` prints it for `tl.inline_asm_elementwise`; `emulate` runs it in NumPy, which the
CPU tests check against `quant_pack.unpack_bits` (the inline assembly itself runs only on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quant_pack import SUPPORTED_BITS

PAIRS = 16  # pairs of codes per 32-code chunk
CHAINS = 4  # independent FMA.F16X2 accumulators per chunk
LUT_AND_OR = 0xEA  # lop3: (a & b) | c
LUT_SELECT = 0xE4  # lop3: (a & c) | (b & ~c)


@dataclass(frozen=True)
class Op:
    """dst = kind(srcs, imm). Sources name words ("w0".."w{bits-1}") or earlier destinations."""

    kind: str  # prmt | shr | shl | select | field | unbias
    dst: str
    srcs: tuple[str, ...]
    imm: tuple[int, ...] = ()


def _half_mask(width: int, shift: int = 0) -> int:
    return (((1 << width) - 1) << shift) * 0x10001


def _magic(bits: int, offset: int) -> int:
    """fp16 2**(10 - offset - bits) in both halves: OR-ing q << offset into it and subtracting it gives q / 2**bits."""
    return ((25 - offset - bits) << 10) * 0x10001


def plan(bits: int) -> tuple[list[Op], list[tuple[str, int, int]]]:
    """The ops decoding a chunk's `bits` words, and for each pair the register holding it as fp16x2 with the
    chunk indices of its low and high code."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    ops = []
    if 16 % bits == 0:  # fields never straddle half-words: pair the two halves of each word, no PRMT
        halves = [(2 * k, 2 * k + 1) for k in range(bits)]
        regs = [f"w{k}" for k in range(bits)]
    else:  # r{k}: low half = bitstream half-word k, high half = half-word bits + k (codes i and i + 16)
        halves = [(k, bits + k) for k in range(bits)]
        regs = [f"r{k}" for k in range(bits)]
        for k, (lo, hi) in enumerate(halves):
            sel = (2 * (lo % 2)) | (2 * (lo % 2) + 1) << 4 | (4 + 2 * (hi % 2)) << 8 | (5 + 2 * (hi % 2)) << 12
            ops.append(Op("prmt", regs[k], (f"w{lo // 2}", f"w{hi // 2}"), (sel,)))
    shifted: dict[int, list[int]] = {k: [0] for k in range(bits)}  # shifts of register k made so far
    pairs = []
    for k in range(bits):
        for o in range(-(-16 * k // bits) * bits - 16 * k, 16, bits):  # fields starting in the low half of k
            i = len(pairs)
            if o + bits > 16:  # straddles registers k and k + 1: low part from k, the rest from k + 1
                low = 16 - o
                ops += [
                    Op("shr", f"s{i}a", (regs[k],), (o,)),
                    Op("shl", f"s{i}b", (regs[k + 1],), (low,)),
                    Op("select", f"s{i}", (f"s{i}a", f"s{i}b"), (_half_mask(low),)),
                ]
                src, offset = f"s{i}", 0
            else:
                sh = next((s for s in shifted[k] if s <= o and o - s + bits <= 10), None)
                if sh is None:
                    sh = o
                    shifted[k].append(sh)
                    ops.append(Op("shr", f"{regs[k]}_{sh}", (regs[k],), (sh,)))
                src, offset = (regs[k] if sh == 0 else f"{regs[k]}_{sh}"), o - sh
            magic = _magic(bits, offset)
            ops += [
                Op("field", f"f{i}", (src,), (_half_mask(bits, offset), magic)),
                Op("unbias", f"p{i}", (f"f{i}",), (magic,)),
            ]
            lo_half, hi_half = halves[k]
            pairs.append((f"p{i}", (16 * lo_half + o) // bits, (16 * hi_half + o) // bits))
    assert len(pairs) == PAIRS and sorted(c for _, a, b in pairs for c in (a, b)) == list(range(32))
    return ops, pairs


def pair_codes(bits: int) -> tuple[tuple[int, int], ...]:
    """Chunk indices (low, high) of the codes of each pair, in the order of `ptx`'s activation operands."""
    return tuple((lo, hi) for _, lo, hi in plan(bits)[1])


def emulate(words: np.ndarray, bits: int) -> np.ndarray:
    """Run `plan` on words [bits, ...] (uint32): the 32 decoded codes times 2**bits, as float64 [32, ...]."""
    ops, pairs = plan(bits)
    regs = {f"w{j}": words[j].astype(np.uint32) for j in range(bits)}
    for op in ops:
        s = [regs[n] for n in op.srcs]
        if op.kind == "prmt":
            src = s[0].astype(np.uint64) | s[1].astype(np.uint64) << np.uint64(32)
            out = np.zeros_like(s[0])
            for byte in range(4):
                pick = np.uint64((op.imm[0] >> (4 * byte)) & 7)
                out |= ((src >> (pick * np.uint64(8))) & np.uint64(0xFF)).astype(np.uint32) << np.uint32(8 * byte)
            regs[op.dst] = out
        elif op.kind == "shr":
            regs[op.dst] = s[0] >> np.uint32(op.imm[0])
        elif op.kind == "shl":
            regs[op.dst] = s[0] << np.uint32(op.imm[0])
        elif op.kind == "select":
            m = np.uint32(op.imm[0])
            regs[op.dst] = (s[0] & m) | (s[1] & ~m)
        elif op.kind == "field":
            regs[op.dst] = (s[0] & np.uint32(op.imm[0])) | np.uint32(op.imm[1])
        else:  # unbias: fp16x2 subtraction, exact for these operands
            halves = s[0].view(np.uint16).reshape(*s[0].shape, 2).view(np.float16)
            magic = np.array([op.imm[0]], dtype=np.uint32).view(np.float16)
            regs[op.dst] = (halves - magic).view(np.uint32).reshape(s[0].shape)
    out = np.empty((32, *words.shape[1:]), dtype=np.float64)
    for name, lo, hi in pairs:
        halves = regs[name].view(np.uint16).reshape(*regs[name].shape, 2).view(np.float16).astype(np.float64)
        out[lo], out[hi] = halves[..., 0] * 2.0**bits, halves[..., 1] * 2.0**bits
    return out


def ptx(bits: int) -> tuple[str, str]:
    """Inline PTX for one chunk and its constraints: $0 (f32 out) = sum over the 32 codes of x * q / 2**bits,
    from $1..$bits (the chunk's words) and the 16 activation pairs (`pair_codes` order) as fp16x2 after them."""
    ops, pairs = plan(bits)
    names = {f"w{j}": f"${1 + j}" for j in range(bits)}
    temps = [op.dst for op in ops]
    names.update({t: f"%t{n}" for n, t in enumerate(temps)})
    body = []
    for op in ops:
        d, s = names[op.dst], [names[n] for n in op.srcs]
        if op.kind == "prmt":
            body.append(f"prmt.b32 {d}, {s[0]}, {s[1]}, {op.imm[0]:#x};")
        elif op.kind == "shr":
            body.append(f"shr.b32 {d}, {s[0]}, {op.imm[0]};")
        elif op.kind == "shl":
            body.append(f"shl.b32 {d}, {s[0]}, {op.imm[0]};")
        elif op.kind == "select":
            body.append(f"lop3.b32 {d}, {s[0]}, {s[1]}, {op.imm[0]:#x}, {LUT_SELECT:#x};")
        elif op.kind == "field":
            body.append(f"lop3.b32 {d}, {s[0]}, {op.imm[0]:#x}, {op.imm[1]:#x}, {LUT_AND_OR:#x};")
        else:
            body.append(f"mov.b32 %m, {op.imm[0]:#x};")
            body.append(f"sub.rn.f16x2 {d}, {s[0]}, %m;")
    x = [f"${1 + bits + i}" for i in range(PAIRS)]
    for i, (p, _, _) in enumerate(pairs):
        c = f"%c{i % CHAINS}"
        if i < CHAINS:
            body.append(f"mul.rn.f16x2 {c}, {names[p]}, {x[i]};")
        else:
            body.append(f"fma.rn.f16x2 {c}, {names[p]}, {x[i]}, {c};")
    body += [
        "add.rn.f16x2 %c0, %c0, %c1;",
        "add.rn.f16x2 %c2, %c2, %c3;",
        "mov.b32 {%h0, %h1}, %c0;",
        "mov.b32 {%h2, %h3}, %c2;",
        "cvt.f32.f16 %g0, %h0;",
        "cvt.f32.f16 %g1, %h1;",
        "cvt.f32.f16 %g2, %h2;",
        "cvt.f32.f16 %g3, %h3;",
        "add.f32 %g0, %g0, %g1;",
        "add.f32 %g2, %g2, %g3;",
        "add.f32 $0, %g0, %g2;",
    ]
    decl = (f".reg .b32 %t<{len(temps)}>, %m, %c<{CHAINS}>; .reg .b16 %h<4>; .reg .f32 %g<4>;")
    asm = "{\n" + decl + "\n" + "\n".join(body) + "\n}"
    constraints = ",".join(["=r"] + ["r"] * (bits + PAIRS))
    return asm, constraints
