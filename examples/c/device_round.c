/* TriAttention rounds on an engine's own memory and stream, through the C ABI.
 *
 * The engine owns every byte (the KV cache, the workspaces, the round_start slots, the
 * positions) and the stream. It plans once per cache shape, binds one workspace per sequence
 * (each binding carries its own cache, positions and block-table row), and then each round only
 * launches kernels on its stream: capturable in a CUDA graph and replayable.
 *
 * The same flow runs on two backends, chosen at compile time:
 *   -DTRIATTN_EXAMPLE_CUDA_RUNTIME  a GPU: cudaMalloc'd memory and a cudaStream_t (link cudart)
 *     cargo build --release --features cuda
 *     cc -DTRIATTN_EXAMPLE_CUDA_RUNTIME -I/usr/local/cuda/include examples/c/device_round.c -Iinclude \
 *        target/release/libtriattn.a -L/usr/local/cuda/lib64 -lcudart -lpthread -ldl -lm -o device_round
 *   (default)                       the emu backend: the same kernels on the CPU over host memory
 *     cargo build --release --features emu
 *     cc examples/c/device_round.c -Iinclude target/release/libtriattn.a -lstdc++ -lpthread -ldl -lm \
 *        -o device_round
 *   ./device_round data/qwen3_8b.config.json data/qwen3_8b.safetensors
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "triattn.h"

#ifdef TRIATTN_EXAMPLE_CUDA_RUNTIME
#include <cuda_runtime.h>
#endif

#define N 320       /* cached slots per (layer, KV head) at the round */
#define BUDGET 256  /* slots kept per set */
#define PROMPT 16   /* prompt slots at the front of the cache */
#define SEQS 2      /* sequences, each with its own workspace and binding */

/* ---- The engine's memory: device memory on a GPU, 256-byte aligned host memory under emu. ---- */
#ifdef TRIATTN_EXAMPLE_CUDA_RUNTIME
#define BACKEND_NAME "cuda"
static void *mem_alloc(size_t bytes) {
  void *p = NULL;
  return cudaMalloc(&p, bytes) == cudaSuccess ? p : NULL;
}
static void mem_free(void *p) { cudaFree(p); }
static void mem_upload(void *dst, const void *src, size_t bytes, void *stream) {
  cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream);
}
static void mem_download(void *dst, const void *src, size_t bytes, void *stream) {
  cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream);
  cudaStreamSynchronize((cudaStream_t)stream);
}
static int open_context(triattn_context **ctx) { return triattn_context_create_cuda(0, ctx); }
static void *stream_create(void) {
  cudaStream_t s;
  return cudaStreamCreate(&s) == cudaSuccess ? (void *)s : NULL;
}
static void stream_destroy(void *s) { cudaStreamDestroy((cudaStream_t)s); }
#else
#define BACKEND_NAME "emu"
static void *mem_alloc(size_t bytes) { return aligned_alloc(256, (bytes + 255) / 256 * 256); }
static void mem_free(void *p) { free(p); }
static void mem_upload(void *dst, const void *src, size_t bytes, void *stream) {
  (void)stream;
  memcpy(dst, src, bytes);
}
static void mem_download(void *dst, const void *src, size_t bytes, void *stream) {
  (void)stream;
  memcpy(dst, src, bytes);
}
static int open_context(triattn_context **ctx) { return triattn_context_create(TRIATTN_BACKEND_EMU, ctx); }
static void *stream_create(void) { return NULL; /* emu runs every call synchronously */ }
static void stream_destroy(void *s) { (void)s; }
#endif

static int check(triattn_status s, const char *what) {
  if (s == TRIATTN_STATUS_OK) return 0;
  char msg[512];
  triattn_last_error(msg, sizeof msg);
  fprintf(stderr, "%s failed (status %d): %s\n", what, (int)s, msg);
  return 1;
}

/* bf16 of a float (round to nearest even; the values here are finite). */
static uint16_t bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One sequence's cache as the engine holds it: per layer a K and a V tensor [Hkv, N, D] bf16,
 * int64 positions [sets, N], a workspace and a round_start slot. */
typedef struct {
  void **k, **v;
  int64_t *positions;
  void *workspace;
  int64_t *round_start;
  uint16_t *k0_host; /* layer 0's keys as written, to check the compaction */
} sequence;

