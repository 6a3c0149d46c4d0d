// fp8lm's oneDNN GEMM for FP8 W8A8 matmuls with many rows (prompt chunks): oneDNN's matmul primitive,
// which runs AMX or AVX-512 BF16 where the CPU has them. Every E4M3 / E5M2 value is exact in bfloat16
// (and float32) and the products of two are exact in float32, so a bf16 x bf16 -> f32 matmul of the
// FP8 values is the FP8 GEMM up to the float32 sums' order.
//
// The weights stay in fp8lm's FP8 panels (1 byte each). Each call widens them (onednn_widen.h)
// straight into oneDNN's blocked weight layout, whose element offsets are separable,
// off(k, n) = k_offset[k] + n_offset[n]; those two tables are read once per shape from oneDNN's own
// reorder (so no layout of oneDNN's is written down here, and the check that they are separable is
// exhaustive).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <oneapi/dnnl/dnnl.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

// In the oneDNN 3.2 library that fp8lm links (the onednn-cpu-gomp wheel), not in torch's newer headers.
extern "C" dnnl_status_t DNNL_API dnnl_memory_desc_create_with_string_tag(
    dnnl_memory_desc_t* memory_desc, int ndims, const dnnl_dims_t dims, dnnl_data_type_t data_type, const char* tag);

#include "onednn_widen.h"

namespace fp8lm_onednn {

constexpr size_t kMaxPrimitivesPerPlan = 64;

void check(dnnl_status_t status, const char* what) {
  TORCH_CHECK(status == dnnl_success, "oneDNN: ", what, " failed (status ", static_cast<int>(status), ")");
}

struct Engine {
  dnnl_engine_t engine;
  dnnl_stream_t stream;
};

Engine& cpu() {
  static Engine e = [] {
    Engine made;
    check(dnnl_engine_create(&made.engine, dnnl_cpu, 0), "engine_create");
    check(dnnl_stream_create(&made.stream, made.engine, dnnl_stream_default_flags), "stream_create");
    return made;
  }();
  return e;
}

dnnl_data_type_t data_type(int64_t element_bytes) { return element_bytes == 2 ? dnnl_bf16 : dnnl_f32; }

dnnl_memory_desc_t plain_desc(int64_t rows, int64_t cols, dnnl_data_type_t type, dnnl_format_tag_t tag) {
  dnnl_memory_desc_t md;
  dnnl_dims_t dims = {rows, cols};
  check(dnnl_memory_desc_create_with_tag(&md, 2, dims, type, tag), "memory_desc_create_with_tag");
  return md;
}

void execute(dnnl_primitive_t primitive, std::vector<dnnl_exec_arg_t> args) {
  check(dnnl_primitive_execute(primitive, cpu().stream, static_cast<int>(args.size()), args.data()), "execute");
  check(dnnl_stream_wait(cpu().stream), "stream_wait");
}

dnnl_memory_t wrap(const_dnnl_memory_desc_t md, void* data) {
  dnnl_memory_t memory;
  check(dnnl_memory_create(&memory, md, cpu().engine, data), "memory_create");
  return memory;
}

std::string implementation(const_dnnl_primitive_desc_t pd) {
  const char* name = nullptr;
  check(dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name), "query impl_info_str");
  return name ? name : "";
}

