/* Depth-attention CPU kernels (SPEC.md section 2), included once per instruction-set target by
 * attnres_cpu.cpp (baseline x86-64, AVX2+FMA, AVX-512), each time inside its own namespace.
 * No #include here: the includer provides <cstdint>, <cstring>, <cmath>.
 *
 * One pass over memory per token: each source row is swept once for its sum of squares and
 * u . v (u = query * norm_weight, float32), the M logits go through a softmax, and the weighted
 * sum runs over d with up to JG source rows as unrolled streams (the rows are in L1/L2 by then).
 * Storage dtypes: float32, bfloat16 (round to nearest even), float16; math in float32.
 * Reductions use vector accumulators per block of RB columns, so rounding error grows like
 * RB/VL + D/RB + log2(VL), not like D.
 */

#define VL 16
#define RB 256
#define JG 8             /* sources per unrolled weighted-sum sweep */
#define PF_BYTES 4096    /* software prefetch distance of streaming sweeps */

typedef float vf __attribute__((vector_size(VL * 4)));
static inline vf vldf(const float* p) { vf r; memcpy(&r, p, sizeof r); return r; }
static inline float hsum(vf x) {
  float a[VL];
  memcpy(a, &x, sizeof a);
  for (int w = VL / 2; w > 0; w /= 2)
    for (int i = 0; i < w; i++) a[i] += a[i + w];
  return a[0];
}

struct F32 {
  typedef float T;
  static inline float ld(T x) { return x; }
  static inline T st(float f) { return f; }
  static inline vf vld(const T* p) { return vldf(p); }
};

struct BF16 {
  typedef uint16_t T;
  static inline float ld(T x) { uint32_t b = (uint32_t)x << 16; float f; memcpy(&f, &b, 4); return f; }
  static inline T st(float f) {
    uint32_t b; memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (T)((b >> 16) | 0x40u); /* quiet NaN */
    b += 0x7fffu + ((b >> 16) & 1u);                                  /* round to nearest even */
    return (T)(b >> 16);
  }
  typedef uint16_t vu16 __attribute__((vector_size(VL * 2)));
  typedef uint32_t vu32 __attribute__((vector_size(VL * 4)));
  static inline vf vld(const T* p) {
    vu16 h; memcpy(&h, p, sizeof h);
    vu32 w = __builtin_convertvector(h, vu32) << 16;
    vf r; memcpy(&r, &w, sizeof r); return r;
  }
};

struct F16 {
  typedef _Float16 T;
  static inline float ld(T x) { return (float)x; }
  static inline T st(float f) { return (T)f; }
  typedef _Float16 vh __attribute__((vector_size(VL * 2)));
  static inline vf vld(const T* p) { vh h; memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vf); }
};

/* Prefetch PF_BYTES ahead; past the end of the row, the start of the row read next (hardware
   prefetchers stop at page and array boundaries). */
template <class DT>
static inline void prefetch(const typename DT::T* v, const typename DT::T* nxt, int64_t d, int64_t D) {
  const int64_t pfd = (int64_t)(PF_BYTES / sizeof(typename DT::T));
  __builtin_prefetch(d + pfd < D ? (const void*)(v + d + pfd) : (const void*)(nxt + (d + pfd - D)), 0, 3);
}

/* *ss = sum v^2 and, when u is given, *dot = sum v*u */
template <class DT>
static inline void row_sums2(const typename DT::T* v, const float* u, int64_t D, float* ss_out, float* dot_out,
                             const typename DT::T* nxt) {
  vf tss = {0}, tdot = {0};
  int64_t d = 0;
  while (d + VL <= D) {
    const int64_t end = d + RB < D ? d + RB : D;
    vf bss = {0}, bdot = {0};
    if (u) {
      for (; d + VL <= end; d += VL) { prefetch<DT>(v, nxt, d, D); vf x = DT::vld(v + d); bss += x * x; bdot += x * vldf(u + d); }
    } else {
      for (; d + VL <= end; d += VL) { prefetch<DT>(v, nxt, d, D); vf x = DT::vld(v + d); bss += x * x; }
    }
    tss += bss; tdot += bdot;
  }
  float ss = hsum(tss), dot = hsum(tdot);
  for (; d < D; d++) { float x = DT::ld(v[d]); ss += x * x; if (u) dot += x * u[d]; }
  *ss_out = ss;
  if (dot_out) *dot_out = dot;
}

