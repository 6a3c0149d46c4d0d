// A torch extension over oneDNN's C API, for benchmarks/onednn_in_process.py (issue #27): a bf16 x bf16 ->
// float32 matmul plan per shape, a weight prepacked by oneDNN's reorder, and FP8 bytes widened to bf16
// through a 256-entry table. An experiment, not fp8lm's code path.
#include <torch/extension.h>
#include <oneapi/dnnl/dnnl.h>
#include <cstring>
#define CK(x) do { dnnl_status_t s_ = (x); TORCH_CHECK(s_ == dnnl_success, #x, " failed: ", (int)s_); } while (0)
static dnnl_engine_t eng; static dnnl_stream_t st; static bool inited = false;
static void init() { if (!inited) { CK(dnnl_engine_create(&eng, dnnl_cpu, 0)); CK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags)); inited = true; } }
struct Plan { dnnl_primitive_t mm, reorder; dnnl_memory_desc_t a, bp, bplain, c; size_t packed_bytes; };
static std::vector<Plan> plans;
// A plan for x [M, K] bf16 @ W [N, K] -> [M, N] f32; W given as [N, K] row-major == (K x N) "ba".
int64_t plan(int64_t M, int64_t K, int64_t N) {
  init(); Plan p; int64_t ad[2] = {M, K}, bd[2] = {K, N}, cd[2] = {M, N};
  dnnl_memory_desc_t bany;
  CK(dnnl_memory_desc_create_with_tag(&p.a, 2, ad, dnnl_bf16, dnnl_ab));
  CK(dnnl_memory_desc_create_with_tag(&bany, 2, bd, dnnl_bf16, dnnl_format_tag_any));
  CK(dnnl_memory_desc_create_with_tag(&p.bplain, 2, bd, dnnl_bf16, dnnl_ba));
  CK(dnnl_memory_desc_create_with_tag(&p.c, 2, cd, dnnl_f32, dnnl_ab));
  dnnl_primitive_desc_t pd; CK(dnnl_matmul_primitive_desc_create(&pd, eng, p.a, bany, nullptr, p.c, nullptr));
  CK(dnnl_memory_desc_clone(&p.bp, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0)));
  p.packed_bytes = dnnl_memory_desc_get_size(p.bp);
  CK(dnnl_primitive_create(&p.mm, pd));
  dnnl_primitive_desc_t rpd; CK(dnnl_reorder_primitive_desc_create(&rpd, p.bplain, eng, p.bp, eng, nullptr));
  CK(dnnl_primitive_create(&p.reorder, rpd));
  plans.push_back(p); return plans.size() - 1;
}
static void exec2(dnnl_primitive_t prim, int n, dnnl_exec_arg_t* a) { CK(dnnl_primitive_execute(prim, st, n, a)); CK(dnnl_stream_wait(st)); }
// W [N, K] bf16 -> packed (uint8 buffer of packed_bytes)
torch::Tensor pack(int64_t id, torch::Tensor w) {
  Plan& p = plans[id]; auto out = torch::empty({(int64_t)p.packed_bytes}, torch::kUInt8);
  dnnl_memory_t from, to; CK(dnnl_memory_create(&from, p.bplain, eng, w.data_ptr())); CK(dnnl_memory_create(&to, p.bp, eng, out.data_ptr()));
  dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}}; exec2(p.reorder, 2, args);
  dnnl_memory_destroy(from); dnnl_memory_destroy(to); return out;
}
torch::Tensor matmul(int64_t id, torch::Tensor x, torch::Tensor packed) {
  Plan& p = plans[id]; int64_t M = x.size(0), N = dnnl_memory_desc_get_size(p.c) / 4 / M;
  auto y = torch::empty({M, N}, torch::kFloat32);
  dnnl_memory_t ma, mb, mc; CK(dnnl_memory_create(&ma, p.a, eng, x.data_ptr())); CK(dnnl_memory_create(&mb, p.bp, eng, packed.data_ptr()));
  CK(dnnl_memory_create(&mc, p.c, eng, y.data_ptr()));
  dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}}; exec2(p.mm, 3, args);
  dnnl_memory_destroy(ma); dnnl_memory_destroy(mb); dnnl_memory_destroy(mc); return y;
}
// FP8 bytes (any order) -> bf16 bits through a 256-entry table, in parallel.
torch::Tensor widen(torch::Tensor bytes, torch::Tensor table) {
  auto out = torch::empty({bytes.numel()}, torch::kBFloat16);
  const uint8_t* b = bytes.data_ptr<uint8_t>(); const uint16_t* t = (const uint16_t*)table.data_ptr(); uint16_t* o = (uint16_t*)out.data_ptr();
  int64_t n = bytes.numel();
  at::parallel_for(0, n, 16384, [&](int64_t s, int64_t e) { for (int64_t i = s; i < e; ++i) o[i] = t[b[i]]; });
  return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("plan", &plan); m.def("pack", &pack); m.def("matmul", &matmul); m.def("widen", &widen); }