// One weight shape [K, N] in one element type (bfloat16 or float32): oneDNN's blocked layout for it,
// the separable offsets of that layout, and a matmul primitive per row count.
class GemmPlan {
 public:
  GemmPlan(int64_t K, int64_t N, int64_t element_bytes, int64_t layout_rows)
      : K_(K), N_(N), element_bytes_(element_bytes), type_(data_type(element_bytes)) {
    TORCH_CHECK(element_bytes == 2 || element_bytes == 4, "oneDNN GEMM: element size must be 2 or 4 bytes");
    dnnl_memory_desc_t any = plain_desc(K, N, type_, dnnl_format_tag_any);
    dnnl_primitive_desc_t pd = matmul_desc(layout_rows, any);
    dnnl_memory_desc_destroy(any);
    check(dnnl_memory_desc_clone(&packed_, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0)), "clone");
    layout_impl_ = implementation(pd);
    dnnl_primitive_desc_destroy(pd);
    find_offsets();
    runs_ = run_layout();
  }

  // A layout given by hand as oneDNN's tag for (K, N) (e.g. "BA16a64b2a", the AMX kernels' weight
  // layout), on a CPU whose matmul would choose another: tests.
  GemmPlan(int64_t K, int64_t N, int64_t element_bytes, const std::string& tag)
      : K_(K), N_(N), element_bytes_(element_bytes), type_(data_type(element_bytes)) {
    TORCH_CHECK(element_bytes == 2 || element_bytes == 4, "oneDNN GEMM: element size must be 2 or 4 bytes");
    dnnl_dims_t dims = {K, N};
    check(dnnl_memory_desc_create_with_string_tag(&packed_, 2, dims, type_, tag.c_str()),
          "memory_desc_create_with_string_tag");
    layout_impl_ = tag;
    find_offsets();
    runs_ = run_layout();
  }
  ~GemmPlan() {
    for (auto& [rows, made] : primitives_) dnnl_primitive_destroy(made.primitive);
    dnnl_memory_desc_destroy(packed_);
    dnnl_memory_desc_destroy(plain_);
  }
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;

  int64_t packed_bytes() const { return static_cast<int64_t>(dnnl_memory_desc_get_size(packed_)); }
  std::string layout_impl() const { return layout_impl_; }
  RunLayout runs() const { return runs_; }
  at::Tensor k_offsets() const { return at::tensor(k_offset_, at::kLong); }
  at::Tensor n_offsets() const { return at::tensor(n_offset_, at::kLong); }

  // FP8 panels [ceil(N / 32), K, 32] -> `out` (packed_bytes, padding already zero): each byte's value
  // times 2^-8 for E4M3 (the kernels' byte_value_factor), in the element type. Runs of whole panels
  // are converted with F16C as the kernels do; other values through `table` (256 entries: those
  // values' bits), which must agree.
  void widen(const at::Tensor& panels, const at::Tensor& table, at::Tensor out, bool e5m2) const {
    TORCH_CHECK(panels.dtype() == at::kByte && panels.is_contiguous() && panels.dim() == 3 &&
                panels.size(0) == (N_ + kPanel - 1) / kPanel && panels.size(1) == K_ && panels.size(2) == kPanel,
                "oneDNN GEMM: panels must be uint8 [ceil(N / 32), K, 32] for this plan");
    TORCH_CHECK(table.numel() == 256 && table.element_size() == element_bytes_ && table.is_contiguous(),
                "oneDNN GEMM: the table must hold 256 values of the plan's element size");
    TORCH_CHECK(out.nbytes() == static_cast<size_t>(packed_bytes()) && out.is_contiguous(),
                "oneDNN GEMM: the widened buffer must hold packed_bytes()");
    if (element_bytes_ == 2) {
      widen_as<uint16_t>(panels.data_ptr<uint8_t>(), static_cast<const uint16_t*>(table.data_ptr()), out.data_ptr(), e5m2);
    } else {
      widen_as<uint32_t>(panels.data_ptr<uint8_t>(), static_cast<const uint32_t*>(table.data_ptr()), out.data_ptr(), e5m2);
    }
  }

  // x [M, K] (the plan's element type) @ the widened weights -> [M, N] float32 sums.
  at::Tensor matmul(const at::Tensor& x, const at::Tensor& widened) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K_ && x.is_contiguous() && x.element_size() == element_bytes_,
                "oneDNN GEMM: x must be contiguous [M, K] of the plan's element type");
    TORCH_CHECK(widened.nbytes() == static_cast<size_t>(packed_bytes()), "oneDNN GEMM: wrong widened buffer");
    int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N_}, at::kFloat);
    if (M == 0) return y;
    dnnl_memory_desc_t src = plain_desc(M, K_, type_, dnnl_ab), dst = plain_desc(M, N_, dnnl_f32, dnnl_ab);
    dnnl_memory_t a = wrap(src, x.data_ptr()), b = wrap(packed_, widened.data_ptr()), c = wrap(dst, y.data_ptr());
    execute(primitive(M).primitive, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    for (dnnl_memory_t m : {a, b, c}) dnnl_memory_destroy(m);
    dnnl_memory_desc_destroy(src);
    dnnl_memory_desc_destroy(dst);
    return y;
  }

  // The implementation oneDNN runs for M rows (e.g. "brg:avx512_core_amx"; "ref:any", its slow
  // reference, where no fast kernel takes this weight layout at this row count).
  std::string impl_for(int64_t M) { return primitive(M).implementation; }

  // W [N, K] (the element type, row-major) -> oneDNN's layout; and back. For tests and the offsets.
  at::Tensor pack(const at::Tensor& w) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == N_ && w.size(1) == K_ && w.is_contiguous() &&
                w.element_size() == element_bytes_, "oneDNN GEMM: pack takes a contiguous [N, K] weight");
    at::Tensor out = at::zeros({packed_bytes()}, at::kByte);
    reorder(plain_, w.data_ptr(), packed_, out.data_ptr());
    return out;
  }
  at::Tensor unpack(const at::Tensor& packed, const at::Tensor& like) {
    TORCH_CHECK(packed.nbytes() == static_cast<size_t>(packed_bytes()), "oneDNN GEMM: wrong packed buffer");
    at::Tensor w = at::empty({N_, K_}, like.options());
    reorder(packed_, packed.data_ptr(), plain_, w.data_ptr());
    return w;
  }

 private:
  dnnl_primitive_desc_t matmul_desc(int64_t M, const_dnnl_memory_desc_t weights) const {
    dnnl_memory_desc_t src = plain_desc(M, K_, type_, dnnl_ab), dst = plain_desc(M, N_, dnnl_f32, dnnl_ab);
    dnnl_primitive_desc_t pd;
    dnnl_status_t status = dnnl_matmul_primitive_desc_create(&pd, cpu().engine, src, weights, nullptr, dst, nullptr);
    dnnl_memory_desc_destroy(src);
    dnnl_memory_desc_destroy(dst);
    check(status, "matmul_primitive_desc_create");
    return pd;
  }

  struct Made {
    dnnl_primitive_t primitive;
    std::string implementation;
  };

  const Made& primitive(int64_t M) {
    auto found = primitives_.find(M);
    if (found != primitives_.end()) return found->second;
    if (primitives_.size() >= kMaxPrimitivesPerPlan) {    // row counts vary per step: keep memory bounded
      for (auto& [rows, made] : primitives_) dnnl_primitive_destroy(made.primitive);
      primitives_.clear();
    }
    dnnl_primitive_desc_t pd = matmul_desc(M, packed_);
    Made made{nullptr, implementation(pd)};
    dnnl_status_t status = dnnl_primitive_create(&made.primitive, pd);
    dnnl_primitive_desc_destroy(pd);
    check(status, "primitive_create");
    return primitives_[M] = made;
  }

  void reorder(const_dnnl_memory_desc_t from_md, void* from, const_dnnl_memory_desc_t to_md, void* to) const {
    dnnl_primitive_desc_t pd;
    check(dnnl_reorder_primitive_desc_create(&pd, from_md, cpu().engine, to_md, cpu().engine, nullptr),
          "reorder_primitive_desc_create");
    dnnl_primitive_t r;
    dnnl_status_t status = dnnl_primitive_create(&r, pd);
    dnnl_primitive_desc_destroy(pd);
    check(status, "reorder primitive_create");
    dnnl_memory_t a = wrap(from_md, from), b = wrap(to_md, to);
    execute(r, {{DNNL_ARG_FROM, a}, {DNNL_ARG_TO, b}});
    dnnl_memory_destroy(a);
    dnnl_memory_destroy(b);
    dnnl_primitive_destroy(r);
  }

  // Where oneDNN's reorder puts each (k, n): the plain weight holds (its index + 1) one byte at a time
  // (small integers are exact in bfloat16), four reorders spell every packed element's source; 0 is
  // padding. Then the offsets must be separable, checked at every element.
  void find_offsets() {
    int64_t count = K_ * N_, packed_count = packed_bytes() / element_bytes_;
    TORCH_CHECK(count < (int64_t{1} << 32) - 1, "oneDNN GEMM: weight too large");
    at::Tensor plain = at::empty({N_, K_}, element_bytes_ == 2 ? at::kBFloat16 : at::kFloat);
    std::vector<int64_t> source(packed_count, 0);
    for (int digit = 0; digit < 4; ++digit) {
      at::Tensor index = at::arange(1, count + 1, at::kLong).reshape({N_, K_});
      plain.copy_(index.bitwise_right_shift(8 * digit).bitwise_and(255));
      at::Tensor digits = pack(plain).view(plain.scalar_type()).to(at::kLong);
      const int64_t* d = digits.data_ptr<int64_t>();
      for (int64_t p = 0; p < packed_count; ++p) source[p] |= d[p] << (8 * digit);
    }
    std::vector<int64_t> where(count, -1);
    for (int64_t p = 0; p < packed_count; ++p) {
      if (source[p] == 0) continue;
      TORCH_CHECK(source[p] <= count && where[source[p] - 1] == -1, "oneDNN GEMM: the reorder is not a permutation");
      where[source[p] - 1] = p;
    }
    k_offset_.assign(K_, 0);
    n_offset_.assign(N_, 0);
    for (int64_t k = 0; k < K_; ++k) k_offset_[k] = where[k] - where[0];            // index n * K + k
    for (int64_t n = 0; n < N_; ++n) n_offset_[n] = where[n * K_];
    for (int64_t n = 0; n < N_; ++n)
      for (int64_t k = 0; k < K_; ++k)
        TORCH_CHECK(where[n * K_ + k] == k_offset_[k] + n_offset_[n],
                    "oneDNN GEMM: oneDNN's weight layout for this shape is not separable (", layout_impl_, ")");
  }

  // Whether, in whole panels, each 8 consecutive columns lie at one stride in oneDNN's layout: 1
  // (kColumns: 8 consecutive values per k), or 2 with each even k's successor right after it (kPairs:
  // bfloat16 VNNI pairs, 16 values per two k). Otherwise each value is placed alone.
  RunLayout run_layout() const {
    bool columns = true, pairs = K_ % 2 == 0;
    for (int64_t g = 0; g + 8 <= N_ / kPanel * kPanel; g += 8)
      for (int64_t i = 0; i < 8; ++i) {
        int64_t step = n_offset_[g + i] - n_offset_[g];
        columns = columns && step == i;
        pairs = pairs && step == 2 * i;
      }
    for (int64_t k = 0; pairs && k + 1 < K_; k += 2) pairs = k_offset_[k + 1] == k_offset_[k] + 1;
    return columns ? RunLayout::kColumns : pairs ? RunLayout::kPairs : RunLayout::kScattered;
  }

  template <typename T>
  void widen_as(const uint8_t* panels, const T* table, void* out, bool e5m2) const {
    T* dst = static_cast<T*>(out);
    int64_t num_panels = (N_ + kPanel - 1) / kPanel;
    bool vector = runs_ != RunLayout::kScattered && has_avx2_f16c();
    at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t columns = std::min<int64_t>(kPanel, N_ - p * kPanel);
        const int64_t* n_off = n_offset_.data() + p * kPanel;
        const uint8_t* src = panels + p * K_ * kPanel;
        if (vector && columns == kPanel) {
          bool paired = runs_ == RunLayout::kPairs;
          for (int64_t k = 0; k < K_; k += paired ? 2 : 1)
            widen_run<T>(src + k * kPanel, paired ? src + (k + 1) * kPanel : nullptr, dst + k_offset_[k], n_off, e5m2);
          continue;
        }
        for (int64_t k = 0; k < K_; ++k, src += kPanel) {
          T* row = dst + k_offset_[k];
          for (int64_t j = 0; j < columns; ++j) row[n_off[j]] = table[src[j]];
        }
      }
    });
  }

  int64_t K_, N_, element_bytes_;
  dnnl_data_type_t type_;
  dnnl_memory_desc_t packed_ = nullptr;
  dnnl_memory_desc_t plain_ = plain_desc(K_, N_, type_, dnnl_ba);   // W as [N, K] row-major is (K x N) "ba"
  std::string layout_impl_;
  std::vector<int64_t> k_offset_, n_offset_;
  RunLayout runs_ = RunLayout::kScattered;
  std::map<int64_t, Made> primitives_;
};

