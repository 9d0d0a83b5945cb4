/* A sharded round through the C ABI: what each rank of a tensor- and pipeline-parallel engine
 * calls, all ranks in one process on the emu backend (host memory stands in for each rank's
 * device memory, and a loop over the ranks' buffers stands in for NCCL's all-reduce).
 *
 * Every rank: the model's compressor, then its shard's (triattn_compressor_create_shard); a plan
 * over its layers and KV heads; a binding of its workspace to its cache. A round: part 0 on every
 * rank, then per collective k an all-reduce of the buffer triattn_plan_get_reduction(k) names
 * (in place, in the workspace, across its ranks), then part k + 1. The keep sets equal one
 * unsharded rank's, which this program checks.
 *
 *   cargo build --release --features emu
 *   cc examples/c/sharded_round.c -Iinclude target/release/libtriattn.a -lstdc++ -lpthread -ldl -lm \
 *      -o sharded_round
 *   ./sharded_round MODEL_CONFIG.json STATS.safetensors TP PP
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "triattn.h"

#define N 320       /* cached slots per (layer, KV head) at the round */
#define BUDGET 256  /* slots kept per set */
#define PROMPT 16   /* prompt slots */
#define MAX_RANKS 64

static void *mem_alloc(size_t bytes) { return aligned_alloc(256, (bytes + 255) / 256 * 256); }

static int check(triattn_status s, const char *what) {
  if (s == TRIATTN_STATUS_OK) return 0;
  char msg[512];
  triattn_last_error(msg, sizeof msg);
  fprintf(stderr, "%s failed (status %d): %s\n", what, (int)s, msg);
  return 1;
}

/* A keep-sets-only plan of compressor `c` over contiguous f32 [Hkv, N, D] tensors, bound to the
 * layer tensors `keys` (each rank: its layers, pointing at its KV heads). */
