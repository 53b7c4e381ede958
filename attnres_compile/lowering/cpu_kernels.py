"""The CPU fast path of depth attention: generated C, compiled once per specialisation.

For each specialisation (kernel kind, source count ``M``, storage dtype) this module writes a
small C file with ``M`` as a compile-time constant, compiles it with the system C compiler
(``-O3 -march=native``, OpenMP *simd* pragmas only, no OpenMP runtime) into
``<cache>/cpu/<hash>.so``, loads it with ``ctypes`` and memoises it. ``D`` and the token count
are runtime arguments, so one compile serves every shape. Threads are plain pthreads over
fixed token chunks.

Why not ``torch.compile`` of the formula: Inductor splits the per-source reductions into
several loops over the tokens and re-reads the sources from memory for the weighted sum
(measured at ~2 GB/s here, under 25% of copy bandwidth). The kernels below make one pass
over memory per token, the second sweep over a token's rows hitting L1/L2:

* forward, per token: sweep each source row once for sum of squares and ``u . v`` (``M`` rows
  from memory), softmax over the ``M`` logits, then ``h = sum_j alpha_j v_j`` in one vectorised
  sweep over ``d`` with the ``M`` rows as unrolled streams (rows now in L1/L2). Memory
  traffic: ``M*D`` read, ``D`` written.
* backward, per token: ``G = scale * grad`` into a per-thread float buffer, one sweep per
  source for ``|v|^2``, ``u . v`` and ``G . v``, the peaked-softmax-stable ``ds`` (``da``
  measured from the winning source, as in ``ops/depth_attention.py``), then one sweep per
  source writing ``grad v_j`` and accumulating ``du``. Memory traffic: ``M*D + D`` read,
  ``M*D`` written. ``du`` is summed per fixed 64-token chunk into a ``[chunks, D]`` float32
  buffer and the chunks are summed in order, so the result does not depend on the thread
  count.
* phase 1 / phase 2 of two-phase inference (``ops/two_phase.py``), the same way; phase 1
  computes its ``S x N`` scores over 256-column chunks so the block chunks (converted to
  float once) and every site's ``u`` chunk stay in L1.

Streaming sweeps prefetch 4 KiB ahead, continuing into the row read next; fresh output
buffers get a transparent-huge-page hint (``ATTNRES_CPU_HUGEPAGES=0`` disables it).

Everything is optional: with no C compiler (or ``ATTNRES_CPU_KERNELS=0``) :func:`available`
is false and the ops use the plain PyTorch implementation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .triton_codegen import cache_dir

__all__ = [
    "available",
    "supports",
    "forward",
    "backward",
    "phase1",
    "phase2",
    "generate_c_source",
    "CpuSpec",
]

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_GROUP = 8  # sources per unrolled weighted-sum sweep (keeps streams and registers bounded)
_TOKEN_CHUNK = 64  # tokens per du partial row in the backward (fixed: thread-count independent)
_CFLAGS = [
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-pthread",
]
CPU_CODEGEN_VERSION = "10"


@dataclass(frozen=True)
class CpuSpec:
    kind: str  # "fwd", "bwd", "phase1", "phase2"
    m: int  # sources (fwd/bwd), blocks (phase1); 1 for phase2
    dtype: str

    @property
    def name(self) -> str:
        return f"attnres_cpu_{self.kind}_m{self.m}_{self.dtype}"


# --------------------------------------------------------------------------------------------
# C source
# --------------------------------------------------------------------------------------------

_PRELUDE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>

#define M {m}
#define TOKEN_CHUNK {token_chunk}
#define JG {group}  /* sources per unrolled sweep group */
#define VL 16
#define RB 256
typedef float vf __attribute__((vector_size(VL * 4)));
static inline vf VLDF(const float* p) {{ vf r; memcpy(&r, p, sizeof r); return r; }}
{dtype_block}
/* Software prefetch PF_BYTES ahead of a streaming sweep; past the end of the row it prefetches
   the start of the row that will be read next (hardware prefetchers stop at page and array
   boundaries). Measured +35-50% single-core read bandwidth on this machine. */
#define PF_BYTES 4096
#define PFD ((int64_t)(PF_BYTES / sizeof(IN)))
#define PREFETCH(v, nxt, d, D) __builtin_prefetch((d) + PFD < (D) ? (const void*)((v) + (d) + PFD) : (const void*)((nxt) + ((d) + PFD - (D))), 0, 3)

typedef void (*work_fn)(void* ctx, int64_t begin, int64_t end);
typedef struct {{ work_fn fn; void* ctx; int64_t begin, end; }} job_t;
static void* run_job(void* p) {{ job_t* j = (job_t*)p; j->fn(j->ctx, j->begin, j->end); return NULL; }}

/* Split [0, n) into nthreads contiguous ranges; run them on pthreads (caller takes the first). */
static void parallel_for(int nthreads, int64_t n, work_fn fn, void* ctx) {{
    if (nthreads > n) nthreads = (int)n;
    if (nthreads <= 1) {{ if (n > 0) fn(ctx, 0, n); return; }}
    job_t jobs[64]; pthread_t tids[64]; int started[64];
    if (nthreads > 64) nthreads = 64;
    for (int i = 0; i < nthreads; i++) {{
        jobs[i].fn = fn; jobs[i].ctx = ctx;
        jobs[i].begin = n * i / nthreads; jobs[i].end = n * (i + 1) / nthreads;
    }}
    for (int i = 1; i < nthreads; i++) started[i] = pthread_create(&tids[i], NULL, run_job, &jobs[i]) == 0;
    run_job(&jobs[0]);
    for (int i = 1; i < nthreads; i++) {{
        if (started[i]) pthread_join(tids[i], NULL); else run_job(&jobs[i]);
    }}
}}

/* |v|^2 and u.v of one row */
/* Reductions use GCC vector extensions (VL float lanes, AVX-512 with -march=native where the CPU
   has it): vector accumulators per block of RB columns, blocks added lane-wise, the lanes summed
   as a tree at the end, so rounding error grows like RB/VL + D/RB + log2(VL), not like D. */
static inline float hsum(vf x) {{
    float a[VL]; memcpy(a, &x, sizeof a);
    for (int w = VL / 2; w > 0; w /= 2) for (int i = 0; i < w; i++) a[i] += a[i + w];
    return a[0];
}}

/* *ss_out = sum_d v^2 and, when u is given, *dot_out = sum_d v*u */
static inline void row_sums2(const IN* v, const float* u, int64_t D, float* ss_out, float* dot_out, const IN* nxt) {{
    vf tss = {{0}}, tdot = {{0}};
    int64_t d = 0;
    while (d + VL <= D) {{
        const int64_t end = d + RB < D ? d + RB : D;
        vf bss = {{0}}, bdot = {{0}};
        if (u) {{ for (; d + VL <= end; d += VL) {{ PREFETCH(v, nxt, d, D); vf x = VLD(v + d); bss += x * x; bdot += x * VLDF(u + d); }} }}
        else {{ for (; d + VL <= end; d += VL) {{ PREFETCH(v, nxt, d, D); vf x = VLD(v + d); bss += x * x; }} }}
        tss += bss; tdot += bdot;
    }}
    float ss = hsum(tss), dot = hsum(tdot);
    for (; d < D; d++) {{ float x = LD(v[d]); ss += x * x; if (u) dot += x * u[d]; }}
    *ss_out = ss;
    if (dot_out) *dot_out = dot;
}}

/* row_sums2 on float data (phase 1's converted chunks) */
static inline void row_sums2_f(const float* v, const float* u, int64_t D, float* ss_out, float* dot_out) {{
    vf tss = {{0}}, tdot = {{0}};
    int64_t d = 0;
    if (u) {{ for (; d + VL <= D; d += VL) {{ vf x = VLDF(v + d); tss += x * x; tdot += x * VLDF(u + d); }} }}
    else {{ for (; d + VL <= D; d += VL) {{ vf x = VLDF(v + d); tss += x * x; }} }}
    float ss = hsum(tss), dot = hsum(tdot);
    for (; d < D; d++) {{ float x = v[d]; ss += x * x; if (u) dot += x * u[d]; }}
    *ss_out = ss;
    if (dot_out) *dot_out = dot;
}}

/* sum_d v*u on float data */
static inline float dot_f(const float* v, const float* u, int64_t D) {{
    vf a0 = {{0}}, a1 = {{0}};
    int64_t d = 0;
    for (; d + 2 * VL <= D; d += 2 * VL) {{ a0 += VLDF(v + d) * VLDF(u + d); a1 += VLDF(v + d + VL) * VLDF(u + d + VL); }}
    for (; d + VL <= D; d += VL) a0 += VLDF(v + d) * VLDF(u + d);
    float s = hsum(a0 + a1);
    for (; d < D; d++) s += v[d] * u[d];
    return s;
}}

/* sum_d v^2, sum_d v*u, sum_d v*w */
static inline void row_sums3(const IN* v, const float* u, const float* w, int64_t D, float* o1, float* o2, float* o3,
                             const IN* nxt) {{
    vf t1 = {{0}}, t2 = {{0}}, t3 = {{0}};
    int64_t d = 0;
    while (d + VL <= D) {{
        const int64_t end = d + RB < D ? d + RB : D;
        vf b1 = {{0}}, b2 = {{0}}, b3 = {{0}};
        for (; d + VL <= end; d += VL) {{
            PREFETCH(v, nxt, d, D);
            vf x = VLD(v + d); b1 += x * x; b2 += x * VLDF(u + d); b3 += x * VLDF(w + d);
        }}
        t1 += b1; t2 += b2; t3 += b3;
    }}
    float s1 = hsum(t1), s2 = hsum(t2), s3 = hsum(t3);
    for (; d < D; d++) {{ float x = LD(v[d]); s1 += x * x; s2 += x * u[d]; s3 += x * w[d]; }}
    *o1 = s1; *o2 = s2; *o3 = s3;
}}
"""