static int sequence_init(sequence *s, const triattn_shape *m, size_t workspace_bytes, unsigned seed, void *stream) {
  size_t elems = m->num_kv_heads * N * m->head_dim, bytes = elems * 2;
  uint16_t *host = malloc(bytes);
  s->k = calloc(m->num_layers, sizeof *s->k);
  s->v = calloc(m->num_layers, sizeof *s->v);
  for (size_t l = 0; l < m->num_layers; ++l) {
    unsigned x = seed * 2654435761u + (unsigned)l * 40503u + 1u;
    for (size_t i = 0; i < elems; ++i) {
      x = x * 1664525u + 1013904223u; /* stand-in for the model's keys */
      host[i] = bf16((float)((int)(x >> 16) % 2001 - 1000) / 500.0f);
    }
    s->k[l] = mem_alloc(bytes);
    s->v[l] = mem_alloc(bytes);
    if (!s->k[l] || !s->v[l]) return 1;
    mem_upload(s->k[l], host, bytes, stream);
    mem_upload(s->v[l], host, bytes, stream);
    if (l == 0) {
      s->k0_host = malloc(bytes);
      memcpy(s->k0_host, host, bytes);
    }
  }
  free(host);
  /* Positions: slot i of every set holds token 1000 * seed + i. */
  size_t pos_bytes = m->num_keep_sets * N * sizeof(int64_t);
  int64_t *pos = malloc(pos_bytes);
  for (size_t i = 0; i < m->num_keep_sets * N; ++i) pos[i] = 1000 * (int64_t)seed + (int64_t)(i % N);
  s->positions = mem_alloc(pos_bytes);
  s->workspace = mem_alloc(workspace_bytes);
  s->round_start = mem_alloc(sizeof(int64_t));
  if (!s->positions || !s->workspace || !s->round_start) return 1;
  mem_upload(s->positions, pos, pos_bytes, stream);
  free(pos);
  return 0;
}

static void sequence_free(sequence *s, const triattn_shape *m) {
  for (size_t l = 0; l < m->num_layers; ++l) {
    mem_free(s->k[l]);
    mem_free(s->v[l]);
  }
  free(s->k);
  free(s->v);
  free(s->k0_host);
  mem_free(s->positions);
  mem_free(s->workspace);
  mem_free(s->round_start);
}

/* After a round: the keep sets are ascending with the prompt kept, layer 0 / KV head 0 was
 * compacted to its kept rows, and the positions moved with them. */