static int plan_and_bind(triattn_compressor *c, size_t head_dim, void **keys, triattn_plan **plan,
                         triattn_plan_info *info, void **ws, triattn_binding **b) {
  triattn_round_shape rs = {
      .struct_size = sizeof rs,
      .dtype = TRIATTN_DTYPE_F32,
      .len = N,
      .prefix_len = PROMPT,
      .key_head_stride = N * head_dim,
      .key_row_stride = head_dim,
      .compaction = TRIATTN_COMPACTION_KEEP_SETS_ONLY,
  };
  triattn_cache_pointers cache = {.struct_size = sizeof cache, .keys = keys};
  if (check(triattn_plan_create(c, &rs, plan), "plan_create")) return 1;
  info->struct_size = sizeof *info;
  if (check(triattn_plan_get_info(*plan, info), "plan_get_info")) return 1;
  *ws = mem_alloc(info->workspace_bytes);
  return check(triattn_plan_bind(*plan, &cache, *ws, NULL, b), "plan_bind");
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s MODEL_CONFIG.json STATS.safetensors TP PP\n", argv[0]);
    return 2;
  }
  const size_t tp = (size_t)atoi(argv[3]), pp = (size_t)atoi(argv[4]), ranks = tp * pp;
  if (ranks == 0 || ranks > MAX_RANKS) return 2;
  triattn_context *ctx = NULL;
  triattn_config cfg;
  triattn_compressor *model = NULL;
  if (check(triattn_context_create(TRIATTN_BACKEND_EMU, &ctx), "context_create")) return 1;
  if (check(triattn_config_default(TRIATTN_PRESET_PAPER, &cfg), "config_default")) return 1;
  cfg.budget = BUDGET;
  if (check(triattn_compressor_create(ctx, argv[1], argv[2], &cfg, &model), "compressor_create")) return 1;
  triattn_shape m = {.struct_size = sizeof m};
  if (check(triattn_compressor_shape(model, &m), "compressor_shape")) return 1;

  /* The whole cache: per layer K [Hkv, N, D] f32. */
  const size_t head_elems = N * m.head_dim;
  void **k = calloc(m.num_layers, sizeof *k);
  unsigned x = 2024u;
  for (size_t l = 0; l < m.num_layers; ++l) {
    float *t = mem_alloc(m.num_kv_heads * head_elems * sizeof(float));
    for (size_t i = 0; i < m.num_kv_heads * head_elems; ++i)
      t[i] = (float)((int)((x = x * 1664525u + 1013904223u) >> 16) % 2001 - 1000) / 700.0f;
    k[l] = t;
  }
  int64_t round_start = 4000;

  /* One unsharded rank: the reference keep sets [Hkv, kept]. */
  triattn_plan *ref_plan = NULL;
  triattn_plan_info ref_info;
  void *ref_ws = NULL;
  triattn_binding *ref_b = NULL;
  int rc = plan_and_bind(model, m.head_dim, k, &ref_plan, &ref_info, &ref_ws, &ref_b);
  if (rc == 0) rc = check(triattn_binding_run(ref_b, &round_start, NULL), "binding_run");

  /* Every rank: its compressor, plan, binding. Rank r holds layers of stage r / tp and KV heads
   * of tp rank r % tp: with contiguous [Hkv, N, D] tensors, its heads start at an offset. */
  triattn_compressor *comp[MAX_RANKS] = {0};
  triattn_plan *plan[MAX_RANKS] = {0};
  triattn_plan_info info[MAX_RANKS];
  triattn_binding *bind[MAX_RANKS] = {0};
  void *ws[MAX_RANKS] = {0};
  void **rank_keys[MAX_RANKS] = {0};
  size_t first_layer[MAX_RANKS], kv_first[MAX_RANKS], kv_count[MAX_RANKS], parts = 0;
  for (size_t r = 0; r < ranks && rc == 0; ++r) {
    triattn_shard shard = {.struct_size = sizeof shard, .tp_size = tp, .pp_size = pp, .stage_layers = NULL, .rank = r};
    rc = check(triattn_compressor_create_shard(model, &shard, &comp[r]), "compressor_create_shard");
    triattn_shape rm = {.struct_size = sizeof rm};
    if (rc == 0) rc = check(triattn_compressor_shape(comp[r], &rm), "compressor_shape (rank)");
    if (rc != 0) break;
    size_t tp_rank = r % tp, pp_rank = r / tp;
    first_layer[r] = pp_rank * rm.num_layers; /* an even split */
    kv_count[r] = rm.num_kv_heads;
    kv_first[r] = tp <= m.num_kv_heads ? tp_rank * rm.num_kv_heads : tp_rank / (tp / m.num_kv_heads);
    rank_keys[r] = calloc(rm.num_layers, sizeof(void *));
    for (size_t l = 0; l < rm.num_layers; ++l)
      rank_keys[r][l] = (float *)k[first_layer[r] + l] + kv_first[r] * head_elems;
    rc = plan_and_bind(comp[r], m.head_dim, rank_keys[r], &plan[r], &info[r], &ws[r], &bind[r]);
    size_t p = 0;
    if (rc == 0) rc = check(triattn_plan_get_parts(plan[r], &p), "plan_get_parts");
    if (r == 0) parts = p;
    if (rc == 0 && p != parts) rc = 1;
  }

  /* The round, part by part; between parts each group's buffers all-reduced in place. */
  for (size_t part = 0; part < parts && rc == 0; ++part) {
    for (size_t r = 0; r < ranks && rc == 0; ++r)
      rc = check(triattn_binding_run_part(bind[r], &round_start, part, NULL), "binding_run_part");
    if (part + 1 == parts || rc != 0) break;
    for (size_t r = 0; r < ranks && rc == 0; ++r) {
      triattn_reduction red = {.struct_size = sizeof red};
      rc = check(triattn_plan_get_reduction(plan[r], part, &red), "plan_get_reduction");
      if (rc != 0 || red.rank_first != r) continue; /* the group's first rank reduces for all */
      if (r == 0) {
        printf("collective %zu: %s %s over %zu ranks (stride %zu), %zu elements = %zu bytes per rank\n", part,
               red.op == TRIATTN_REDUCE_OP_MAX ? "max" : "sum", red.dtype == TRIATTN_REDUCE_DTYPE_I32 ? "int32" : "double",
               red.rank_count, red.rank_stride, red.count, red.bytes);
      }
      for (size_t i = 0; i < red.count; ++i) {
        if (red.dtype == TRIATTN_REDUCE_DTYPE_I32) {
          int32_t acc = INT32_MIN;
          for (size_t g = 0; g < red.rank_count; ++g) {
            int32_t *buf = (int32_t *)((char *)ws[red.rank_first + g * red.rank_stride] + red.offset);
            if (buf[i] > acc) acc = buf[i];
          }
          for (size_t g = 0; g < red.rank_count; ++g)
            ((int32_t *)((char *)ws[red.rank_first + g * red.rank_stride] + red.offset))[i] = acc;
        } else {
          double acc = 0.0;
          for (size_t g = 0; g < red.rank_count; ++g) {
            double *buf = (double *)((char *)ws[red.rank_first + g * red.rank_stride] + red.offset);
            acc = g == 0 ? buf[i] : acc + buf[i];
          }
          for (size_t g = 0; g < red.rank_count; ++g)
            ((double *)((char *)ws[red.rank_first + g * red.rank_stride] + red.offset))[i] = acc;
        }
      }
    }
  }

  /* Each rank's keep sets (per-head mode: one per KV head it holds) against the reference. */
  size_t equal = 0;
  for (size_t r = 0; r < ranks && rc == 0; ++r) {
    const int32_t *got = (const int32_t *)((const char *)ws[r] + info[r].keep_offset);
    for (size_t g = 0; g < kv_count[r]; ++g) {
      const int32_t *want = (const int32_t *)((const char *)ref_ws + ref_info.keep_offset) + (kv_first[r] + g) * ref_info.kept;
      if (info[r].kept != ref_info.kept || memcmp(got + g * info[r].kept, want, ref_info.kept * sizeof(int32_t)) != 0) {
        fprintf(stderr, "rank %zu KV head %zu: keep set differs from one rank's\n", r, kv_first[r] + g);
        rc = 1;
      } else {
        ++equal;
      }
    }
  }
  printf("tp %zu x pp %zu: %zu parts, %zu rank keep sets equal to one rank's (kept %zu of %d)\n", tp, pp, parts, equal,
         ref_info.kept, N);

  /* A shard's compressor refuses host rounds and a second split, by name. */
  triattn_compressor *twice = NULL;
  triattn_shard again = {.struct_size = sizeof again, .tp_size = 1, .pp_size = 1, .rank = 0};
  triattn_status st = comp[0] ? triattn_compressor_create_shard(comp[0], &again, &twice) : TRIATTN_STATUS_OK;
  char msg[256];
  triattn_last_error(msg, sizeof msg);
  printf("shard of a shard -> status %d\n", (int)st);
  if (st != TRIATTN_STATUS_INVALID_ARGUMENT || twice != NULL || strstr(msg, "compressor") == NULL) rc = 1;
  triattn_shard bad = {.struct_size = sizeof bad, .tp_size = 3, .pp_size = 1, .rank = 0};
  st = triattn_compressor_create_shard(model, &bad, &twice);
  triattn_last_error(msg, sizeof msg);
  printf("tp 3 -> status %d: %s\n", (int)st, msg);
  if (st != TRIATTN_STATUS_INVALID_ARGUMENT || strstr(msg, "tp_size") == NULL) rc = 1;

  for (size_t r = 0; r < ranks; ++r) {
    triattn_binding_destroy(bind[r]);
    triattn_plan_destroy(plan[r]);
    triattn_compressor_destroy(comp[r]);
    free(ws[r]);
    free(rank_keys[r]);
  }
  triattn_binding_destroy(ref_b);
  triattn_plan_destroy(ref_plan);
  free(ref_ws);
  for (size_t l = 0; l < m.num_layers; ++l) free(k[l]);
  free(k);
  triattn_compressor_destroy(model);
  triattn_context_destroy(ctx);
  printf("%s\n", rc == 0 ? "ok" : "failed");
  return rc;
}