/* sum v^2, sum v*u, sum v*w */
template <class DT>
static inline void row_sums3(const typename DT::T* v, const float* u, const float* w, int64_t D, float* o1, float* o2,
                             float* o3, const typename DT::T* nxt) {
  vf t1 = {0}, t2 = {0}, t3 = {0};
  int64_t d = 0;
  while (d + VL <= D) {
    const int64_t end = d + RB < D ? d + RB : D;
    vf b1 = {0}, b2 = {0}, b3 = {0};
    for (; d + VL <= end; d += VL) {
      prefetch<DT>(v, nxt, d, D);
      vf x = DT::vld(v + d); b1 += x * x; b2 += x * vldf(u + d); b3 += x * vldf(w + d);
    }
    t1 += b1; t2 += b2; t3 += b3;
  }
  float s1 = hsum(t1), s2 = hsum(t2), s3 = hsum(t3);
  for (; d < D; d++) { float x = DT::ld(v[d]); s1 += x * x; s2 += x * u[d]; s3 += x * w[d]; }
  *o1 = s1; *o2 = s2; *o3 = s3;
}

/* sum of squares and dot product on float data (phase 1's converted chunks) */
static inline void row_sums2_f(const float* v, int64_t D, float* ss_out) {
  vf tss = {0};
  int64_t d = 0;
  for (; d + VL <= D; d += VL) { vf x = vldf(v + d); tss += x * x; }
  float ss = hsum(tss);
  for (; d < D; d++) ss += v[d] * v[d];
  *ss_out = ss;
}
static inline float dot_f(const float* v, const float* u, int64_t D) {
  vf a0 = {0}, a1 = {0};
  int64_t d = 0;
  for (; d + 2 * VL <= D; d += 2 * VL) { a0 += vldf(v + d) * vldf(u + d); a1 += vldf(v + d + VL) * vldf(u + d + VL); }
  for (; d + VL <= D; d += VL) a0 += vldf(v + d) * vldf(u + d);
  float s = hsum(a0 + a1);
  for (; d < D; d++) s += v[d] * u[d];
  return s;
}

/* out[d] (or acc[d]) = [acc[d] +] sum_{j<G} w[j] * v_j[d]: G rows as unrolled streams */
template <class DT, int G, bool FIRST, bool LAST>
static inline void wsum_group(const typename DT::T* const* vp, const float* w, float* __restrict acc,
                              typename DT::T* __restrict out, int64_t D) {
  const typename DT::T* r[G];
  float c[G];
  for (int j = 0; j < G; j++) { r[j] = vp[j]; c[j] = w[j]; }
#pragma omp simd
  for (int64_t d = 0; d < D; d++) {
    float s = FIRST ? 0.f : acc[d];
    for (int j = 0; j < G; j++) s += c[j] * DT::ld(r[j][d]);
    if (LAST) out[d] = DT::st(s); else acc[d] = s;
  }
}

template <class DT, bool FIRST, bool LAST>
static inline void wsum_dispatch(int g, const typename DT::T* const* vp, const float* w, float* acc,
                                 typename DT::T* out, int64_t D) {
  switch (g) {
    case 1: wsum_group<DT, 1, FIRST, LAST>(vp, w, acc, out, D); break;
    case 2: wsum_group<DT, 2, FIRST, LAST>(vp, w, acc, out, D); break;
    case 3: wsum_group<DT, 3, FIRST, LAST>(vp, w, acc, out, D); break;
    case 4: wsum_group<DT, 4, FIRST, LAST>(vp, w, acc, out, D); break;
    case 5: wsum_group<DT, 5, FIRST, LAST>(vp, w, acc, out, D); break;
    case 6: wsum_group<DT, 6, FIRST, LAST>(vp, w, acc, out, D); break;
    case 7: wsum_group<DT, 7, FIRST, LAST>(vp, w, acc, out, D); break;
    default: wsum_group<DT, 8, FIRST, LAST>(vp, w, acc, out, D); break;
  }
}

/* out[d] = sum_j w[j] * v_j[d] over all M rows, JG rows per sweep (acc: [D] float scratch) */
template <class DT>
static inline void weighted_sum(int M, const typename DT::T* const* vp, const float* w, float* acc,
                                typename DT::T* out, int64_t D) {
  for (int g0 = 0; g0 < M; g0 += JG) {
    const int g = M - g0 < JG ? M - g0 : JG;
    const bool first = g0 == 0, last = g0 + g == M;
    if (first && last) wsum_dispatch<DT, true, true>(g, vp + g0, w + g0, acc, out, D);
    else if (first) wsum_dispatch<DT, true, false>(g, vp + g0, w + g0, acc, out, D);
    else if (last) wsum_dispatch<DT, false, true>(g, vp + g0, w + g0, acc, out, D);
    else wsum_dispatch<DT, false, false>(g, vp + g0, w + g0, acc, out, D);
  }
}

