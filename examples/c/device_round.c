/* A TriAttention round on device pointers and the engine's CUDA stream, through the C ABI.
 *
 * The engine owns every byte of device memory (the KV cache, the workspace, the round_start
 * slot) and the stream; triattn_plan_run only launches kernels on that stream, so it can be
 * captured in a CUDA graph and replayed. This file shows the calls: device pointers and the
 * stream are opaque `void *` values here, so it compiles without cuda.h. In an engine they come
 * from cudaMalloc / cudaStreamCreate (or the engine's allocator and its torch / cupy stream);
 * define TRIATTN_EXAMPLE_CUDA_RUNTIME and link cudart to run it as a program.
 *
 *   cargo build --release --features cuda
 *   cc -DTRIATTN_EXAMPLE_CUDA_RUNTIME -I/usr/local/cuda/include examples/c/device_round.c -Iinclude \
 *      target/release/libtriattn.a -L/usr/local/cuda/lib64 -lcudart -lpthread -ldl -lm -o device_round
 *   ./device_round data/qwen3_8b.config.json data/qwen3_8b.safetensors
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "triattn.h"

#ifdef TRIATTN_EXAMPLE_CUDA_RUNTIME
#include <cuda_runtime.h>
#endif

#define N 320       /* cached slots per (layer, KV head) at the round */
#define BUDGET 256  /* slots kept per set */
#define PROMPT 16   /* prompt slots at the front of the cache */

static int check(triattn_status s, const char *what) {
  if (s == TRIATTN_STATUS_OK) return 0;
  char msg[512];
  triattn_last_error(msg, sizeof msg);
  fprintf(stderr, "%s failed (status %d): %s\n", what, (int)s, msg);
  return 1;
}

/* The part of an engine that owns a sequence's cache: one K and one V tensor per layer,
 * [num_kv_heads, N, head_dim] bf16 each, a workspace of at least `workspace_capacity` bytes
 * (256-byte aligned, as cudaMalloc returns), an int64 round_start slot on the device, and a
 * stream. Plans once, binds once, then runs (capturable) rounds. */
static int engine_round(const triattn_compressor *comp, const triattn_shape *model, void *const *k_layers,
                        void *const *v_layers, void *workspace, size_t workspace_capacity,
                        const int64_t *round_start_device, void *stream) {
  /* 1. Plan (host-only; once per cache shape). */
  triattn_round_shape shape = {
      .dtype = TRIATTN_DTYPE_BF16,
      .len = N,
      .prefix_len = PROMPT,
      .value_dim = model->head_dim,
      .key_head_stride = N * model->head_dim,
      .key_row_stride = model->head_dim,
      .value_head_stride = N * model->head_dim,
      .value_row_stride = model->head_dim,
      .compaction = TRIATTN_COMPACTION_IN_PLACE_ORDER_PRESERVING,
  };
  triattn_plan *plan = NULL;
  if (check(triattn_plan_create(comp, &shape, &plan), "plan_create")) return 1;
  triattn_plan_info info;
  if (check(triattn_plan_get_info(plan, &info), "plan_get_info")) {
    triattn_plan_destroy(plan);
    return 1;
  }
  printf("workspace: %zu bytes (align %zu); %zu sets of %zu slots; keep sets at +%zu\n", info.workspace_bytes,
         info.workspace_alignment, info.sets, info.kept, info.keep_offset);
  if (info.workspace_bytes > workspace_capacity) {
    fprintf(stderr, "the engine's workspace holds %zu bytes; the plan needs %zu\n", workspace_capacity,
            info.workspace_bytes);
    triattn_plan_destroy(plan);
    return 1;
  }

  /* 2. Bind the workspace to this cache (setup: copies the constants and synchronises the
   *    stream; again only when the cache moves; never inside a graph capture). */
  triattn_cache_pointers cache = {.keys = k_layers, .values = v_layers, .keys_out = NULL, .values_out = NULL};
  int rc = check(triattn_plan_bind(plan, &cache, workspace, stream), "plan_bind");

  /* 3. Each round: the engine writes round_start (tokens seen so far) into device memory in
   *    stream order, then launches; the same call can be captured once and replayed. */
  if (rc == 0) rc = check(triattn_plan_run(plan, workspace, round_start_device, stream), "plan_run");

  /* The keep sets (int32 [sets, kept]) are at workspace + info.keep_offset, and K/V are
   *    compacted in place to `kept` rows per (layer, KV head) once the stream reaches here. */
  triattn_plan_destroy(plan);
  return rc;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s MODEL_CONFIG.json STATS.safetensors\n", argv[0]);
    return 2;
  }
  triattn_context *ctx = NULL;
  if (check(triattn_context_create_cuda(0, &ctx), "context_create_cuda")) return 1;
  triattn_config cfg;
  if (check(triattn_config_default(TRIATTN_PRESET_PAPER, &cfg), "config_default")) return 1;
  cfg.budget = BUDGET;
  triattn_compressor *comp = NULL;
  if (check(triattn_compressor_create(ctx, argv[1], argv[2], &cfg, &comp), "compressor_create")) return 1;
  triattn_shape model;
  if (check(triattn_compressor_shape(comp, &model), "compressor_shape")) return 1;

  int rc = 1;
#ifdef TRIATTN_EXAMPLE_CUDA_RUNTIME
  /* The engine's allocations (the library allocates nothing on the device). */
  size_t layer_bytes = model.num_kv_heads * N * model.head_dim * 2;
  void **k = calloc(model.num_layers, sizeof *k), **v = calloc(model.num_layers, sizeof *v);
  for (size_t l = 0; l < model.num_layers; ++l) {
    cudaMalloc(&k[l], layer_bytes);
    cudaMalloc(&v[l], layer_bytes);
    cudaMemset(k[l], 0x3c, layer_bytes); /* stand-in for the model's keys */
    cudaMemset(v[l], 0x3c, layer_bytes);
  }
  size_t capacity = (size_t)512 << 20;
  void *workspace = NULL;
  int64_t *round_start = NULL, host_round_start = 5000;
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  cudaMalloc(&workspace, capacity);
  cudaMalloc((void **)&round_start, sizeof *round_start);
  cudaMemcpyAsync(round_start, &host_round_start, sizeof host_round_start, cudaMemcpyHostToDevice, stream);
  rc = engine_round(comp, &model, k, v, workspace, capacity, round_start, (void *)stream);
  cudaStreamSynchronize(stream);
  printf("%s\n", rc == 0 ? "ok" : "failed");
  for (size_t l = 0; l < model.num_layers; ++l) {
    cudaFree(k[l]);
    cudaFree(v[l]);
  }
  free(k);
  free(v);
  cudaFree(workspace);
  cudaFree(round_start);
  cudaStreamDestroy(stream);
#else
  /* Without the CUDA runtime the device pointers are the engine's business: this build only
   * shows the calls (see engine_round). */
  (void)engine_round;
  printf("built without TRIATTN_EXAMPLE_CUDA_RUNTIME: see engine_round for the device flow\n");
  rc = 0;
#endif
  triattn_compressor_destroy(comp);
  triattn_context_destroy(ctx);
  return rc;
}
