// A decode step (one new token per sequence) of a whole Llama decoder as one call: the same kernels as
// the layer-by-layer path (FP8 or bfloat16 panels, oneDNN's packed matmul, write_cache, the attention
// kernel), with the glue between them (RMSNorm, rotary embedding, K's offset, residual adds,
// SiLU·up) in plain loops instead of ~15 framework ops per layer. Activations stay float32 between the
// parts (a bfloat16 model's too: only its weights and caches are bfloat16).
// Included by fp8_cpu.cpp after decode_parts.h.

struct DecodeLayer {
  at::Tensor input_norm, post_norm;  // [H] RMSNorm weights
  std::vector<Projection> qkv, o, gate_up, down;   // each a group whose outputs are concatenated
  c10::optional<at::Tensor> key_offset;   // [kv_heads * head_dim], subtracted from K after rotary
  LayerAttention attention;
  at::Tensor k_cache, v_cache;       // [kv_heads, blocks, block_size, head_dim]: FP8 bytes (uint8), float32, bfloat16
  c10::optional<at::Tensor> first_kv;  // exact_first_token's float32 rows [2, kv_heads, rows, head_dim]
};

class DecodeStack {
 public:
  // e5m2, limit, mantissa_bits, min_exponent: the FP8 format of the FP8 parts (unused without any).
  DecodeStack(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate,
              double eps, bool e5m2, double limit, int64_t mantissa_bits, int64_t min_exponent, int64_t want_isa)
      : hidden_(hidden), heads_(num_heads), kv_heads_(num_kv_heads), d_(head_dim), inter_(intermediate), eps_(eps), e5m2_(e5m2),
        limit_(limit), mantissa_(mantissa_bits), min_exp_(min_exponent), isa_(want_isa) {
    check_isa(want_isa);
    TORCH_CHECK(head_dim % 2 == 0 && num_heads % num_kv_heads == 0, "decode stack: bad head shapes");
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::vector<Projection> qkv, std::vector<Projection> o,
                 std::vector<Projection> gate_up, std::vector<Projection> down, c10::optional<at::Tensor> key_offset,
                 LayerAttention attention) {
    const int64_t kv_n = kv_heads_ * d_;
    check_outputs(qkv, heads_ * d_ + 2 * kv_n, "q/k/v");
    check_outputs(o, hidden_, "o_proj");
    check_outputs(gate_up, 2 * inter_, "gate/up");
    check_outputs(down, hidden_, "down_proj");
    check_float_vector(input_norm, "input_norm", {hidden_});
    check_float_vector(post_norm, "post_norm", {hidden_});
    if (key_offset) check_float_vector(*key_offset, "key_offset", {kv_n});
    layers_.push_back(DecodeLayer{input_norm, post_norm, qkv, o, gate_up, down, key_offset, attention,
                                  at::Tensor(), at::Tensor(), c10::nullopt});
  }