// y[m, n] = y[m, n] * col_scale[n] * row_scale[m] (+ bias[n]), in place: the FP8 kernels' epilogue.
void epilogue(at::Tensor y, const at::Tensor& col_scale, const at::Tensor& row_scale,
              const c10::optional<at::Tensor>& bias) {
  int64_t M = y.size(0), N = y.size(1), row_n = row_scale.numel();
  TORCH_CHECK(y.is_contiguous() && y.dtype() == at::kFloat && col_scale.numel() == N &&
              (row_n == 1 || row_n == M) && (!bias || bias->numel() == N),
              "oneDNN GEMM: epilogue shapes do not match");
  float* out = y.data_ptr<float>();
  const float* cs = col_scale.data_ptr<float>();
  const float* rs = row_scale.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float r = rs[row_n == 1 ? 0 : m];
      float* row = out + m * N;
      if (b) {
        for (int64_t n = 0; n < N; ++n) row[n] = row[n] * cs[n] * r + b[n];
      } else {
        for (int64_t n = 0; n < N; ++n) row[n] = row[n] * cs[n] * r;
      }
    }
  });
}

// Whether oneDNN builds a matmul for this element type on this CPU, and which implementation.
std::string probe(int64_t element_bytes) {
  dnnl_memory_desc_t a = plain_desc(64, 64, data_type(element_bytes), dnnl_ab);
  dnnl_memory_desc_t w = plain_desc(64, 64, data_type(element_bytes), dnnl_format_tag_any);
  dnnl_memory_desc_t c = plain_desc(64, 64, dnnl_f32, dnnl_ab);
  dnnl_primitive_desc_t pd;
  dnnl_status_t status = dnnl_matmul_primitive_desc_create(&pd, cpu().engine, a, w, nullptr, c, nullptr);
  for (dnnl_memory_desc_t md : {a, w, c}) dnnl_memory_desc_destroy(md);
  if (status != dnnl_success) return "";
  std::string name = implementation(pd);
  dnnl_primitive_desc_destroy(pd);
  return name;
}

std::string version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

}  // namespace fp8lm_onednn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fp8lm_onednn::GemmPlan;
  py::class_<GemmPlan>(m, "GemmPlan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>())
      .def(py::init<int64_t, int64_t, int64_t, const std::string&>())
      .def("packed_bytes", &GemmPlan::packed_bytes)
      .def("layout_impl", &GemmPlan::layout_impl)
      .def("run_layout", [](const GemmPlan& p) { return static_cast<int>(p.runs()); })
      .def("impl_for", &GemmPlan::impl_for)
      .def("k_offsets", &GemmPlan::k_offsets)
      .def("n_offsets", &GemmPlan::n_offsets)
      .def("widen", &GemmPlan::widen)
      .def("matmul", &GemmPlan::matmul, py::call_guard<py::gil_scoped_release>())
      .def("pack", &GemmPlan::pack)
      .def("unpack", &GemmPlan::unpack);
  m.def("epilogue", &fp8lm_onednn::epilogue, py::call_guard<py::gil_scoped_release>());
  m.def("probe", &fp8lm_onednn::probe);
  m.def("version", &fp8lm_onednn::version);
}