_DTYPE_BLOCKS = {
    "fp32": """typedef float IN;
static inline float LD(IN x) { return x; }
static inline IN ST(float f) { return f; }
#define VLD(p) VLDF(p)""",
    "bf16": r"""typedef uint16_t IN;
static inline float LD(IN x) { uint32_t b = (uint32_t)x << 16; float f; memcpy(&f, &b, 4); return f; }
static inline IN ST(float f) {
    uint32_t b; memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (IN)((b >> 16) | 0x40u); /* quiet NaN */
    b += 0x7fffu + ((b >> 16) & 1u);                                  /* round to nearest even */
    return (IN)(b >> 16);
}
typedef uint16_t vu16 __attribute__((vector_size(VL * 2)));
typedef uint32_t vu32 __attribute__((vector_size(VL * 4)));
static inline vf VLD(const IN* p) {
    vu16 h; memcpy(&h, p, sizeof h);
    vu32 w = __builtin_convertvector(h, vu32) << 16;
    vf r; memcpy(&r, &w, sizeof r); return r;
}""",
    "fp16": """typedef _Float16 IN;
static inline float LD(IN x) { return (float)x; }
static inline IN ST(float f) { return (IN)f; }
typedef _Float16 vh __attribute__((vector_size(VL * 2)));
static inline vf VLD(const IN* p) { vh h; memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vf); }""",
}