  void bind_caches(int64_t layer, at::Tensor k_cache, at::Tensor v_cache, c10::optional<at::Tensor> first_kv) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "decode stack: no layer ", layer);
    const auto type = k_cache.scalar_type();
    const bool fp8 = layers_[layer].attention.fp8;
    TORCH_CHECK(v_cache.scalar_type() == type && (type == at::kFloat || type == (fp8 ? at::kByte : at::kBFloat16)),
                "decode stack: layer ", layer, fp8 ? "'s FP8 attention reads FP8 bytes or float32 caches"
                                                   : "'s plain attention reads float32 or bfloat16 caches");
    layers_[layer].k_cache = k_cache;
    layers_[layer].v_cache = v_cache;
    TORCH_CHECK(!first_kv || (first_kv->scalar_type() == at::kFloat && first_kv->is_contiguous() &&
                              first_kv->dim() == 4 && first_kv->size(0) == 2 && first_kv->size(1) == kv_heads_ &&
                              first_kv->size(2) > k_cache.size(1) && first_kv->size(3) == d_),
                "decode stack: first_kv must be contiguous float32 [2, kv_heads, cache blocks + 1, head_dim]");
    layers_[layer].first_kv = first_kv;
  }

  // x [B, hidden] (the embeddings of the step's tokens); cos / signed sin [B, head_dim] at their
  // positions; slots [B]; block_tables [B, max_blocks]; bias [B, max_blocks * block_size].
  // Returns the last layer's output (before the final norm).
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& bias) {
    TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "decode stack: x must be float32 [B, hidden]");
    const int64_t B = x_in.size(0);
    TORCH_CHECK(x_in.size(1) == hidden_, "decode stack: x has ", x_in.size(1), " features, the layers ", hidden_);
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * d_ && sin.numel() == B * d_,
                "decode stack: cos and sin must be contiguous [B, head_dim]");
    auto x = x_in.contiguous().clone();
    auto h = at::empty_like(x);
    auto q = at::empty({B, heads_, d_}, x.options());
    auto k = at::empty({B, kv_heads_, d_}, x.options());
    auto v = at::empty({B, kv_heads_, d_}, x.options());
    auto act = at::empty({B, inter_}, x.options());
    for (DecodeLayer& l : layers_) {
      TORCH_CHECK(l.k_cache.defined(), "decode stack: caches not bound");
      rms_norm(x, l.input_norm, h);
      auto qkv = project(h, l.qkv);
      split_rotate(qkv, cos, sin, l.key_offset, q, k, v);
      write_rows(k, l.k_cache, slots, l.attention.k_inv_scale);
      write_rows(v, l.v_cache, slots, l.attention.v_inv_scale);
      if (l.first_kv) keep_first_tokens(k, v, slots, l.k_cache.size(2), *l.first_kv);
      auto att = attend(q, l, block_tables, bias);
      add_into(x, project(att.view({B, heads_ * d_}), l.o));
      rms_norm(x, l.post_norm, h);
      silu_mul(project(h, l.gate_up), act);
      add_into(x, project(act, l.down));
    }
    return x;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  static void check_outputs(const std::vector<Projection>& group, int64_t N, const char* name) {
    int64_t total = 0;
    for (const Projection& p : group) total += p.N;
    TORCH_CHECK(!group.empty() && total == N, "decode stack: ", name, " has ", total, " outputs, expected ", N);
  }

  at::Tensor project(const at::Tensor& in, const std::vector<Projection>& group) const {
    if (group.size() == 1) return project_one(in, group[0]);
    std::vector<at::Tensor> parts;
    for (const Projection& p : group) parts.push_back(project_one(in, p));
    return at::cat(parts, 1);
  }

  at::Tensor project_one(const at::Tensor& in, const Projection& p) const {
    switch (p.kind) {
      case Projection::Kind::kFP8:
        return linear(in, p.weight, p.N, e5m2_, p.col_scale, p.row_scale, p.inv_scale, limit_, mantissa_, min_exp_,
                      p.bias, isa_);
      case Projection::Kind::kBF16Panels:
        return linear_bf16(in, p.weight, p.N, p.bias, isa_);
      case Projection::Kind::kOneDnn: {
        auto y = onednn_linear(in.to(p.weight.scalar_type()), p.weight).to(at::kFloat);
        if (p.bias) y.add_(*p.bias);
        return y;
      }
    }
    TORCH_CHECK(false, "decode stack: unknown projection kind");
  }

  // New K or V rows [B, kv_heads, d] into the layer's cache at `slots`: FP8 bytes through the cache's
  // scale, or the values themselves (rounded to a bfloat16 cache's type).
  void write_rows(const at::Tensor& rows, at::Tensor& cache, const at::Tensor& slots, double inv_scale) const {
    if (cache.scalar_type() == at::kByte) {
      write_cache(rows, cache, slots, e5m2_, inv_scale, limit_, mantissa_, min_exp_, isa_);   // checks slots
      return;
    }
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == rows.size(0), "decode stack: one int64 slot per row");
    cache.view({kv_heads_, -1, d_}).index_copy_(1, slots, rows.transpose(0, 1).to(cache.scalar_type()));
  }

  at::Tensor attend(const at::Tensor& q, const DecodeLayer& l, const at::Tensor& block_tables,
                    const at::Tensor& bias) const {
    const LayerAttention& a = l.attention;
    if (!a.fp8)
      return plain_paged_attention(q, l.k_cache, l.v_cache, block_tables, bias, a.scales[0], kv_heads_, isa_, l.first_kv);
    return paged_attention(q, l.k_cache, l.v_cache, block_tables, bias, e5m2_, a.scales, a.requantize_k,
                           a.requantize_v, limit_, mantissa_, min_exp_, kv_heads_, isa_, l.first_kv);
  }

  // out = x * rsqrt(mean(x²) + eps) * w, per row; the squares summed in double.
  void rms_norm(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) const {
    const int64_t B = x.size(0), H = x.size(1);
    const float* px = x.data_ptr<float>();
    const float* pw = w.data_ptr<float>();
    float* po = out.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* r = px + b * H;
      double ss = 0;
      for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(r[i]) * r[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + static_cast<float>(eps_));
      for (int64_t i = 0; i < H; ++i) po[b * H + i] = (r[i] * inv) * pw[i];
    }
  }

  // q, k, v out of the fused projection's rows; q and k rotated (x·cos + roll(x, d/2)·signed sin),
  // then K's calibrated offset subtracted.
  void split_rotate(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                    const c10::optional<at::Tensor>& key_offset, at::Tensor& q, at::Tensor& k,
                    at::Tensor& v) const {
    const int64_t B = qkv.size(0), width = qkv.size(1), half = d_ / 2;
    const float* src = qkv.data_ptr<float>();
    const float* pc = cos.data_ptr<float>();
    const float* ps = sin.data_ptr<float>();
    const float* off = key_offset ? key_offset->data_ptr<float>() : nullptr;
    float* pq = q.data_ptr<float>();
    float* pk = k.data_ptr<float>();
    float* pv = v.data_ptr<float>();
    auto rotate = [&](const float* in, const float* c, const float* s, float* out, const float* minus) {
      for (int64_t i = 0; i < d_; ++i) {
        const float a = in[i] * c[i];
        const float r = in[(i + half) % d_] * s[i];
        out[i] = minus ? (a + r) - minus[i] : a + r;
      }
    };
    for (int64_t b = 0; b < B; ++b) {
      const float* row = src + b * width;
      const float* c = pc + b * d_;
      const float* s = ps + b * d_;
      for (int64_t hd = 0; hd < heads_; ++hd) rotate(row + hd * d_, c, s, pq + (b * heads_ + hd) * d_, nullptr);
      const float* kr = row + heads_ * d_;
      for (int64_t hd = 0; hd < kv_heads_; ++hd)
        rotate(kr + hd * d_, c, s, pk + (b * kv_heads_ + hd) * d_, off ? off + hd * d_ : nullptr);
      std::copy(kr + kv_heads_ * d_, kr + 2 * kv_heads_ * d_, pv + b * kv_heads_ * d_);
    }
  }

  // As PagedAttention.keep_first_tokens: a token in a block's first slot keeps its unrounded K/V in
  // that block's row (a one-token step may be a sequence's first: a one-token prompt).
  void keep_first_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                         int64_t block_size, at::Tensor& first_kv) const {
    const int64_t B = k.size(0), rows = first_kv.size(2);
    const int64_t* ps = slots.data_ptr<int64_t>();
    const float* pk = k.data_ptr<float>();
    const float* pv = v.data_ptr<float>();
    float* fk = first_kv.data_ptr<float>();
    float* fv = fk + kv_heads_ * rows * d_;
    for (int64_t b = 0; b < B; ++b) {
      if (ps[b] % block_size != 0) continue;
      const int64_t row = ps[b] / block_size;
      for (int64_t hd = 0; hd < kv_heads_; ++hd) {
        const float* kb = pk + (b * kv_heads_ + hd) * d_;
        const float* vb = pv + (b * kv_heads_ + hd) * d_;
        std::copy(kb, kb + d_, fk + (hd * rows + row) * d_);
        std::copy(vb, vb + d_, fv + (hd * rows + row) * d_);
      }
    }
  }

  // act = silu(gate) * up, gate and up the halves of each row of gu.
  void silu_mul(const at::Tensor& gu, at::Tensor& act) const {
    const int64_t B = gu.size(0);
    const float* p = gu.data_ptr<float>();
    float* o = act.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < inter_; ++i) {
        const float g = p[b * 2 * inter_ + i], u = p[b * 2 * inter_ + inter_ + i];
        o[b * inter_ + i] = (g / (1.0f + std::exp(-g))) * u;
      }
  }

  static void add_into(at::Tensor& x, const at::Tensor& y) {
    float* px = x.data_ptr<float>();
    const float* py = y.data_ptr<float>();
    for (int64_t i = 0, n = x.numel(); i < n; ++i) px[i] += py[i];
  }

  int64_t hidden_, heads_, kv_heads_, d_, inter_;
  double eps_;
  bool e5m2_;
  double limit_;
  int64_t mantissa_, min_exp_, isa_;
  std::vector<DecodeLayer> layers_;
};