/* ---- forward: tokens [t0, t1) ------------------------------------------------------------- */
/* scratch: 2*M floats + M pointers' worth, acc: D floats (only used when M > JG) */
template <class DT>
static void fwd_rows(const typename DT::T* const* src, const int64_t* rs, int M, const float* u, float eps,
                     float scale, typename DT::T* out, int64_t t0, int64_t t1, int64_t D, float* w, float* acc,
                     const typename DT::T** vp) {
  for (int64_t t = t0; t < t1; t++) {
    float mx = -INFINITY;
    for (int j = 0; j < M; j++) {
      float ss, dot;
      const typename DT::T* nxt = j + 1 < M ? src[j + 1] + t * rs[j + 1] : src[0] + (t + 1 < t1 ? t + 1 : t) * rs[0];
      row_sums2<DT>(src[j] + t * rs[j], u, D, &ss, &dot, nxt);
      w[j] = dot / sqrtf(ss / (float)D + eps);
      mx = w[j] > mx ? w[j] : mx;
    }
    float z = 0.f;
    for (int j = 0; j < M; j++) { w[j] = expf(w[j] - mx); z += w[j]; }
    const float r = scale / z;
    for (int j = 0; j < M; j++) { w[j] *= r; vp[j] = src[j] + t * rs[j]; }
    weighted_sum<DT>(M, vp, w, acc, out + t * D, D);
  }
}

/* ---- backward: token chunk [c0, c1) of `chunk` tokens each --------------------------------- */
/* du_rows: one [D] float row per chunk; G: [D] float scratch; f: 6*M floats; vp/op: M pointers */
template <class DT, int G_>
static inline void bwd_group(const typename DT::T* const* vp, typename DT::T* const* op, const float* a,
                             const float* cu, const float* cv, const float* __restrict G, const float* __restrict u,
                             float* __restrict du, int64_t D) {
  const typename DT::T* r[G_];
  typename DT::T* o[G_];
  float ca[G_], cc[G_], cw[G_];
  for (int j = 0; j < G_; j++) { r[j] = vp[j]; o[j] = op[j]; ca[j] = a[j]; cc[j] = cu[j]; cw[j] = cv[j]; }
#pragma omp simd
  for (int64_t d = 0; d < D; d++) {
    const float gd = G[d], ud = u[d];
    float acc = du[d];
    for (int j = 0; j < G_; j++) {
      const float x = DT::ld(r[j][d]);
      o[j][d] = DT::st(ca[j] * gd + cc[j] * ud - cw[j] * x);
      acc += cc[j] * x;
    }
    du[d] = acc;
  }
}