_FWD = r"""
typedef struct {
    const IN* const* src; const int64_t* rs; const float* u; float eps, scale; IN* out; int64_t T, D;
} fwd_ctx;

static void fwd_work(void* p, int64_t t0, int64_t t1) {
    const fwd_ctx* c = (const fwd_ctx*)p;
    const int64_t D = c->D;
    float w[M];
    float* acc = M > JG ? (float*)malloc(sizeof(float) * (size_t)D) : NULL;
    for (int64_t t = t0; t < t1; t++) {
        float mx = -INFINITY;
        for (int j = 0; j < M; j++) {
            float ss, dot;
            const IN* nxt = j + 1 < M ? c->src[j + 1] + t * c->rs[j + 1]
                          : c->src[0] + (t + 1 < t1 ? t + 1 : t) * c->rs[0];
            row_sums2(c->src[j] + t * c->rs[j], c->u, D, &ss, &dot, nxt);
            w[j] = dot / sqrtf(ss / (float)D + c->eps);
            mx = w[j] > mx ? w[j] : mx;
        }
        float z = 0.f;
        for (int j = 0; j < M; j++) { w[j] = expf(w[j] - mx); z += w[j]; }
        const float r = c->scale / z;
        for (int j = 0; j < M; j++) w[j] *= r;
        IN* out = c->out + t * D;
        const IN* vp[M];
        for (int j = 0; j < M; j++) vp[j] = c->src[j] + t * c->rs[j];
        /* rows are in L1/L2 now: vectorised sweeps over d, sources in unrolled groups */
/*@FWD_SWEEP@*/
    }
    free(acc);
}

void attnres_fwd(const IN* const* src, const int64_t* rs, const float* u, float eps, float scale,
                 IN* out, int64_t T, int64_t D, int nthreads) {
    fwd_ctx c = {src, rs, u, eps, scale, out, T, D};
    parallel_for(nthreads, T, fwd_work, &c);
}
"""

