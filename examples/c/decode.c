/* Virtual eviction through the C ABI: a round that only selects (the cache stays as it is), then
 * sparse decode attention over each KV head's kept slots, read straight from where the round
 * left its keep sets — no copy and no host synchronisation between them.
 *
 * The same flow runs on two backends, chosen at compile time (see device_round.c):
 *   -DTRIATTN_EXAMPLE_CUDA_RUNTIME  a GPU (link cudart), or (default) the emu backend on host memory.
 *   ./decode MODEL_CONFIG.json STATS.safetensors
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "triattn.h"

#ifdef TRIATTN_EXAMPLE_CUDA_RUNTIME
#include <cuda_runtime.h>
static void *mem_alloc(size_t bytes) {
  void *p = NULL;
  return cudaMalloc(&p, bytes) == cudaSuccess ? p : NULL;
}
static void mem_free(void *p) { cudaFree(p); }
static void mem_upload(void *dst, const void *src, size_t bytes) { cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice); }
static void mem_download(void *dst, const void *src, size_t bytes) { cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost); }
static int open_context(triattn_context **ctx) { return triattn_context_create_cuda(0, ctx); }
#else
static void *mem_alloc(size_t bytes) { return aligned_alloc(256, (bytes + 255) / 256 * 256); }
static void mem_free(void *p) { free(p); }
static void mem_upload(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void mem_download(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static int open_context(triattn_context **ctx) { return triattn_context_create(TRIATTN_BACKEND_EMU, ctx); }
#endif

#define N 320      /* cached slots per (layer, KV head) */
#define BUDGET 256 /* slots each KV head keeps */
#define PROMPT 16