template <class DT>
static void bwd_chunks(const typename DT::T* grad, int64_t grs, int64_t gcs, const typename DT::T* const* src,
                       const int64_t* rs, typename DT::T* const* dst, int M, const float* u, float eps, float scale,
                       float* partial, int64_t T, int64_t D, int64_t chunk, int64_t k0, int64_t k1, float* G,
                       float* f, const typename DT::T** vp, typename DT::T** op) {
  const float invD = 1.0f / (float)D;
  float *ir = f, *s = f + M, *da = f + 2 * M, *a = f + 3 * M, *cu = f + 4 * M, *cv = f + 5 * M;
  for (int64_t k = k0; k < k1; k++) {
    float* du = partial + k * D;
    memset(du, 0, sizeof(float) * (size_t)D);
    const int64_t t1 = (k + 1) * chunk < T ? (k + 1) * chunk : T;
    for (int64_t t = k * chunk; t < t1; t++) {
      const typename DT::T* g = grad + t * grs;
      if (gcs == 1) {
#pragma omp simd
        for (int64_t d = 0; d < D; d++) G[d] = DT::ld(g[d]) * scale;
      } else {
        for (int64_t d = 0; d < D; d++) G[d] = DT::ld(g[d * gcs]) * scale;
      }
      float mx = -INFINITY;
      int win = 0;
      for (int j = 0; j < M; j++) {
        const typename DT::T* v = src[j] + t * rs[j];
        float ss, dot, dg;
        const typename DT::T* nxt = j + 1 < M ? src[j + 1] + t * rs[j + 1] : (t + 1 < t1 && gcs == 1 ? grad + (t + 1) * grs : v);
        row_sums3<DT>(v, u, G, D, &ss, &dot, &dg, nxt);
        ir[j] = 1.0f / sqrtf(ss * invD + eps);
        s[j] = dot * ir[j];
        da[j] = dg;
        if (s[j] > mx) { mx = s[j]; win = j; }
      }
      float z = 0.f;
      for (int j = 0; j < M; j++) { a[j] = expf(s[j] - mx); z += a[j]; }
      /* ds_j = a_j (da_j - sum_i a_i da_i) is shift invariant in da: measuring da from the
         winning source keeps it accurate when the softmax is peaked */
      const float rz = 1.0f / z, daw = da[win];
      float delta = 0.f;
      for (int j = 0; j < M; j++) { a[j] *= rz; da[j] -= daw; delta += a[j] * da[j]; }
      for (int j = 0; j < M; j++) {
        cu[j] = a[j] * (da[j] - delta) * ir[j];
        cv[j] = cu[j] * s[j] * ir[j] * invD;
        vp[j] = src[j] + t * rs[j];
        op[j] = dst[j] + t * D;
      }
      for (int g0 = 0; g0 < M; g0 += JG) {
        const int n = M - g0 < JG ? M - g0 : JG;
        const typename DT::T* const* V = vp + g0;
        typename DT::T* const* O = op + g0;
        switch (n) {
          case 1: bwd_group<DT, 1>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
          case 2: bwd_group<DT, 2>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
          case 3: bwd_group<DT, 3>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
          case 4: bwd_group<DT, 4>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
          case 5: bwd_group<DT, 5>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
          case 6: bwd_group<DT, 6>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
          case 7: bwd_group<DT, 7>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
          default: bwd_group<DT, 8>(V, O, a + g0, cu + g0, cv + g0, G, u, du, D); break;
        }
      }
    }
  }
}

/* ---- two-phase inference, phase 1: tokens [t0, t1) ------------------------------------------ */
/* The S x N scores of a token are a small matrix product: walk D in chunks of P1_CHUNK columns
   so that the chunk of every block (converted to float once) and of every site's u stay in L1.
   xf: N*P1_CHUNK floats; f: 3*N floats; dots: S*N floats; acc: D floats; vp: N pointers. */
#define P1_CHUNK 256
template <class DT>
static void phase1_rows(const typename DT::T* const* blk, const int64_t* rs, int N, const float* u, int64_t S,
                        float eps, typename DT::T* o, float* m, float* z, int64_t T, int64_t D, int64_t t0,
                        int64_t t1, float* xf, float* f, float* dots, float* acc, const typename DT::T** vp) {
  const float invD = 1.0f / (float)D;
  float *ir = f, *ssq = f + N, *e = f + 2 * N;
  for (int64_t t = t0; t < t1; t++) {
    for (int j = 0; j < N; j++) { vp[j] = blk[j] + t * rs[j]; ssq[j] = 0.f; }
    memset(dots, 0, sizeof(float) * (size_t)(S * N));
    for (int64_t c0 = 0; c0 < D; c0 += P1_CHUNK) {
      const int64_t n = D - c0 < P1_CHUNK ? D - c0 : P1_CHUNK;
      for (int j = 0; j < N; j++) {
        const typename DT::T* v = vp[j] + c0;
        float* x = xf + (int64_t)j * P1_CHUNK;
        for (int64_t b = 0; b < n * (int64_t)sizeof(typename DT::T); b += 64)
          __builtin_prefetch((const char*)v + PF_BYTES + b, 0, 3);
#pragma omp simd
        for (int64_t d = 0; d < n; d++) x[d] = DT::ld(v[d]);
        float ss;
        row_sums2_f(x, n, &ss);
        ssq[j] += ss;
      }
      for (int64_t l = 0; l < S; l++) {
        const float* ul = u + l * D + c0;
        for (int j = 0; j < N; j++) dots[l * N + j] += dot_f(xf + (int64_t)j * P1_CHUNK, ul, n);
      }
    }
    for (int j = 0; j < N; j++) ir[j] = 1.0f / sqrtf(ssq[j] * invD + eps);
    for (int64_t l = 0; l < S; l++) {
      float mx = -INFINITY;
      for (int j = 0; j < N; j++) { e[j] = dots[l * N + j] * ir[j]; mx = e[j] > mx ? e[j] : mx; }
      float zz = 0.f;
      for (int j = 0; j < N; j++) { e[j] = expf(e[j] - mx); zz += e[j]; }
      m[l * T + t] = mx;
      z[l * T + t] = zz;
      weighted_sum<DT>(N, vp, e, acc, o + (l * T + t) * D, D);
    }
  }
}