_BWD = r"""
typedef struct {
    const IN* grad; int64_t grs, gcs; const IN* const* src; const int64_t* rs; IN* const* dst;
    const float* u; float eps, scale; float* partial; int64_t T, D;
} bwd_ctx;

static void bwd_work(void* p, int64_t k0, int64_t k1) {
    const bwd_ctx* c = (const bwd_ctx*)p;
    const int64_t D = c->D;
    const float invD = 1.0f / (float)D;
    float* G = (float*)malloc(sizeof(float) * (size_t)D);
    float ir[M], s[M], da[M], a[M];
    for (int64_t k = k0; k < k1; k++) {
        float* du = c->partial + k * D;
        memset(du, 0, sizeof(float) * (size_t)D);
        const int64_t t1 = (k + 1) * TOKEN_CHUNK < c->T ? (k + 1) * TOKEN_CHUNK : c->T;
        for (int64_t t = k * TOKEN_CHUNK; t < t1; t++) {
            const IN* g = c->grad + t * c->grs;
            if (c->gcs == 1) {
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) G[d] = LD(g[d]) * c->scale;
            } else {
                for (int64_t d = 0; d < D; d++) G[d] = LD(g[d * c->gcs]) * c->scale;
            }
            float mx = -INFINITY; int win = 0;
            for (int j = 0; j < M; j++) {
                const IN* v = c->src[j] + t * c->rs[j];
                float ss, dot, dg;
                const IN* nxt = j + 1 < M ? c->src[j + 1] + t * c->rs[j + 1]
                              : (t + 1 < t1 && c->gcs == 1 ? c->grad + (t + 1) * c->grs : v);
                row_sums3(v, c->u, G, D, &ss, &dot, &dg, nxt);
                ir[j] = 1.0f / sqrtf(ss * invD + c->eps);
                s[j] = dot * ir[j];
                da[j] = dg;
                if (s[j] > mx) { mx = s[j]; win = j; }
            }
            float z = 0.f;
            for (int j = 0; j < M; j++) { a[j] = expf(s[j] - mx); z += a[j]; }
            const float rz = 1.0f / z, daw = da[win];
            float delta = 0.f;
            for (int j = 0; j < M; j++) { a[j] *= rz; da[j] -= daw; delta += a[j] * da[j]; }
            /* pass 2: one sweep over d; the M rows (now in L1/L2) and the M gradient rows are
               unrolled streams, du[d] is updated once per token */
            float cu[M], cv[M]; const IN* vp[M]; IN* op[M];
            for (int j = 0; j < M; j++) {
                cu[j] = a[j] * (da[j] - delta) * ir[j];
                cv[j] = cu[j] * s[j] * ir[j] * invD;
                vp[j] = c->src[j] + t * c->rs[j];
                op[j] = c->dst[j] + t * D;
            }
            const float* u = c->u;
/*@BWD_SWEEP@*/
        }
    }
    free(G);
}

/* partial: [ceil(T / TOKEN_CHUNK), D] scratch; du_out: [D] = sum of its rows, in order. */
void attnres_bwd(const IN* grad, int64_t grs, int64_t gcs, const IN* const* src, const int64_t* rs,
                 IN* const* dst, const float* u, float eps, float scale, float* partial, float* du_out,
                 int64_t T, int64_t D, int nthreads) {
    bwd_ctx c = {grad, grs, gcs, src, rs, dst, u, eps, scale, partial, T, D};
    const int64_t chunks = (T + TOKEN_CHUNK - 1) / TOKEN_CHUNK;
    parallel_for(nthreads, chunks, bwd_work, &c);
    memset(du_out, 0, sizeof(float) * (size_t)D);
    for (int64_t k = 0; k < chunks; k++) {
        const float* row = partial + k * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) du_out[d] += row[d];
    }
}
"""

