/* One TriAttention round through the C ABI on the CPU backend.
 *
 *   cc examples/c/round.c -Iinclude target/release/libtriattn.a -lpthread -ldl -lm -o round
 *   ./round data/qwen3_8b.config.json data/qwen3_8b.safetensors
 *
 * Builds a synthetic f32 cache of N slots for every layer, runs a round with budget B, compacts
 * one head's rows with the keep set, and shows how errors are reported. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "triattn.h"

#define N 320
#define BUDGET 256
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
  uint32_t v = triattn_version();
  printf("triattn %u.%u.%u\n", v >> 16, (v >> 8) & 0xff, v & 0xff);
  if (v != (TRIATTN_VERSION_MAJOR << 16 | TRIATTN_VERSION_MINOR << 8 | TRIATTN_VERSION_PATCH)) return 1;

  triattn_context *ctx = NULL;
  if (check(triattn_context_create(TRIATTN_BACKEND_CPU, &ctx), "context_create")) return 1;

  triattn_config cfg;
  if (check(triattn_config_default(TRIATTN_PRESET_PAPER, &cfg), "config_default")) return 1;
  cfg.budget = BUDGET;
  cfg.divide_length = 64;

  triattn_compressor *comp = NULL;
  if (check(triattn_compressor_create(ctx, argv[1], argv[2], &cfg, &comp), "compressor_create")) return 1;
  triattn_shape shape = {.struct_size = sizeof shape};
  if (check(triattn_compressor_shape(comp, &shape), "compressor_shape")) return 1;
  printf("model: %zu layers, %zu heads, %zu kv heads, head_dim %zu, %zu keep sets\n", shape.num_layers,
         shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.num_keep_sets);

  int due = 0;
  if (check(triattn_compressor_round_due(comp, N, 0, &due), "round_due")) return 1;
  printf("round due at %d slots: %s\n", N, due ? "yes" : "no");

  /* Synthetic keys: a smooth deterministic pattern per layer/head/slot. */
  size_t per_layer = shape.num_kv_heads * N * shape.head_dim;
  float **keys = calloc(shape.num_layers, sizeof *keys);
  for (size_t l = 0; l < shape.num_layers; ++l) {
    keys[l] = malloc(per_layer * sizeof(float));
    for (size_t i = 0; i < per_layer; ++i) keys[l][i] = (float)sin(0.37 * (double)i + 1.3 * (double)l);
  }
  int32_t *keep = malloc(shape.num_keep_sets * BUDGET * sizeof(int32_t));
  triattn_host_round args = {
      .struct_size = sizeof args,
      .dtype = TRIATTN_DTYPE_F32,
      .keys = (const void *const *)keys,
      .n = N,
      .round_start = 5000,
      .prefix_len = PROMPT,
      .keep = keep,
      .keep_row_stride = BUDGET,
      .score = NULL,
  };
  size_t kept = 0;
  triattn_outcome outcome;
  if (check(triattn_round_host(comp, &args, &kept, &outcome), "round_host")) return 1;
  printf("outcome %d: kept %zu of %d slots per set\n", (int)outcome, kept, N);
  for (size_t s = 0; s < shape.num_keep_sets; ++s) {
    for (int p = 0; p < PROMPT; ++p)
      if (keep[s * BUDGET + p] != p) {
        fprintf(stderr, "prompt slot %d not kept in set %zu\n", p, s);
        return 1;
      }
    for (size_t i = 1; i < kept; ++i)
      if (keep[s * BUDGET + i] <= keep[s * BUDGET + i - 1]) {
        fprintf(stderr, "keep set %zu not ascending\n", s);
        return 1;
      }
  }
  printf("set 0 keeps slots %d %d %d ... %d\n", keep[0], keep[1], keep[2], keep[kept - 1]);

  /* Compact KV head 0 of layer 0 in place with set 0. */
  size_t row_bytes = shape.head_dim * sizeof(float);
  float expect = keys[0][(size_t)keep[kept - 1] * shape.head_dim];
  if (check(triattn_compact_host(keys[0], N, row_bytes, row_bytes, keep, kept), "compact_host")) return 1;
  if (keys[0][(kept - 1) * shape.head_dim] != expect) {
    fprintf(stderr, "compaction moved the wrong row\n");
    return 1;
  }
  printf("compacted layer 0 head 0 to %zu rows\n", kept);

  /* A round whose protected slots reach the budget (a prompt of 300 > BUDGET slots, protected
   * under the paper preset) is skipped and keeps every slot: its keep rows hold N slots, so a
   * stride of BUDGET is refused by name before anything is written, and a stride of N works. */
  int32_t *all = malloc(shape.num_keep_sets * N * sizeof(int32_t));
  for (size_t i = 0; i < shape.num_keep_sets * N; ++i) all[i] = -1;
  triattn_host_round long_prompt = args;
  long_prompt.prefix_len = 300;
  long_prompt.keep = all;
  triattn_status st = triattn_round_host(comp, &long_prompt, &kept, &outcome);
  char why[512];
  triattn_last_error(why, sizeof why);
  printf("skipped round, row stride %d -> status %d: %s\n", BUDGET, (int)st, why);
  if (st != TRIATTN_STATUS_INVALID_ARGUMENT || strstr(why, "keep_row_stride") == NULL) return 1;
  for (size_t i = 0; i < shape.num_keep_sets * N; ++i)
    if (all[i] != -1) {
      fprintf(stderr, "a refused round wrote keep[%zu]\n", i);
      return 1;
    }
  long_prompt.keep_row_stride = N;
  if (check(triattn_round_host(comp, &long_prompt, &kept, &outcome), "round_host (long prompt)")) return 1;
  triattn_last_error(why, sizeof why);
  printf("skipped round, row stride %d -> outcome %d, kept %zu: %s\n", N, (int)outcome, kept, why);
  if (outcome != TRIATTN_OUTCOME_SKIPPED_PROTECTED_REACH_BUDGET || kept != N) return 1;
  for (size_t s = 0; s < shape.num_keep_sets; ++s)
    for (int i = 0; i < N; ++i)
      if (all[s * N + i] != i) {
        fprintf(stderr, "skipped round: set %zu slot %d holds %d\n", s, i, all[s * N + i]);
        return 1;
      }
  free(all);

  /* A struct of another size (a header of another version) is refused by name. */
  triattn_host_round old = args;
  old.struct_size = sizeof args - 8;
  st = triattn_round_host(comp, &old, &kept, &outcome);
  triattn_last_error(why, sizeof why);
  printf("struct_size %u -> status %d: %s\n", old.struct_size, (int)st, why);
  if (st != TRIATTN_STATUS_INVALID_ARGUMENT || strstr(why, "args.struct_size") == NULL) return 1;

  /* Errors come back as a status plus a message naming the field. */
  cfg.budget = 0;
  triattn_compressor *bad = NULL;
  triattn_status s = triattn_compressor_create(ctx, argv[1], argv[2], &cfg, &bad);
  char msg[256];
  triattn_last_error(msg, sizeof msg);
  printf("budget 0 -> status %d: %s\n", (int)s, msg);
  if (s != TRIATTN_STATUS_INVALID_ARGUMENT || bad != NULL || strstr(msg, "budget") == NULL) return 1;

  /* Enum fields travel as uint32_t and are checked on entry. */
  cfg.budget = BUDGET;
  cfg.mode = 7;
  s = triattn_compressor_create(ctx, argv[1], argv[2], &cfg, &bad);
  triattn_last_error(msg, sizeof msg);
  printf("mode 7 -> status %d: %s\n", (int)s, msg);
  if (s != TRIATTN_STATUS_INVALID_ARGUMENT || bad != NULL || strstr(msg, "config.mode") == NULL) return 1;

  for (size_t l = 0; l < shape.num_layers; ++l) free(keys[l]);
  free(keys);
  free(keep);
  triattn_compressor_destroy(comp);
  triattn_context_destroy(ctx);
  printf("ok\n");
  return 0;
}