/* ---- phase 2: merge a site's phase-1 state with its partial sum (p may be null) ------------- */
template <class DT>
static void phase2_rows(const typename DT::T* o, int64_t ors, const float* m, const float* z,
                        const typename DT::T* p, int64_t prs, const float* u, float eps, float scale,
                        typename DT::T* out, int64_t t0, int64_t t1, int64_t D) {
  for (int64_t t = t0; t < t1; t++) {
    const typename DT::T* ot = o + t * ors;
    typename DT::T* dst = out + t * D;
    if (p) {
      const typename DT::T* pr = p + t * prs;
      float ss, dot;
      row_sums2<DT>(pr, u, D, &ss, &dot, t + 1 < t1 ? p + (t + 1) * prs : pr);
      const float sp = dot / sqrtf(ss / (float)D + eps);
      const float m1 = m[t], mx = sp > m1 ? sp : m1;
      const float a = expf(m1 - mx), b = expf(sp - mx);
      const float r = scale / (a * z[t] + b);
      const float wa = a * r, wb = b * r;
#pragma omp simd
      for (int64_t d = 0; d < D; d++) dst[d] = DT::st(wa * DT::ld(ot[d]) + wb * DT::ld(pr[d]));
    } else {
      const float wa = scale / z[t];
#pragma omp simd
      for (int64_t d = 0; d < D; d++) dst[d] = DT::st(wa * DT::ld(ot[d]));
    }
  }
}

/* Type-erased entry points (the table is the same type for every target and dtype). */
template <class DT>
static void fwd_e(const void* const* src, const int64_t* rs, int M, const float* u, float eps, float scale, void* out,
                  int64_t t0, int64_t t1, int64_t D, float* w, float* acc, const void** vp) {
  typedef typename DT::T T;
  fwd_rows<DT>((const T* const*)src, rs, M, u, eps, scale, (T*)out, t0, t1, D, w, acc, (const T**)vp);
}
template <class DT>
static void bwd_e(const void* grad, int64_t grs, int64_t gcs, const void* const* src, const int64_t* rs,
                  void* const* dst, int M, const float* u, float eps, float scale, float* partial, int64_t T,
                  int64_t D, int64_t chunk, int64_t k0, int64_t k1, float* G, float* f, const void** vp, void** op) {
  typedef typename DT::T TT;
  bwd_chunks<DT>((const TT*)grad, grs, gcs, (const TT* const*)src, rs, (TT* const*)dst, M, u, eps, scale, partial, T,
                 D, chunk, k0, k1, G, f, (const TT**)vp, (TT**)op);
}
template <class DT>
static void p1_e(const void* const* blk, const int64_t* rs, int N, const float* u, int64_t S, float eps, void* o,
                 float* m, float* z, int64_t T, int64_t D, int64_t t0, int64_t t1, float* xf, float* f, float* dots,
                 float* acc, const void** vp) {
  typedef typename DT::T TT;
  phase1_rows<DT>((const TT* const*)blk, rs, N, u, S, eps, (TT*)o, m, z, T, D, t0, t1, xf, f, dots, acc,
                  (const TT**)vp);
}
template <class DT>
static void p2_e(const void* o, int64_t ors, const float* m, const float* z, const void* p, int64_t prs,
                 const float* u, float eps, float scale, void* out, int64_t t0, int64_t t1, int64_t D) {
  typedef typename DT::T TT;
  phase2_rows<DT>((const TT*)o, ors, m, z, (const TT*)p, prs, u, eps, scale, (TT*)out, t0, t1, D);
}

/* This target's entry points, by dtype (0 float32, 1 bfloat16, 2 float16). */
static constexpr KernelTable kTable = {
    {&fwd_e<F32>, &fwd_e<BF16>, &fwd_e<F16>},
    {&bwd_e<F32>, &bwd_e<BF16>, &bwd_e<F16>},
    {&p1_e<F32>, &p1_e<BF16>, &p1_e<F16>},
    {&p2_e<F32>, &p2_e<BF16>, &p2_e<F16>},
};

#undef VL
#undef RB
#undef JG
#undef PF_BYTES
#undef P1_CHUNK