_PHASE1 = r"""
typedef struct {
    const IN* const* blk; const int64_t* rs; const float* u; int64_t S; float eps;
    IN* o; float* m; float* z; int64_t T, D;
} p1_ctx;

/* The S x N scores of a token are a small matrix product: walk D in chunks of P1_CHUNK
   columns so that the chunk of every block (converted to float once) and of every site's
   u = w * g stay in L1 while all S*N dot products consume it. */
#define P1_CHUNK 256
static void p1_work(void* p, int64_t t0, int64_t t1) {
    const p1_ctx* c = (const p1_ctx*)p;
    const int64_t D = c->D, S = c->S, T = c->T;
    const float invD = 1.0f / (float)D;
    float ir[M]; float ssq[M]; float e[M]; const IN* vp[M];
    float xf[M][P1_CHUNK];
    float* dots = (float*)malloc(sizeof(float) * (size_t)(S * M));
    float* acc = M > JG ? (float*)malloc(sizeof(float) * (size_t)D) : NULL;
    for (int64_t t = t0; t < t1; t++) {
        for (int j = 0; j < M; j++) { vp[j] = c->blk[j] + t * c->rs[j]; ssq[j] = 0.f; }
        memset(dots, 0, sizeof(float) * (size_t)(S * M));
        for (int64_t c0 = 0; c0 < D; c0 += P1_CHUNK) {
            const int64_t n = D - c0 < P1_CHUNK ? D - c0 : P1_CHUNK;
            for (int j = 0; j < M; j++) {
                const IN* v = vp[j] + c0;
                float* x = xf[j];
                for (int64_t b = 0; b < n * (int64_t)sizeof(IN); b += 64) __builtin_prefetch((const char*)v + PF_BYTES + b, 0, 3);
                #pragma omp simd
                for (int64_t d = 0; d < n; d++) x[d] = LD(v[d]);
                float ss;
                row_sums2_f(x, NULL, n, &ss, NULL);
                ssq[j] += ss;
            }
            for (int64_t l = 0; l < S; l++) {
                const float* u = c->u + l * D + c0;
                for (int j = 0; j < M; j++) dots[l * M + j] += dot_f(xf[j], u, n);
            }
        }
        for (int j = 0; j < M; j++) ir[j] = 1.0f / sqrtf(ssq[j] * invD + c->eps);
        for (int64_t l = 0; l < S; l++) {
            float mx = -INFINITY;
            for (int j = 0; j < M; j++) { e[j] = dots[l * M + j] * ir[j]; mx = e[j] > mx ? e[j] : mx; }
            float z = 0.f;
            for (int j = 0; j < M; j++) { e[j] = expf(e[j] - mx); z += e[j]; }
            c->m[l * T + t] = mx; c->z[l * T + t] = z;
            IN* out = c->o + (l * T + t) * D;
            const float* w = e;
/*@P1_SWEEP@*/
        }
    }
    free(acc);
    free(dots);
}

void attnres_phase1(const IN* const* blk, const int64_t* rs, const float* u, int64_t S, float eps,
                    IN* o, float* m, float* z, int64_t T, int64_t D, int nthreads) {
    p1_ctx c = {blk, rs, u, S, eps, o, m, z, T, D};
    parallel_for(nthreads, T, p1_work, &c);
}
"""

_PHASE2 = r"""
typedef struct {
    const IN* o; int64_t ors; const float* m; const float* z; const IN* p; int64_t prs;
    const float* u; float eps, scale; IN* out; int64_t T, D;
} p2_ctx;

static void p2_work(void* p, int64_t t0, int64_t t1) {
    const p2_ctx* c = (const p2_ctx*)p;
    const int64_t D = c->D;
    for (int64_t t = t0; t < t1; t++) {
        const IN* o = c->o + t * c->ors;
        IN* out = c->out + t * D;
        float wa, wb;
        const IN* pr = c->p ? c->p + t * c->prs : NULL;
        if (pr) {
            float ss, dot;
            row_sums2(pr, c->u, D, &ss, &dot, t + 1 < t1 ? c->p + (t + 1) * c->prs : pr);
            const float sp = dot / sqrtf(ss / (float)D + c->eps);
            const float m1 = c->m[t], mx = sp > m1 ? sp : m1;
            const float a = expf(m1 - mx), b = expf(sp - mx);
            const float r = c->scale / (a * c->z[t] + b);
            wa = a * r; wb = b * r;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) out[d] = ST(wa * LD(o[d]) + wb * LD(pr[d]));
        } else {
            wa = c->scale / c->z[t];
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) out[d] = ST(wa * LD(o[d]));
        }
    }
}

void attnres_phase2(const IN* o, int64_t ors, const float* m, const float* z, const IN* p, int64_t prs,
                    const float* u, float eps, float scale, IN* out, int64_t T, int64_t D, int nthreads) {
    p2_ctx c = {o, ors, m, z, p, prs, u, eps, scale, out, T, D};
    parallel_for(nthreads, T, p2_work, &c);
}
"""

