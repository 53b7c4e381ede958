/* Fused onnxruntime CPU kernel for the ONNX node attnres::DepthAttention (SPEC section 6).
 *
 * Built once at install by setup.py (attnres_compile._ort_kernel) against the onnxruntime C API
 * headers vendored in third_party/onnxruntime (ORT_API_VERSION 29; a newer runtime accepts a
 * library built against older headers); onnx/ort_kernel.py registers it with
 * SessionOptions.register_custom_ops_library, after which
 * onnxruntime runs this kernel for every DepthAttention node instead of the model-local
 * function body.
 *
 * attnres::DepthAttention (the exported node): inputs sources [M, ..., D] float32 (the M
 * sources stacked), query [D], norm_weight [D]; attributes eps, scale; output h [..., D]:
 *     logit_j = (v_j . (query * norm_weight)) / sqrt(mean(v_j^2) + eps)
 *     h       = scale * sum_j softmax_j(logit) v_j
 * exactly as the function body in onnx_export.py.
 *
 * attnres::DepthAttentionUnstacked (never exported; onnx_export.ort_session(fused=True)
 * rewrites Concat(Unsqueeze(v_1, 0), ..., Unsqueeze(v_M, 0)) -> DepthAttention into it, so the
 * stacked copy of the sources is never written): inputs query, norm_weight, v_1 ... v_M
 * (variadic, each [..., D]); same attributes and output.
 *
 * One pass over the sources per token: each source row is read from memory once for its sum of
 * squares and dot product, and folded into the output row (in L1) with an online softmax while
 * it is still in cache.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define TOKEN_CHUNK 16

static const OrtApi* g_api = NULL;
static int64_t g_calls = 0; /* kernel invocations, read by tests through ctypes */

int64_t attnres_ort_calls(void) { return __atomic_load_n(&g_calls, __ATOMIC_RELAXED); }

typedef struct {
  float eps, scale;
} Kernel;

typedef struct {
  const float* const* src; /* M source base pointers, each [T, D] */
  const float* u; /* query * norm_weight, [D] */
  float* out;
  int64_t m, t, d;
  float eps, scale;
} Work;

/* Built without -march=native (the library must run on any x86-64 CPU): GCC clones the hot
   loop for AVX-512, AVX2 and baseline x86-64 and picks one at load time (ifunc). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void run_chunk(void* data, size_t chunk) {
  const Work* w = (const Work*)data;
  const int64_t D = w->d, T = w->t, M = w->m;
  const float inv_d = 1.0f / (float)D;
  const float* u = w->u;
  int64_t t0 = (int64_t)chunk * TOKEN_CHUNK, t1 = t0 + TOKEN_CHUNK;
  if (t1 > T) t1 = T;
  for (int64_t t = t0; t < t1; ++t) {
    float* h = w->out + t * D;
    float mx = 0.0f, den = 0.0f;
    for (int64_t j = 0; j < M; ++j) {
      const float* v = w->src[j] + t * D;
      if (j + 1 < M) __builtin_prefetch(w->src[j + 1] + t * D, 0, 3);
      float ss = 0.0f, dot = 0.0f;
#pragma omp simd reduction(+ : ss, dot)
      for (int64_t k = 0; k < D; ++k) {
        ss += v[k] * v[k];
        dot += v[k] * u[k];
      }
      const float logit = dot / sqrtf(ss * inv_d + w->eps);
      if (j == 0) {
        mx = logit;
        den = 1.0f;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) h[k] = v[k];
      } else if (logit > mx) {
        const float r = expf(mx - logit);
        mx = logit;
        den = den * r + 1.0f;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) h[k] = h[k] * r + v[k];
      } else {
        const float p = expf(logit - mx);
        den += p;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) h[k] += p * v[k];
      }
    }
    const float f = w->scale / den;
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) h[k] *= f;
  }
}

#define CHECK(expr)                      \
  do {                                   \
    OrtStatus* st_ = (expr);             \
    if (st_ != NULL) return st_;         \
  } while (0)

static OrtStatus* fail(const char* msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

static OrtStatus* shape_of(const OrtValue* value, int64_t* dims, size_t* rank, ONNXTensorElementDataType* type) {
  OrtTensorTypeAndShapeInfo* info = NULL;
  CHECK(g_api->GetTensorTypeAndShape(value, &info));
  OrtStatus* st = g_api->GetDimensionsCount(info, rank);
  if (st == NULL && *rank > 16) st = fail("attnres::DepthAttention: sources of rank > 16");
  if (st == NULL) st = g_api->GetDimensions(info, dims, *rank);
  if (st == NULL) st = g_api->GetTensorElementType(info, type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

/* Shared by both ops: srcs[j] points at source j's [T, D] rows. */
static OrtStatus* run(const Kernel* k, OrtKernelContext* ctx, const float* const* srcs, int64_t M, int64_t T,
                      int64_t D, const OrtValue* vq, const OrtValue* vg, float* out) {
  if (T == 0 || D == 0) return NULL;
  if (M == 0) return fail("attnres::DepthAttention: no sources");
  const float *q, *g;
  CHECK(g_api->GetTensorData(vq, (const void**)&q));
  CHECK(g_api->GetTensorData(vg, (const void**)&g));
  float ubuf[4096];
  float* u = D <= 4096 ? ubuf : (float*)malloc((size_t)D * sizeof(float));
  if (u == NULL) return g_api->CreateStatus(ORT_FAIL, "attnres::DepthAttention: out of memory");
  for (int64_t i = 0; i < D; ++i) u[i] = q[i] * g[i];
  Work w = {srcs, u, out, M, T, D, k->eps, k->scale};
  const size_t chunks = (size_t)((T + TOKEN_CHUNK - 1) / TOKEN_CHUNK);
  OrtStatus* st = NULL;
  if (chunks == 1) {
    run_chunk(&w, 0);
  } else {
    st = g_api->KernelContext_ParallelFor(ctx, run_chunk, chunks, 0, &w);
  }
  if (u != ubuf) free(u);
  return st;
}

