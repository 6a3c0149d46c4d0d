// oneDNN's bf16 x bf16 -> float32 matmul, the weight prepacked in oneDNN's own layout, at SmolLM2's
// shapes (issue #27: the candidate for FP8 GEMMs on matrix hardware; E4M3 values and their products are
// exact in bf16 and float32, so over FP8 values widened to bf16 it computes the FP8 GEMM). Prints
// GFLOP/s and the implementation oneDNN dispatched to (AMX where the CPU has it).
//
// oneDNN from PyPI (CPU only, GNU OpenMP like torch); the C API headers from torch's include folder:
//   pip download --no-deps -d /tmp/onednn onednn-cpu-gomp==2023.2.0 && cd /tmp/onednn && unzip -q *.whl
//   L=/tmp/onednn/onednn_cpu_gomp-2023.2.0.data/data/lib; ln -sf $L/libdnnl.so.3 $L/libdnnl.so
//   g++ -O2 -std=c++17 benchmarks/onednn_bf16_matmul.cpp -I.venv/lib/python3.11/site-packages/torch/include \
//       -L$L -ldnnl -Wl,-rpath,$L -o /tmp/onednn/mm && OMP_NUM_THREADS=2 /tmp/onednn/mm
#include <oneapi/dnnl/dnnl.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <cstdint>
#define CK(x) do { dnnl_status_t s = (x); if (s != dnnl_success) { printf("fail %s: %d\n", #x, s); exit(1);} } while (0)
static uint16_t bf(float f) { uint32_t u; memcpy(&u, &f, 4); return u >> 16; }
int main(int argc, char** argv) {
    dnnl_engine_t eng; CK(dnnl_engine_create(&eng, dnnl_cpu, 0));
    dnnl_stream_t st; CK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
    int shapes[][3] = {{512,576,576},{2048,576,576},{128,576,1536},{512,576,1536},{2048,576,1536},{512,1536,576},{2048,1536,576}};
    for (auto& s : shapes) {
        int64_t M = s[0], K = s[1], N = s[2];
        dnnl_memory_desc_t a, b_any, b_plain, c;
        int64_t ad[2] = {M, K}, bd[2] = {K, N}, cd[2] = {M, N};
        CK(dnnl_memory_desc_create_with_tag(&a, 2, ad, dnnl_bf16, dnnl_ab));
        CK(dnnl_memory_desc_create_with_tag(&b_any, 2, bd, dnnl_bf16, dnnl_format_tag_any));
        CK(dnnl_memory_desc_create_with_tag(&b_plain, 2, bd, dnnl_bf16, dnnl_ba));
        CK(dnnl_memory_desc_create_with_tag(&c, 2, cd, dnnl_f32, dnnl_ab));
        dnnl_primitive_desc_t pd; CK(dnnl_matmul_primitive_desc_create(&pd, eng, a, b_any, nullptr, c, nullptr));
        const char* impl; dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
        const_dnnl_memory_desc_t b_packed = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
        std::vector<uint16_t> A(M*K), B(K*N); std::vector<float> C(M*N);
        for (auto& x : A) x = bf((rand() % 1000) / 500.0f - 1); for (auto& x : B) x = bf((rand() % 1000) / 500.0f - 1);
        dnnl_memory_t ma, mbp, mbk, mc;
        CK(dnnl_memory_create(&ma, a, eng, A.data())); CK(dnnl_memory_create(&mbp, b_plain, eng, B.data()));
        CK(dnnl_memory_create(&mbk, b_packed, eng, DNNL_MEMORY_ALLOCATE)); CK(dnnl_memory_create(&mc, c, eng, C.data()));
        dnnl_primitive_desc_t rpd; CK(dnnl_reorder_primitive_desc_create(&rpd, b_plain, eng, b_packed, eng, nullptr));
        dnnl_primitive_t re; CK(dnnl_primitive_create(&re, rpd));
        dnnl_exec_arg_t rargs[2] = {{DNNL_ARG_FROM, mbp}, {DNNL_ARG_TO, mbk}};
        CK(dnnl_primitive_execute(re, st, 2, rargs)); dnnl_stream_wait(st);
        dnnl_primitive_t mm; CK(dnnl_primitive_create(&mm, pd));
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mbk}, {DNNL_ARG_DST, mc}};
        for (int i = 0; i < 3; ++i) dnnl_primitive_execute(mm, st, 3, args);
        dnnl_stream_wait(st);
        int reps = 20; auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; ++i) dnnl_primitive_execute(mm, st, 3, args);
        dnnl_stream_wait(st);
        double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
        printf("%ldx%ld @ %ldx%ld: %.1f GFLOP/s  (%s)\n", M, K, K, N, 2.0*M*N*K/sec/1e9, impl);
    }
}