_BODIES = {"fwd": _FWD, "bwd": _BWD, "phase1": _PHASE1, "phase2": _PHASE2}


def _groups(m: int) -> list[range]:
    return [range(g, min(m, g + _GROUP)) for g in range(0, m, _GROUP)]


def _weighted_sum_sweeps(m: int, w: str, out: str, indent: int) -> str:
    """``out[d] = ST(sum_j w[j] * v_j[d])`` as vectorised sweeps over d, ``_GROUP`` unrolled
    sources per sweep (partial sums in the float buffer ``acc`` between sweeps)."""
    pad = " " * indent
    lines = []
    groups = _groups(m)
    for k, grp in enumerate(groups):
        terms = " + ".join(f"{w}[{j}] * LD(vp[{j}][d])" for j in grp)
        first, last = k == 0, k == len(groups) - 1
        if first and last:
            stmt = f"{out}[d] = ST({terms});"
        elif first:
            stmt = f"acc[d] = {terms};"
        elif last:
            stmt = f"{out}[d] = ST(acc[d] + {terms});"
        else:
            stmt = f"acc[d] += {terms};"
        lines += [f"{pad}#pragma omp simd", f"{pad}for (int64_t d = 0; d < D; d++) {stmt}"]
    return "\n".join(lines)


def _backward_sweeps(m: int, indent: int) -> str:
    """Gradient rows of ``_GROUP`` sources per vectorised sweep; ``du[d]`` once per sweep."""
    pad = " " * indent
    lines = []
    for grp in _groups(m):
        lines += [f"{pad}#pragma omp simd", f"{pad}for (int64_t d = 0; d < D; d++) {{",
                  f"{pad}    const float gd = G[d], ud = u[d];", f"{pad}    float acc = du[d];"]
        for j in grp:
            lines += [
                f"{pad}    {{ const float x = LD(vp[{j}][d]);",
                f"{pad}      op[{j}][d] = ST(a[{j}] * gd + cu[{j}] * ud - cv[{j}] * x); acc += cu[{j}] * x; }}",
            ]
        lines += [f"{pad}    du[d] = acc;", f"{pad}}}"]
    return "\n".join(lines)


def generate_c_source(spec: CpuSpec) -> str:
    head = f"/* Generated by attnres_compile.lowering.cpu_kernels (version {CPU_CODEGEN_VERSION}): {spec} */\n"
    prelude = _PRELUDE.format(
        m=spec.m, token_chunk=_TOKEN_CHUNK, group=_GROUP, dtype_block=_DTYPE_BLOCKS[spec.dtype]
    )
    body = _BODIES[spec.kind]
    body = body.replace("/*@FWD_SWEEP@*/", _weighted_sum_sweeps(spec.m, "w", "out", 8))
    body = body.replace("/*@P1_SWEEP@*/", _weighted_sum_sweeps(spec.m, "w", "out", 12))
    body = body.replace("/*@BWD_SWEEP@*/", _backward_sweeps(spec.m, 12))
    return head + prelude + body


# --------------------------------------------------------------------------------------------
# Compile + load
# --------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_LIBS: dict[CpuSpec, object] = {}
_FAILED: dict[CpuSpec, str] = {}
_COMPILER: list[str | None] = []


def _compiler() -> str | None:
    if not _COMPILER:
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
        _COMPILER.append(cc)
    return _COMPILER[0]