static int verify(const sequence *s, const triattn_shape *m, const triattn_plan_info *info, unsigned seed,
                  void *stream) {
  int32_t *keep = malloc(info->keep_bytes);
  mem_download(keep, (const char *)s->workspace + info->keep_offset, info->keep_bytes, stream);
  size_t d = m->head_dim, row = d * 2;
  uint16_t *k0 = malloc(m->num_kv_heads * N * row);
  mem_download(k0, s->k[0], m->num_kv_heads * N * row, stream);
  int64_t *pos = malloc(m->num_keep_sets * N * sizeof(int64_t));
  mem_download(pos, s->positions, m->num_keep_sets * N * sizeof(int64_t), stream);
  int bad = 0;
  for (size_t set = 0; set < info->sets && !bad; ++set) {
    const int32_t *k = keep + set * info->kept;
    for (size_t i = 0; i < info->kept; ++i) {
      if ((i < PROMPT && k[i] != (int32_t)i) || (i > 0 && k[i] <= k[i - 1]) || k[i] >= N) bad = 1;
      if (pos[set * N + i] != 1000 * (int64_t)seed + k[i]) bad = 2;
    }
  }
  /* Per-head selection: layer 0's KV head 0 uses set 0. */
  for (size_t i = 0; i < info->kept && !bad; ++i)
    if (memcmp(k0 + i * d, s->k0_host + (size_t)keep[i] * d, row) != 0) bad = 3;
  if (bad) fprintf(stderr, "sequence %u: %s\n", seed, bad == 1 ? "bad keep set" : bad == 2 ? "positions" : "K rows");
  else
    printf("sequence %u: kept %zu of %d slots per set; set 0 keeps %d %d ... %d\n", seed, info->kept, N, keep[0],
           keep[1], keep[info->kept - 1]);
  free(keep);
  free(k0);
  free(pos);
  return bad;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s MODEL_CONFIG.json STATS.safetensors\n", argv[0]);
    return 2;
  }
  triattn_context *ctx = NULL;
  if (check(open_context(&ctx), "context_create (" BACKEND_NAME ")")) return 1;
  triattn_config cfg;
  if (check(triattn_config_default(TRIATTN_PRESET_PAPER, &cfg), "config_default")) return 1;
  cfg.budget = BUDGET;
  triattn_compressor *comp = NULL;
  if (check(triattn_compressor_create(ctx, argv[1], argv[2], &cfg, &comp), "compressor_create")) return 1;
  triattn_shape model = {.struct_size = sizeof model};
  if (check(triattn_compressor_shape(comp, &model), "compressor_shape")) return 1;

  /* 1. Plan (host-only; once per cache shape). */
  triattn_round_shape shape = {
      .struct_size = sizeof shape,
      .dtype = TRIATTN_DTYPE_BF16,
      .len = N,
      .prefix_len = PROMPT,
      .value_dim = model.head_dim,
      .key_head_stride = N * model.head_dim,
      .key_row_stride = model.head_dim,
      .value_head_stride = N * model.head_dim,
      .value_row_stride = model.head_dim,
      .compaction = TRIATTN_COMPACTION_IN_PLACE_ORDER_PRESERVING,
      .positions = TRIATTN_POSITIONS_I64,
  };
  triattn_plan *plan = NULL;
  if (check(triattn_plan_create(comp, &shape, &plan), "plan_create")) return 1;
  triattn_plan_info info = {.struct_size = sizeof info};
  if (check(triattn_plan_get_info(plan, &info), "plan_get_info")) return 1;
  printf("%s: workspace %zu bytes (align %zu); %zu sets of %zu slots; keep sets at +%zu\n", BACKEND_NAME,
         info.workspace_bytes, info.workspace_alignment, info.sets, info.kept, info.keep_offset);

  void *stream = stream_create();
  sequence seqs[SEQS];
  memset(seqs, 0, sizeof seqs);
  triattn_binding *bindings[SEQS] = {NULL};
  int rc = 0;
  for (unsigned s = 0; s < SEQS && rc == 0; ++s) {
    rc = sequence_init(&seqs[s], &model, info.workspace_bytes, s + 1, stream);
    if (rc) fprintf(stderr, "allocation failed\n");
    /* 2. Bind each sequence's workspace to its cache (setup: copies the constants and
     *    synchronises the stream; again only when the cache moves; never inside a capture). */
    triattn_cache_pointers cache = {
        .struct_size = sizeof cache,
        .keys = seqs[s].k,
        .values = seqs[s].v,
        .positions = seqs[s].positions,
    };
    if (rc == 0) rc = check(triattn_plan_bind(plan, &cache, seqs[s].workspace, stream, &bindings[s]), "plan_bind");
  }
  /* The bindings keep the plan alive. */
  triattn_plan_destroy(plan);

  /* 3. Each round: write round_start (tokens seen so far) in stream order, then launch; the run
   *    can be captured once and replayed. Sequence 2 runs first: each binding uses its own cache. */
  for (int s = SEQS - 1; s >= 0 && rc == 0; --s) {
    int64_t round_start = 5000 + 100 * s;
    mem_upload(seqs[s].round_start, &round_start, sizeof round_start, stream);
    rc = check(triattn_binding_run(bindings[s], seqs[s].round_start, stream), "binding_run");
  }
  for (unsigned s = 0; s < SEQS && rc == 0; ++s) rc = verify(&seqs[s], &model, &info, s + 1, stream);

  /* Bad input is refused by name before anything runs: a misaligned K base (the last layer's). */
  if (rc == 0 && model.num_layers <= 64) {
    void *shifted[64];
    for (size_t l = 0; l < model.num_layers; ++l) shifted[l] = (char *)seqs[0].k[l] + (l + 1 == model.num_layers ? 8 : 0);
    triattn_cache_pointers cache = {.struct_size = sizeof cache, .keys = shifted, .values = seqs[0].v,
                                    .positions = seqs[0].positions};
    triattn_binding *b = NULL;
    triattn_plan *p = NULL;
    char msg[512];
    if (check(triattn_plan_create(comp, &shape, &p), "plan_create")) rc = 1;
    triattn_status st = triattn_plan_bind(p, &cache, seqs[0].workspace, stream, &b);
    triattn_last_error(msg, sizeof msg);
    printf("misaligned K base -> status %d: %s\n", (int)st, msg);
    if (st != TRIATTN_STATUS_INVALID_ARGUMENT || b != NULL || strstr(msg, "aligned to 16 bytes") == NULL) rc = 1;
    triattn_plan_destroy(p);
  }

  for (unsigned s = 0; s < SEQS; ++s) {
    triattn_binding_destroy(bindings[s]);
    if (seqs[s].k) sequence_free(&seqs[s], &model);
  }
  stream_destroy(stream);
  triattn_compressor_destroy(comp);
  triattn_context_destroy(ctx);
  printf("%s\n", rc == 0 ? "ok" : "failed");
  return rc;
}