static int check(triattn_status s, const char *what) {
  if (s == TRIATTN_STATUS_OK) return 0;
  char msg[512];
  triattn_last_error(msg, sizeof msg);
  fprintf(stderr, "%s failed (status %d): %s\n", what, (int)s, msg);
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s MODEL_CONFIG.json STATS.safetensors\n", argv[0]);
    return 2;
  }
  triattn_context *ctx = NULL;
  triattn_config cfg;
  triattn_compressor *comp = NULL;
  if (check(open_context(&ctx), "context_create")) return 1;
  if (check(triattn_config_default(TRIATTN_PRESET_PAPER, &cfg), "config_default")) return 1;
  cfg.budget = BUDGET;
  cfg.mode = TRIATTN_MODE_PER_HEAD;
  if (check(triattn_compressor_create(ctx, argv[1], argv[2], &cfg, &comp), "compressor_create")) return 1;
  triattn_shape m = {.struct_size = sizeof m};
  if (check(triattn_compressor_shape(comp, &m), "compressor_shape")) return 1;

  /* The cache: per layer K and V [Hkv, N, D] f32, random values. */
  size_t elems = m.num_kv_heads * N * m.head_dim;
  float *host = malloc(elems * sizeof(float));
  void **k = calloc(m.num_layers, sizeof *k), **v = calloc(m.num_layers, sizeof *v);
  unsigned x = 12345u;
  for (size_t l = 0; l < m.num_layers; ++l) {
    k[l] = mem_alloc(elems * sizeof(float));
    v[l] = mem_alloc(elems * sizeof(float));
    for (size_t i = 0; i < elems; ++i) host[i] = (float)((int)((x = x * 1664525u + 1013904223u) >> 16) % 2001 - 1000) / 700.0f;
    mem_upload(k[l], host, elems * sizeof(float));
    for (size_t i = 0; i < elems; ++i) host[i] = (float)((int)((x = x * 1664525u + 1013904223u) >> 16) % 2001 - 1000) / 900.0f;
    mem_upload(v[l], host, elems * sizeof(float));
  }

  /* 1. A round that ends with its keep sets: nothing moves in the cache. */
  triattn_round_shape rs = {
      .struct_size = sizeof rs,
      .dtype = TRIATTN_DTYPE_F32,
      .len = N,
      .prefix_len = PROMPT,
      .key_head_stride = N * m.head_dim,
      .key_row_stride = m.head_dim,
      .compaction = TRIATTN_COMPACTION_KEEP_SETS_ONLY,
  };
  triattn_plan *round = NULL;
  triattn_plan_info ri = {.struct_size = sizeof ri};
  triattn_binding *rb = NULL;
  int rc = check(triattn_plan_create(comp, &rs, &round), "plan_create");
  if (rc == 0) rc = check(triattn_plan_get_info(round, &ri), "plan_get_info");
  void *round_ws = rc == 0 ? mem_alloc(ri.workspace_bytes) : NULL;
  int64_t *round_start = mem_alloc(sizeof(int64_t)), start = 5000;
  mem_upload(round_start, &start, sizeof start);
  triattn_cache_pointers rc_cache = {.struct_size = sizeof rc_cache, .keys = k};
  if (rc == 0) rc = check(triattn_plan_bind(round, &rc_cache, round_ws, NULL, &rb), "plan_bind");

  /* 2. A decode over each KV head's list: the lists are the round's keep sets, read in place. */
  const size_t T = 1;
  triattn_decode_shape ds = {
      .struct_size = sizeof ds,
      .dtype = TRIATTN_DTYPE_F32,
      .query_dtype = TRIATTN_DTYPE_F32,
      .layout = TRIATTN_LAYOUT_CONTIGUOUS,
      .num_seqs = 1,
      .num_layers = m.num_layers,
      .num_heads = m.num_heads,
      .num_kv_heads = m.num_kv_heads,
      .head_dim = m.head_dim,
      .value_dim = m.head_dim,
      .num_queries = T,
      .len = N,
      .key_head_stride = N * m.head_dim,
      .key_row_stride = m.head_dim,
      .value_head_stride = N * m.head_dim,
      .value_row_stride = m.head_dim,
      .lists = TRIATTN_LIST_LAYOUT_PER_KV_HEAD,
      .list_capacity = BUDGET,
  };
  triattn_decode_plan *dec = NULL;
  triattn_decode_info di = {.struct_size = sizeof di};
  triattn_decode_binding *db = NULL;
  if (rc == 0) rc = check(triattn_decode_plan_create(ctx, &ds, &dec), "decode_plan_create");
  if (rc == 0) rc = check(triattn_decode_plan_get_info(dec, &di), "decode_plan_get_info");
  void *dec_ws = rc == 0 ? mem_alloc(di.workspace_bytes) : NULL;
  triattn_decode_cache dc = {
      .struct_size = sizeof dc,
      .keys = k,
      .values = v,
      .lists = (const int32_t *)((const char *)round_ws + ri.keep_offset),
  };
  if (rc == 0) rc = check(triattn_decode_plan_bind(dec, &dc, dec_ws, NULL, &db), "decode_plan_bind");

  /* 3. Each step: the round (when due), then the decode, in stream order. */
  size_t rows = m.num_layers * m.num_heads * T;
  float *q_host = malloc(rows * m.head_dim * sizeof(float));
  for (size_t i = 0; i < rows * m.head_dim; ++i) q_host[i] = (float)((int)((x = x * 1664525u + 1013904223u) >> 16) % 2001 - 1000) / 500.0f;
  void *q = mem_alloc(rows * m.head_dim * sizeof(float));
  float *o = mem_alloc(rows * m.head_dim * sizeof(float)), *lse = mem_alloc(rows * sizeof(float));
  mem_upload(q, q_host, rows * m.head_dim * sizeof(float));
  if (rc == 0) rc = check(triattn_binding_run(rb, round_start, NULL), "binding_run");
  if (rc == 0) rc = check(triattn_decode_binding_run(db, q, o, lse, 0, m.num_layers, NULL), "decode_binding_run");

  if (rc == 0) {
    float *o_host = malloc(rows * m.head_dim * sizeof(float)), *lse_host = malloc(rows * sizeof(float));
    mem_download(o_host, o, rows * m.head_dim * sizeof(float));
    mem_download(lse_host, lse, rows * sizeof(float));
    for (size_t i = 0; i < rows && rc == 0; ++i)
      if (!isfinite(lse_host[i])) rc = 1;
    for (size_t i = 0; i < rows * m.head_dim && rc == 0; ++i)
      if (!isfinite(o_host[i])) rc = 1;
    printf("decode: %zu splits, workspace %zu bytes; layer 0 head 0: lse %.4f, o[0] %.4f\n", di.splits,
           di.workspace_bytes, lse_host[0], o_host[0]);
    free(o_host);
    free(lse_host);
  }

  /* Bad input is refused by name: a list layout that does not exist. */
  triattn_decode_shape bad = ds;
  bad.lists = 9;
  triattn_decode_plan *none = NULL;
  triattn_status st = triattn_decode_plan_create(ctx, &bad, &none);
  char msg[256];
  triattn_last_error(msg, sizeof msg);
  printf("lists 9 -> status %d: %s\n", (int)st, msg);
  if (st != TRIATTN_STATUS_INVALID_ARGUMENT || none != NULL || strstr(msg, "shape.lists") == NULL) rc = 1;

  triattn_decode_binding_destroy(db);
  triattn_decode_plan_destroy(dec);
  triattn_binding_destroy(rb);
  triattn_plan_destroy(round);
  for (size_t l = 0; l < m.num_layers; ++l) {
    mem_free(k[l]);
    mem_free(v[l]);
  }
  free(k);
  free(v);
  free(host);
  free(q_host);
  mem_free(q);
  mem_free(o);
  mem_free(lse);
  mem_free(round_ws);
  mem_free(dec_ws);
  mem_free(round_start);
  triattn_compressor_destroy(comp);
  triattn_context_destroy(ctx);
  printf("%s\n", rc == 0 ? "ok" : "failed");
  return rc;
}