def _machine_tag() -> str:
    """-march=native output depends on the CPU: key the cache on it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    flags += line
                    if line.startswith("flags"):
                        break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def available() -> bool:
    """True when the fast path can be used (a C compiler exists and it is not disabled)."""
    if os.environ.get("ATTNRES_CPU_KERNELS", "1") in ("0", "false", "False", ""):
        return False
    return _compiler() is not None


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPES


def _load(spec: CpuSpec):
    lib = _LIBS.get(spec)
    if lib is not None:
        return lib
    if spec in _FAILED:
        return None
    with _LOCK:
        lib = _LIBS.get(spec)
        if lib is not None or spec in _FAILED:
            return lib
        cc = _compiler()
        if cc is None:
            _FAILED[spec] = "no C compiler"
            return None
        text = generate_c_source(spec)
        key = hashlib.sha256("\0".join([text, cc, *_CFLAGS, _machine_tag()]).encode()).hexdigest()[:20]
        out_dir = cache_dir() / "cpu"
        so_path = out_dir / f"{spec.name}_{key}.so"
        if not so_path.exists():
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                c_path = out_dir / f"{spec.name}_{key}.c"
                tmp_so = out_dir / f".{so_path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                c_path.write_text(text)
                subprocess.run(
                    [cc, *_CFLAGS, str(c_path), "-o", str(tmp_so), "-lm"],
                    check=True, capture_output=True, text=True, timeout=120,
                )
                os.replace(tmp_so, so_path)
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", "") or str(exc)
                _FAILED[spec] = detail
                log.warning("attnres_compile: CPU kernel %s failed to compile, using plain PyTorch: %s", spec.name, detail)
                return None
        try:
            lib = ctypes.CDLL(str(so_path))
        except OSError as exc:
            _FAILED[spec] = str(exc)
            log.warning("attnres_compile: could not load %s: %s", so_path, exc)
            return None
        _declare(lib, spec)
        _LIBS[spec] = lib
        return lib


def _declare(lib, spec: CpuSpec) -> None:
    P, I64, F, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    if spec.kind == "fwd":
        lib.attnres_fwd.argtypes = [P, P, P, F, F, P, I64, I64, I]
        lib.attnres_fwd.restype = None
    elif spec.kind == "bwd":
        lib.attnres_bwd.argtypes = [P, I64, I64, P, P, P, P, F, F, P, P, I64, I64, I]
        lib.attnres_bwd.restype = None
    elif spec.kind == "phase1":
        lib.attnres_phase1.argtypes = [P, P, P, I64, F, P, P, P, I64, I64, I]
        lib.attnres_phase1.restype = None
    else:
        lib.attnres_phase2.argtypes = [P, I64, P, P, P, I64, P, F, F, P, I64, I64, I]
        lib.attnres_phase2.restype = None


def kernel_for(kind: str, m: int, dtype: torch.dtype):
    """The loaded library for a specialisation, or None (no compiler, unsupported, failed)."""
    if not available() or dtype not in _DTYPES:
        return None
    return _load(CpuSpec(kind, m, _DTYPES[dtype]))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


_HUGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14
_LIBC: list = []


def _madvise_huge(t: Tensor) -> None:
    """Ask Linux for transparent huge pages on a fresh, untouched output buffer.

    Large CPU allocations are fresh ``mmap`` memory on every call, and first-touch faults on
    4 KiB pages cost as much as the kernel itself (a fresh 256 MiB fill runs at ~2 GB/s here,
    ~4.5 GB/s with huge pages). This is the per-buffer version of PyTorch's
    ``THP_MEM_ALLOC_ENABLE=1``; a hint only, skipped off Linux or with ATTNRES_CPU_HUGEPAGES=0.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < _HUGE_MIN_BYTES or os.environ.get("ATTNRES_CPU_HUGEPAGES", "1") in ("0", "false", "False"):
        return
    try:
        if not _LIBC:
            libc = ctypes.CDLL(None, use_errno=True) if platform.system() == "Linux" else None
            if libc is not None:
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
            _LIBC.append(libc)
        libc = _LIBC[0]
        if libc is None:
            return
        start = (t.data_ptr() + 4095) & ~4095
        end = (t.data_ptr() + nbytes) & ~4095
        if end > start:
            libc.madvise(start, end - start, _MADV_HUGEPAGE)
    except Exception:  # pragma: no cover - a hint, never an error
        pass


def _empty(shape, dtype: torch.dtype) -> Tensor:
    out = torch.empty(shape, dtype=dtype)
    _madvise_huge(out)
    return out


def _rows(t: Tensor, d: int) -> Tensor:
    r = t.reshape(-1, d)
    if r.stride(1) != 1 and d > 1:
        r = r.contiguous()
    return r