static OrtStatus* check_params(const OrtValue* vq, const OrtValue* vg, int64_t D) {
  int64_t dq[16], dg[16];
  size_t rq, rg;
  ONNXTensorElementDataType tq, tg;
  CHECK(shape_of(vq, dq, &rq, &tq));
  CHECK(shape_of(vg, dg, &rg, &tg));
  if (tq != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || tg != tq)
    return fail("attnres::DepthAttention fused kernel: float32 only");
  if (rq != 1 || rg != 1 || dq[0] != D || dg[0] != D)
    return fail("attnres::DepthAttention: query and norm_weight must be [D]");
  return NULL;
}

static OrtStatus* ORT_API_CALL compute_stacked(void* op_kernel, OrtKernelContext* ctx) {
  const OrtValue *vs, *vq, *vg;
  CHECK(g_api->KernelContext_GetInput(ctx, 0, &vs));
  CHECK(g_api->KernelContext_GetInput(ctx, 1, &vq));
  CHECK(g_api->KernelContext_GetInput(ctx, 2, &vg));
  int64_t ds[16];
  size_t rs;
  ONNXTensorElementDataType ts;
  CHECK(shape_of(vs, ds, &rs, &ts));
  if (ts != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return fail("attnres::DepthAttention fused kernel: float32 only");
  if (rs < 2) return fail("attnres::DepthAttention: sources must be [M, ..., D]");
  const int64_t M = ds[0], D = ds[rs - 1];
  CHECK(check_params(vq, vg, D));
  int64_t T = 1;
  for (size_t i = 1; i + 1 < rs; ++i) T *= ds[i];
  OrtValue* vo;
  CHECK(g_api->KernelContext_GetOutput(ctx, 0, ds + 1, rs - 1, &vo));
  __atomic_add_fetch(&g_calls, 1, __ATOMIC_RELAXED);
  if (T == 0 || D == 0 || M == 0) return run((const Kernel*)op_kernel, ctx, NULL, M, T, D, vq, vg, NULL);
  const float* src;
  float* out;
  CHECK(g_api->GetTensorData(vs, (const void**)&src));
  CHECK(g_api->GetTensorMutableData(vo, (void**)&out));
  const float* pbuf[256];
  const float** srcs = M <= 256 ? pbuf : (const float**)malloc((size_t)M * sizeof(float*));
  if (srcs == NULL) return g_api->CreateStatus(ORT_FAIL, "attnres::DepthAttention: out of memory");
  for (int64_t j = 0; j < M; ++j) srcs[j] = src + j * T * D;
  OrtStatus* st = run((const Kernel*)op_kernel, ctx, srcs, M, T, D, vq, vg, out);
  if (srcs != pbuf) free(srcs);
  return st;
}

static OrtStatus* ORT_API_CALL compute_unstacked(void* op_kernel, OrtKernelContext* ctx) {
  size_t n_in;
  CHECK(g_api->KernelContext_GetInputCount(ctx, &n_in));
  if (n_in < 3) return fail("attnres::DepthAttentionUnstacked: needs query, norm_weight and sources");
  const int64_t M = (int64_t)n_in - 2;
  const OrtValue *vq, *vg, *v0;
  CHECK(g_api->KernelContext_GetInput(ctx, 0, &vq));
  CHECK(g_api->KernelContext_GetInput(ctx, 1, &vg));
  CHECK(g_api->KernelContext_GetInput(ctx, 2, &v0));
  int64_t ds[16];
  size_t rs;
  ONNXTensorElementDataType ts;
  CHECK(shape_of(v0, ds, &rs, &ts));
  if (ts != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return fail("attnres::DepthAttention fused kernel: float32 only");
  if (rs < 1) return fail("attnres::DepthAttentionUnstacked: sources must be [..., D]");
  const int64_t D = ds[rs - 1];
  CHECK(check_params(vq, vg, D));
  int64_t T = 1;
  for (size_t i = 0; i + 1 < rs; ++i) T *= ds[i];
  const float* pbuf[256];
  const float** srcs = M <= 256 ? pbuf : (const float**)malloc((size_t)M * sizeof(float*));
  if (srcs == NULL) return g_api->CreateStatus(ORT_FAIL, "attnres::DepthAttention: out of memory");
  OrtStatus* st = NULL;
  for (int64_t j = 0; j < M && st == NULL; ++j) {
    const OrtValue* vj;
    int64_t dj[16];
    size_t rj;
    ONNXTensorElementDataType tj;
    st = g_api->KernelContext_GetInput(ctx, (size_t)(j + 2), &vj);
    if (st == NULL) st = shape_of(vj, dj, &rj, &tj);
    if (st == NULL && (rj != rs || tj != ts || memcmp(dj, ds, rs * sizeof(int64_t)) != 0))
      st = fail("attnres::DepthAttentionUnstacked: all sources must have one shape");
    if (st == NULL) st = g_api->GetTensorData(vj, (const void**)&srcs[j]);
  }
  OrtValue* vo = NULL;
  float* out = NULL;
  if (st == NULL) st = g_api->KernelContext_GetOutput(ctx, 0, ds, rs, &vo);
  if (st == NULL) st = g_api->GetTensorMutableData(vo, (void**)&out);
  if (st == NULL) {
    __atomic_add_fetch(&g_calls, 1, __ATOMIC_RELAXED);
    st = run((const Kernel*)op_kernel, ctx, srcs, M, T, D, vq, vg, out);
  }
  if (srcs != pbuf) free(srcs);
  return st;
}

static OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                             void** kernel) {
  (void)op;
  (void)api;
  Kernel* k = (Kernel*)malloc(sizeof(Kernel));
  if (k == NULL) return g_api->CreateStatus(ORT_FAIL, "attnres::DepthAttention: out of memory");
  k->eps = 1e-6f;
  k->scale = 1.0f;
  OrtStatus* st = g_api->KernelInfoGetAttribute_float(info, "eps", &k->eps);
  if (st == NULL) st = g_api->KernelInfoGetAttribute_float(info, "scale", &k->scale);
  if (st != NULL) {
    free(k);
    return st;
  }
  *kernel = k;
  return NULL;
}

static void ORT_API_CALL destroy_kernel(void* kernel) { free(kernel); }
static OrtCustomOp g_op, g_op_unstacked;
static const char* ORT_API_CALL op_name(const OrtCustomOp* op) {
  return op == &g_op_unstacked ? "DepthAttentionUnstacked" : "DepthAttention";
}
static const char* ORT_API_CALL op_ep(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL io_type(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL n_inputs(const OrtCustomOp* op) { (void)op; return 3; }
static size_t ORT_API_CALL n_outputs(const OrtCustomOp* op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL in_char(const OrtCustomOp* op, size_t i) {
  return op == &g_op_unstacked && i == 2 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL out_char(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL in_mem(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return OrtMemTypeDefault; }
static int ORT_API_CALL one(const OrtCustomOp* op) { (void)op; return 1; }
static int ORT_API_CALL start_version(const OrtCustomOp* op) { (void)op; return 1; }
static int ORT_API_CALL end_version(const OrtCustomOp* op) { (void)op; return 1; }

static OrtCustomOpDomain* g_domain = NULL;

static void init_op(OrtCustomOp* op, OrtStatus*(ORT_API_CALL* compute)(void*, OrtKernelContext*)) {
  memset(op, 0, sizeof *op);
  op->version = ORT_API_VERSION;
  op->GetName = op_name;
  op->GetExecutionProviderType = op_ep;
  op->GetInputType = io_type;
  op->GetInputTypeCount = n_inputs;
  op->GetOutputType = io_type;
  op->GetOutputTypeCount = n_outputs;
  op->GetInputCharacteristic = in_char;
  op->GetOutputCharacteristic = out_char;
  op->GetInputMemoryType = in_mem;
  op->GetVariadicInputMinArity = one;
  op->GetVariadicInputHomogeneity = one;
  op->GetVariadicOutputMinArity = one;
  op->GetVariadicOutputHomogeneity = one;
  op->CreateKernelV2 = create_kernel;
  op->KernelComputeV2 = compute;
  op->KernelDestroy = destroy_kernel;
  op->GetStartVersion = start_version;
  op->GetEndVersion = end_version;
}

OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (g_api == NULL) {
    const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
    if (api == NULL) return NULL; /* cannot report: the runtime is older than these headers */
    init_op(&g_op, compute_stacked);
    init_op(&g_op_unstacked, compute_unstacked);
    g_api = api;
  }
  /* One domain per registration: onnxruntime keeps a reference for each session that uses it. */
  OrtCustomOpDomain* domain = NULL;
  CHECK(g_api->CreateCustomOpDomain("attnres", &domain));
  CHECK(g_api->CustomOpDomain_Add(domain, &g_op));
  CHECK(g_api->CustomOpDomain_Add(domain, &g_op_unstacked));
  g_domain = domain; /* deliberately never released: sessions may outlive any Python object */
  return g_api->AddCustomOpDomain(options, domain);
}