def _threads(work_elems: int) -> int:
    """Use every intra-op thread once there is at least ~256 KiB of work per thread."""
    return max(1, min(torch.get_num_threads(), work_elems // (1 << 16)))


def _ptr_array(ts: Sequence[Tensor]):
    arr = (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])
    return arr


def _i64_array(vals: Sequence[int]):
    return (ctypes.c_int64 * len(vals))(*vals)


def _u(query: Tensor, gain: Tensor) -> Tensor:
    return (query.float() * gain.float()).contiguous()


def forward(
    sources: Sequence[Tensor], query: Tensor, norm_weight: Tensor, eps: float, scale: float, *, out: Tensor | None = None
) -> Tensor | None:
    """``h`` [..., D], or None when the fast path cannot run (caller falls back)."""
    first = sources[0]
    lib = kernel_for("fwd", len(sources), first.dtype)
    if lib is None:
        return None
    d = first.shape[-1]
    rows = [_rows(s, d) for s in sources]
    t = rows[0].shape[0]
    if out is None:
        out = _empty(first.shape, first.dtype)
    u = _u(query, norm_weight)
    lib.attnres_fwd(
        _ptr_array(rows), _i64_array([r.stride(0) for r in rows]), u.data_ptr(), float(eps), float(scale),
        out.data_ptr(), t, d, _threads(t * d * len(sources)),
    )
    return out


def backward(
    grad_out: Tensor,
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Tensor,
    eps: float,
    scale: float,
    *,
    out: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor], Tensor, Tensor] | None:
    first = sources[0]
    lib = kernel_for("bwd", len(sources), first.dtype)
    if lib is None:
        return None
    d = first.shape[-1]
    rows = [_rows(s, d) for s in sources]
    t = rows[0].shape[0]
    if grad_out.dtype != first.dtype:
        grad_out = grad_out.to(first.dtype)
    grad = grad_out.reshape(-1, d)
    grads = list(out) if out is not None else [_empty(first.shape, first.dtype) for _ in sources]
    chunks = max(1, -(-t // _TOKEN_CHUNK))
    partial = torch.empty((chunks, d), dtype=torch.float32)
    du = torch.empty(d, dtype=torch.float32)
    u = _u(query, norm_weight)
    lib.attnres_bwd(
        grad.data_ptr(), grad.stride(0), grad.stride(1), _ptr_array(rows), _i64_array([r.stride(0) for r in rows]),
        _ptr_array(grads), u.data_ptr(), float(eps), float(scale), partial.data_ptr(), du.data_ptr(),
        t, d, _threads(t * d * len(sources)),
    )
    grad_query = (du * norm_weight.float()).to(query.dtype)
    grad_norm_weight = (du * query.float()).to(norm_weight.dtype)
    return grads, grad_query, grad_norm_weight


def phase1(
    blocks: Sequence[Tensor], queries: Tensor, gains: Tensor, eps: float,
    *, out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    first = blocks[0]
    lib = kernel_for("phase1", len(blocks), first.dtype)
    if lib is None:
        return None
    d = first.shape[-1]
    s = queries.shape[0]
    rows = [_rows(b, d) for b in blocks]
    t = rows[0].shape[0]
    if out is not None:
        o, m, z = out
    else:
        o = _empty((s, *first.shape), first.dtype)
        m = torch.empty((s, *first.shape[:-1]), dtype=torch.float32)
        z = torch.empty((s, *first.shape[:-1]), dtype=torch.float32)
    u = (queries.float() * gains.float()).contiguous()
    lib.attnres_phase1(
        _ptr_array(rows), _i64_array([r.stride(0) for r in rows]), u.data_ptr(), s, float(eps),
        o.data_ptr(), m.data_ptr(), z.data_ptr(), t, d, _threads(t * d * (len(blocks) + s)),
    )
    return o, m, z


def phase2(
    o: Tensor, m: Tensor, z: Tensor, partial: Tensor | None, query: Tensor, gain: Tensor, eps: float, scale: float
) -> Tensor | None:
    lib = kernel_for("phase2", 1, o.dtype)
    if lib is None:
        return None
    d = o.shape[-1]
    o_rows = _rows(o, d)
    t = o_rows.shape[0]
    m_flat = m.reshape(-1).float().contiguous()
    z_flat = z.reshape(-1).float().contiguous()
    out = _empty(o.shape, o.dtype)
    u = _u(query, gain)
    if partial is not None:
        p_rows = _rows(partial.to(o.dtype), d)
        p_ptr, p_rs = p_rows.data_ptr(), p_rows.stride(0)
    else:
        p_ptr, p_rs = None, 0
    lib.attnres_phase2(
        o_rows.data_ptr(), o_rows.stride(0), m_flat.data_ptr(), z_flat.data_ptr(), p_ptr, p_rs, u.data_ptr(),
        float(eps), float(scale), out.data_ptr(), t, d, _threads(t * d * 2),
    )
    return out
