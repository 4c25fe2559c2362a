// The CLSM decoder's whole decode, and the prior's LSTM recurrence, in plain C++ (issue 12).
//
// Why: on one CPU thread a decode step of the shipped model is ~0.3 MFLOP, a few microseconds
// of arithmetic, but ~80 operator calls through PyTorch cost ~110 us. Here a step is a handful
// of loops over weights that stay in L1/L2. No PyTorch headers: the file compiles in about a
// second with the system compiler and is called through ctypes (engine/native.py), which also
// releases the GIL for the call (the daemon's timing path keeps running).
//
// Arithmetic is float32 throughout, in the same order of operations as the model (pre-LN
// layers, q pre-scaled by 1/sqrt(dh), softmax over the allowed keys only): results match
// PyTorch up to float rounding; tests/test_native.py checks identical tokens.
// Matrix products are written as "x[k] * row k of W^T" so the inner loop runs over
// contiguous outputs and vectorises without reassociating any sum (no -ffast-math).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Weight order; must match engine/native.py (TOP_NAMES, LAYER_NAMES).
enum Top { EMBED, POS, LAT_WT, LAT_B, LNF_W, LNF_B, HEAD_WT, HEAD_B, N_TOP };
enum Layer {
  LN1_W, LN1_B, QKV_WT, QKV_B, REL_T, PROJ_WT, PROJ_B, LN2_W, LN2_B, CQ_W, CQ_B, CKV_WT, CKV_B,
  CP_WT, CP_B, LN3_W, LN3_B, FF1_WT, FF1_B, FF2_WT, FF2_B, N_LAYER
};

struct Cfg {
  int D, H, dh, F, L, n, n_out, dz, lz, start_token;
  float eps;
};

// GCC/Clang vector extensions instead of intrinsics: 16 floats, one AVX-512 register here,
// two AVX2 or four SSE registers elsewhere; the compiler cannot pick a worse loop order.
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int kV = 16;

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
inline float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < kV; ++i) s += v[i];
  return s;
}

// y (M, N) = b + x (M, K) @ wt (K, N), for RB rows and NV vectors of outputs at a time: the
// accumulators stay in registers over all k, each loaded weight vector serves RB rows, and
// RB * NV independent FMA chains hide the FMA latency. Every row is summed over k in the same
// order whatever RB is, so a batch gives the same bits as its rows one by one.
template <int RB, int NV>
inline void gemm_block(const float* __restrict x, size_t ldx, int K, const float* __restrict wt,
                       int N, const float* __restrict b, int n0, float* __restrict y, size_t ldy) {
  v16 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = b ? load(b + n0 + j * kV) : v16{};
  for (int k = 0; k < K; ++k) {
    const float* w = wt + (size_t)k * N + n0;
    v16 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load(w + j * kV);
    for (int r = 0; r < RB; ++r) {
      const float xv = x[r * ldx + k];
      for (int j = 0; j < NV; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) store(y + r * ldy + n0 + j * kV, acc[r][j]);
}

template <int RB, int NV>
inline void gemm_rows(const float* x, size_t ldx, int K, const float* wt, const float* b, int N,
                      float* y, size_t ldy) {
  int n0 = 0;
  for (; n0 + NV * kV <= N; n0 += NV * kV) gemm_block<RB, NV>(x, ldx, K, wt, N, b, n0, y, ldy);
  for (; n0 + kV <= N; n0 += kV) gemm_block<RB, 1>(x, ldx, K, wt, N, b, n0, y, ldy);
  for (; n0 < N; ++n0)  // a ragged end (no shipped size has one)
    for (int r = 0; r < RB; ++r) {
      float acc = b ? b[n0] : 0.0f;
      for (int k = 0; k < K; ++k) acc += x[r * ldx + k] * wt[(size_t)k * N + n0];
      y[r * ldy + n0] = acc;
    }
}

// M rows: x (M, K) with row stride ldx -> y (M, N) with row stride ldy.
void linear_rows(const float* x, size_t ldx, int M, int K, const float* wt, const float* b,
                 int N, float* y, size_t ldy) {
  int m = 0;
  for (; m + 4 <= M; m += 4) gemm_rows<4, 4>(x + m * ldx, ldx, K, wt, b, N, y + m * ldy, ldy);
  for (; m < M; ++m) gemm_rows<1, 8>(x + m * ldx, ldx, K, wt, b, N, y + m * ldy, ldy);
}

// One row. Narrow outputs (N < 64: the cross-attention scores, the head) split k into four
// interleaved partial sums: one or two accumulators alone would wait on the FMA latency.
void linear(const float* x, int K, const float* wt, const float* b, int N, float* y) {
  if (N >= 64 || N % kV != 0 || K % 4 != 0) return gemm_rows<1, 8>(x, K, K, wt, b, N, y, N);
  for (int n0 = 0; n0 < N; n0 += kV) {
    v16 acc[4] = {v16{}, v16{}, v16{}, v16{}};
    for (int k = 0; k < K; k += 4)
      for (int u = 0; u < 4; ++u) acc[u] += x[k + u] * load(wt + (size_t)(k + u) * N + n0);
    v16 sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    store(y + n0, b ? sum + load(b + n0) : sum);
  }
}

// s[j] = q . (k_j + r_j) for keys j in [j0, j0 + count), count <= 16 * NV: kt (dh, ld) keys
// transposed, rt (dh, W) the relative embeddings already offset to the query's position. A
// partial block computes whole vectors (rows are padded by kPad floats) and stores `count`.
constexpr int kPad = 16;

template <int NV>
inline void scores_block(const float* __restrict q, int dh, const float* __restrict kt, int ld,
                         const float* __restrict rt, int W, int j0, int count, float* __restrict s) {
  v16 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = v16{};
  for (int e = 0; e < dh; ++e) {
    const float qe = q[e];
    const float* k = kt + (size_t)e * ld + j0;
    const float* r = rt + (size_t)e * W + j0;
    for (int j = 0; j < NV; ++j) acc[j] += qe * (load(k + j * kV) + load(r + j * kV));
  }
  float out[NV * kV];
  for (int j = 0; j < NV; ++j) store(out + j * kV, acc[j]);
  std::memcpy(s + j0, out, count * sizeof(float));
}

void scores(const float* q, int dh, const float* kt, int ld, const float* rt, int W, int j0,
            int j1, float* s) {
  for (; j1 - j0 > 64; j0 += 64) scores_block<4>(q, dh, kt, ld, rt, W, j0, 64, s);
  const int left = j1 - j0;  // the rest in one block: independent chains, not one after another
  if (left > 48)
    scores_block<4>(q, dh, kt, ld, rt, W, j0, left, s);
  else if (left > 32)
    scores_block<3>(q, dh, kt, ld, rt, W, j0, left, s);
  else if (left > 16)
    scores_block<2>(q, dh, kt, ld, rt, W, j0, left, s);
  else if (left > 0)
    scores_block<1>(q, dh, kt, ld, rt, W, j0, left, s);
}

// exp for a vector (Cephes' expf polynomial, about 1 ulp): libm's scalar expf through the PLT
// was a fifth of a decode step. exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2].
inline v16 exp16(v16 x) {
  const v16i tiny = x < -87.3f;  // exp underflows: 0, as expf gives (but for denormals)
  x = x < 88.3f ? x : v16{} + 88.3f;
  x = x > -87.3f ? x : v16{} - 87.3f;
  const v16 big = v16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const v16 n = (x * 1.44269504088896341f + big) - big;
  const v16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 y = p * (r * r) + r + 1.0f;
  const v16i scale = (__builtin_convertvector(n, v16i) + 127) << 23;
  return (v16)((v16i)(y * (v16)scale) & ~tiny);
}

// s[j] = exp(s[j] - max) over s[j0, j1) by whole vectors (s is padded past n); a partial last
// vector stores only its lanes inside the range (the rest may be the other range's keys).
float exp_sum(float* s, int j0, int j1, float mx) {
  v16 sum{};
  for (int j = j0; j < j1; j += kV) {
    v16 e = exp16(load(s + j) - mx);
    const int left = j1 - j;
    if (left < kV) {
      for (int i = left; i < kV; ++i) e[i] = 0.0f;
      float tmp[kV];
      store(tmp, e);
      std::memcpy(s + j, tmp, left * sizeof(float));
    } else {
      store(s + j, e);
    }
    sum += e;
  }
  return hsum(sum);
}

float max_of(const float* s, int j0, int j1, float mx) {
  for (int j = j0; j < j1; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// Softmax numerators in place over s[0:a1) and s[r0:n) (the allowed keys); returns 1 / sum.
// s must have room for a vector past n. Lanes are summed in a fixed order.
float softmax_ranges(float* s, int a1, int r0, int n) {
  v16 m = v16{} - INFINITY;
  int j = 0;
  for (; j + kV <= a1; j += kV) { v16 v = load(s + j); m = m > v ? m : v; }
  float mx = max_of(s, j, a1, -INFINITY);
  for (j = r0; j + kV <= n; j += kV) { v16 v = load(s + j); m = m > v ? m : v; }
  mx = max_of(s, j, n, mx);
  for (int i = 0; i < kV; ++i) mx = std::max(mx, m[i]);
  const float sum = exp_sum(s, 0, a1, mx);
  return 1.0f / (sum + exp_sum(s, r0, n, mx));
}

// y (DH) = sum_j p_j v_j over keys [0, a1) and [r0, n), v (n, DH); four partial sums so four
// FMA chains run at once (a fixed order: the same bits for every batch size).
template <int DH>
void values(const float* __restrict p, const float* __restrict v, int a1, int r0, int n,
            float* __restrict y) {
  constexpr int NV = DH / kV;
  v16 acc[4][NV];
  for (int u = 0; u < 4; ++u)
    for (int e = 0; e < NV; ++e) acc[u][e] = v16{};
  auto run = [&](int j, int j1) {
    for (; j + 4 <= j1; j += 4)
      for (int u = 0; u < 4; ++u)
        for (int e = 0; e < NV; ++e) acc[u][e] += p[j + u] * load(v + (size_t)(j + u) * DH + e * kV);
    for (; j < j1; ++j)
      for (int e = 0; e < NV; ++e) acc[0][e] += p[j] * load(v + (size_t)j * DH + e * kV);
  };
  run(0, a1);
  run(r0, n);
  for (int e = 0; e < NV; ++e) store(y + e * kV, (acc[0][e] + acc[1][e]) + (acc[2][e] + acc[3][e]));
}

void values_any(const float* p, const float* v, int dh, int a1, int r0, int n, float* y) {
  for (int e = 0; e < dh; ++e) y[e] = 0.0f;
  for (int j = 0; j < n; ++j)
    if (j < a1 || j >= r0)
      for (int e = 0; e < dh; ++e) y[e] += p[j] * v[(size_t)j * dh + e];
}

void layer_norm(const float* __restrict x, const float* __restrict w,
                const float* __restrict b, int D, float eps, float* __restrict y) {
  float mean, var;
  if (D % kV == 0) {  // lane-wise sums, then across lanes
    v16 s{}, q{};
    for (int i = 0; i < D; i += kV) s += load(x + i);
    mean = hsum(s) / D;
    for (int i = 0; i < D; i += kV) { v16 d = load(x + i) - mean; q += d * d; }
    var = hsum(q) / D;
  } else {
    mean = var = 0.0f;
    for (int i = 0; i < D; ++i) mean += x[i];
    mean /= D;
    for (int i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
    var /= D;
  }
  const float r = 1.0f / std::sqrt(var + eps);
  for (int i = 0; i < D; ++i) y[i] = (x[i] - mean) * r * w[i] + b[i];
}

// One layer's key/value cache for one batch row: keys transposed (H, dh, n) so that a query's
// scores are a product with contiguous key rows, values (H, n, dh).
struct Cache {
  float* kt;  // (H, dh, n + kPad)
  float* v;   // (H, n, dh)
};

struct Memory {  // cross-attention to the latents, folded: scores = x @ m + mb, out = att @ vp
  std::vector<float> m, mb, vp;  // (D, H*lz), (H*lz), (H*lz, D)
};

// Work space for up to M rows at once.
struct Work {
  std::vector<float> xn, qkv, y, o, f;
  explicit Work(const Cfg& c, int M)
      : xn((size_t)M * c.D), qkv((size_t)M * 3 * c.D), y((size_t)M * c.D), o((size_t)M * c.D),
        f((size_t)M * std::max(c.F, c.H * c.lz)) {}
};

class Decoder {
 public:
  Decoder(const float* const* w, const Cfg& c) : w_(w), c_(c) {}

  const float* lw(int layer, int i) const { return w_[N_TOP + layer * N_LAYER + i]; }

  // Rows h (M, D) at positions pos[r] of caches[r]: their keys and values into the caches,
  // their queries into q (M, D).
  void keys_values(int l, const float* h, int M, const Cache* caches, const int* pos, float* q,
                   Work& w) const {
    const int D = c_.D, dh = c_.dh, n = c_.n, ld = n + kPad;
    for (int r = 0; r < M; ++r)
      layer_norm(h + (size_t)r * D, lw(l, LN1_W), lw(l, LN1_B), D, c_.eps, w.xn.data() + (size_t)r * D);
    linear_rows(w.xn.data(), D, M, D, lw(l, QKV_WT), lw(l, QKV_B), 3 * D, w.qkv.data(), 3 * D);
    for (int r = 0; r < M; ++r) {
      const float* row = w.qkv.data() + (size_t)r * 3 * D;
      std::memcpy(q + (size_t)r * D, row, D * sizeof(float));
      const int p = pos[r];
      for (int h = 0; h < c_.H; ++h) {
        for (int e = 0; e < dh; ++e) caches[r].kt[(size_t)(h * dh + e) * ld + p] = row[D + h * dh + e];
        std::memcpy(caches[r].v + ((size_t)h * n + p) * dh, row + 2 * D + h * dh, dh * sizeof(float));
      }
    }
  }

  // h += self-attention for rows h (M, D) with queries q over keys [0, a1[r]) and [r0, n)
  // of caches[r].
  void attend_rows(int l, float* h, int M, const float* q, const Cache* caches, const int* pos,
                   const int* a1, int r0, Work& w) const {
    // rel_t rows are padded by kPad floats (engine/native.py) for scores()' partial blocks
    const int D = c_.D, dh = c_.dh, n = c_.n, ld = n + kPad, W = 2 * n - 1 + kPad;
    float s[1024 + kV] = {};  // room for a vector past n (read, not used)
    for (int r = 0; r < M; ++r) {
      const int p = pos[r];
      for (int g = 0; g < c_.H; ++g) {
        const float* qh = q + (size_t)r * D + g * dh;
        const float* kt = caches[r].kt + (size_t)g * dh * ld;
        const float* rt = lw(l, REL_T) + (size_t)g * dh * W + (n - 1 - p);  // distance j - p
        scores(qh, dh, kt, ld, rt, W, 0, a1[r], s);
        scores(qh, dh, kt, ld, rt, W, r0, n, s);
        const float inv = softmax_ranges(s, a1[r], r0, n);
        float* yh = w.y.data() + (size_t)r * D + g * dh;
        const float* v = caches[r].v + (size_t)g * n * dh;
        if (dh == 32)
          values<32>(s, v, a1[r], r0, n, yh);
        else
          values_any(s, v, dh, a1[r], r0, n, yh);
        for (int e = 0; e < dh; ++e) yh[e] *= inv;
      }
    }
    linear_rows(w.y.data(), D, M, D, lw(l, PROJ_WT), lw(l, PROJ_B), D, w.o.data(), D);
    add_rows(h, w.o.data(), M);
  }

  // h += cross-attention to mems[r], then h += feed-forward, for rows h (M, D).
  void cross_ff(int l, float* h, int M, const Memory* const* mems, Work& w) const {
    const int D = c_.D, HL = c_.H * c_.lz, lz = c_.lz;
    float sc[256 + kV];
    for (int r = 0; r < M; ++r) {  // each row may have its own latents
      float* xn = w.xn.data() + (size_t)r * D;
      layer_norm(h + (size_t)r * D, lw(l, LN2_W), lw(l, LN2_B), D, c_.eps, xn);
      linear(xn, D, mems[r]->m.data(), mems[r]->mb.data(), HL, sc);
      for (int g = 0; g < c_.H; ++g) {  // softmax over the lz latents of each head
        float mx = sc[g * lz];
        for (int i = 1; i < lz; ++i) mx = std::max(mx, sc[g * lz + i]);
        for (int i = 0; i < lz; ++i) sc[g * lz + i] -= mx;
      }
      for (int i = 0; i < HL; i += kV) {
        float tmp[kV];
        store(tmp, exp16(load(sc + i)));
        std::memcpy(sc + i, tmp, std::min(kV, HL - i) * sizeof(float));
      }
      for (int g = 0; g < c_.H; ++g) {
        float sum = 0.0f;
        for (int i = 0; i < lz; ++i) sum += sc[g * lz + i];
        for (int i = 0; i < lz; ++i) sc[g * lz + i] /= sum;
      }
      linear(sc, HL, mems[r]->vp.data(), lw(l, CP_B), D, w.o.data() + (size_t)r * D);
    }
    add_rows(h, w.o.data(), M);
    for (int r = 0; r < M; ++r)
      layer_norm(h + (size_t)r * D, lw(l, LN3_W), lw(l, LN3_B), D, c_.eps, w.xn.data() + (size_t)r * D);
    linear_rows(w.xn.data(), D, M, D, lw(l, FF1_WT), lw(l, FF1_B), c_.F, w.f.data(), c_.F);
    for (size_t i = 0; i < (size_t)M * c_.F; ++i) w.f[i] = std::max(w.f[i], 0.0f);
    linear_rows(w.f.data(), c_.F, M, c_.F, lw(l, FF2_WT), lw(l, FF2_B), D, w.o.data(), D);
    add_rows(h, w.o.data(), M);
  }

  void add_rows(float* h, const float* o, int M) const {
    for (size_t i = 0; i < (size_t)M * c_.D; ++i) h[i] += o[i];
  }

  // The folded cross-attention memory of one layer for latents zt (lz, dz).
  void memory(int layer, const float* zt, Memory& mem) const {
    const int D = c_.D, H = c_.H, dh = c_.dh, lz = c_.lz, HL = H * lz;
    mem.m.assign((size_t)D * HL, 0.0f);
    mem.mb.assign(HL, 0.0f);
    mem.vp.assign((size_t)HL * D, 0.0f);
    std::vector<float> kv(2 * D), col(D);
    const float* cq = lw(layer, CQ_W);    // (D out, D in), pre-scaled
    const float* cqb = lw(layer, CQ_B);
    const float* cpt = lw(layer, CP_WT);  // (D in, D out)
    for (int l = 0; l < lz; ++l) {
      linear(zt + (size_t)l * c_.dz, c_.dz, lw(layer, CKV_WT), lw(layer, CKV_B), 2 * D, kv.data());
      for (int h = 0; h < H; ++h) {
        const int hl = h * lz + l;
        std::fill(col.begin(), col.end(), 0.0f);
        float mb = 0.0f;
        float* vp = mem.vp.data() + (size_t)hl * D;
        for (int e = 0; e < dh; ++e) {
          const float k = kv[h * dh + e], v = kv[D + h * dh + e];
          const float* row = cq + (size_t)(h * dh + e) * D;
          for (int d = 0; d < D; ++d) col[d] += k * row[d];
          mb += k * cqb[h * dh + e];
          const float* prow = cpt + (size_t)(h * dh + e) * D;
          for (int o = 0; o < D; ++o) vp[o] += v * prow[o];
        }
        for (int d = 0; d < D; ++d) mem.m[(size_t)d * HL + hl] = col[d];
        mem.mb[hl] = mb;
      }
    }
  }

  void embed(int64_t token, int p, float* h) const {
    const float* e = w_[EMBED] + (size_t)token * c_.D;
    const float* ps = w_[POS] + (size_t)p * c_.D;
    for (int i = 0; i < c_.D; ++i) h[i] = e[i] + ps[i];
  }

  void logits(const float* h, float* out) const {
    float xn[1024];
    layer_norm(h, w_[LNF_W], w_[LNF_B], c_.D, c_.eps, xn);
    linear(xn, c_.D, w_[HEAD_WT], w_[HEAD_B], c_.n_out, out);
  }

 private:
  const float* const* w_;
  Cfg c_;
};

// argmax of logits / temperature + gumbel, restricted to the top_p nucleus (decoding.nucleus:
// sorted descending, drop a token when the probability mass before it already reaches top_p).
int64_t choose(const float* logits, int V, float temperature, const float* gumbel, float top_p) {
  if (gumbel == nullptr || !(temperature > 0.0f)) {
    int best = 0;
    for (int v = 1; v < V; ++v)
      if (logits[v] > logits[best]) best = v;
    return best;
  }
  float scaled[256];
  for (int v = 0; v < V; ++v) scaled[v] = logits[v] / temperature;
  if (top_p < 1.0f) {
    int idx[256];
    for (int v = 0; v < V; ++v) idx[v] = v;
    std::stable_sort(idx, idx + V, [&](int a, int b) { return scaled[a] > scaled[b]; });
    const float mx = scaled[idx[0]];
    float e[256], sum = 0.0f;
    for (int i = 0; i < V; ++i) sum += (e[i] = std::exp(scaled[idx[i]] - mx));
    float cum = 0.0f;
    bool drop[256];
    for (int i = 0; i < V; ++i) {
      const float p = e[i] / sum;
      cum += p;
      drop[i] = (cum - p) >= top_p;
    }
    for (int i = 0; i < V; ++i)
      if (drop[i]) scaled[idx[i]] = -INFINITY;
  }
  int best = 0;
  float bv = scaled[0] + gumbel[0];
  for (int v = 1; v < V; ++v) {
    const float s = scaled[v] + gumbel[v];
    if (s > bv) bv = s, best = v;
  }
  return best;
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

extern "C" {

int clsm_native_version() { return 1; }

// The whole decode of one target (engine/fast.py FastDecoder.forward, same contract):
// x (Bx, n-1) tokens with Bx 1 (shared by every z) or B; z (B, dz); the target is decoder
// positions start+1 .. start+length. gumbel (B, length, n_out) or null for argmax.
// Writes tokens (B, length) and the logits each token was chosen from (B, length, n_out).
int clsm_decode(const float* const* w, const int* ci, float eps, const int64_t* x, int Bx,
                const float* z, int B, int start, int length, float temperature,
                const float* gumbel, float top_p, int64_t* out_tokens, float* out_logits) {
  Cfg c{ci[0], ci[1], ci[0] / ci[1], ci[2], ci[3], ci[4], ci[5], ci[6], ci[7], ci[8], eps};
  const int D = c.D, n = c.n, L = c.L;
  if (D > 1024 || c.F > 4096 || n > 1024 || c.n_out > 256 || c.H * c.lz > 256) return 1;
  if (start < 0 || length < 1 || start + 1 + length > n || (Bx != 1 && Bx != B)) return 2;
  Decoder dec(w, c);
  const int split = start + 1, tend = split + length;  // target positions [split, tend)
  std::vector<int> pos;  // the context rows: [0, split) and [tend, n)
  for (int p = 0; p < split; ++p) pos.push_back(p);
  for (int p = tend; p < n; ++p) pos.push_back(p);
  const int nc = (int)pos.size();
  const size_t cache_size = (size_t)c.H * c.dh * (n + kPad);  // keys; values need less
  std::vector<float> kt((size_t)L * B * cache_size), vv((size_t)L * B * cache_size);
  auto cache = [&](int l, int b) {
    return Cache{kt.data() + ((size_t)l * B + b) * cache_size,
                 vv.data() + ((size_t)l * B + b) * cache_size};
  };
  std::vector<Memory> mems((size_t)L * B);
  std::vector<float> zt((size_t)c.lz * c.dz);
  for (int b = 0; b < B; ++b) {
    linear(z + (size_t)b * c.dz, c.dz, w[LAT_WT], w[LAT_B], c.lz * c.dz, zt.data());
    for (int l = 0; l < L; ++l) dec.memory(l, zt.data(), mems[(size_t)l * B + b]);
  }
  Work work(c, std::max(nc, B));
  // Context pass: every context row through every layer, except that the last layer only
  // needs the row at decoder position `start` (it predicts the first target token).
  std::vector<float> hs((size_t)B * nc * D), qs((size_t)nc * D);
  std::vector<Cache> row_cache(std::max(nc, B));
  std::vector<const Memory*> row_mem(std::max(nc, B));
  std::vector<int> row_a1(std::max(nc, B), split), row_pos(B);
  const bool shared = Bx == 1 && B > 1;  // the first layer's self-attention is the same for all
  for (int b = 0; b < B; ++b) {
    const int64_t* xb = x + (size_t)(Bx == 1 ? 0 : b) * (n - 1);
    for (int r = 0; r < nc; ++r)
      dec.embed(pos[r] == 0 ? c.start_token : xb[pos[r] - 1], pos[r], hs.data() + ((size_t)b * nc + r) * D);
  }
  for (int l = 0; l < L; ++l) {
    const bool last = l == L - 1;
    const int r_first = last ? split - 1 : 0, r_count = last ? 1 : nc;
    for (int b = 0; b < (shared && l == 0 ? 1 : B); ++b) {
      float* hb = hs.data() + (size_t)b * nc * D;
      std::fill(row_cache.begin(), row_cache.end(), cache(l, b));
      dec.keys_values(l, hb, nc, row_cache.data(), pos.data(), qs.data(), work);
      dec.attend_rows(l, hb + (size_t)r_first * D, r_count, qs.data() + (size_t)r_first * D,
                      row_cache.data(), pos.data() + r_first, row_a1.data(), tend, work);
    }
    if (shared && l == 0)  // the other rows' keys, values and self-attention are row 0's
      for (int b = 1; b < B; ++b) {
        std::memcpy(cache(0, b).kt, cache(0, 0).kt, cache_size * sizeof(float));
        std::memcpy(cache(0, b).v, cache(0, 0).v, cache_size * sizeof(float));
        std::memcpy(hs.data() + ((size_t)b * nc + r_first) * D, hs.data() + (size_t)r_first * D,
                    (size_t)r_count * D * sizeof(float));
      }
    for (int b = 0; b < B; ++b) {
      std::fill(row_mem.begin(), row_mem.end(), &mems[(size_t)l * B + b]);
      dec.cross_ff(l, hs.data() + ((size_t)b * nc + r_first) * D, r_count, row_mem.data(), work);
    }
  }
  // Decode loop: one position at a time, the batch rows together, keys and values cached.
  std::vector<float> h((size_t)B * D), q((size_t)B * D);
  for (int b = 0; b < B; ++b)
    std::memcpy(h.data() + (size_t)b * D, hs.data() + ((size_t)b * nc + split - 1) * D, D * sizeof(float));
  for (int k = 0; k < length; ++k) {
    for (int b = 0; b < B; ++b) {
      float* lg = out_logits + ((size_t)b * length + k) * c.n_out;
      dec.logits(h.data() + (size_t)b * D, lg);
      const float* g = gumbel ? gumbel + ((size_t)b * length + k) * c.n_out : nullptr;
      out_tokens[(size_t)b * length + k] = choose(lg, c.n_out, temperature, g, top_p);
    }
    if (k == length - 1) break;
    const int p = split + k;
    for (int b = 0; b < B; ++b) {
      dec.embed(out_tokens[(size_t)b * length + k], p, h.data() + (size_t)b * D);
      row_pos[b] = p;
      row_a1[b] = p + 1;
    }
    for (int l = 0; l < L; ++l) {
      for (int b = 0; b < B; ++b) {
        row_cache[b] = cache(l, b);
        row_mem[b] = &mems[(size_t)l * B + b];
      }
      dec.keys_values(l, h.data(), B, row_cache.data(), row_pos.data(), q.data(), work);
      dec.attend_rows(l, h.data(), B, q.data(), row_cache.data(), row_pos.data(), row_a1.data(),
                      tend, work);
      dec.cross_ff(l, h.data(), B, row_mem.data(), work);
    }
  }
  return 0;
}

// One bidirectional LSTM layer's recurrence (PyTorch gate order i, f, g, o), batch 1:
// gx (T, 8H) holds the input projections of every step plus both biases, forward direction's
// 4H first; whh_f / whh_b (H, 4H) are the recurrent weights transposed. Writes the outputs
// (T, 2H) if out is not null, and the final states [forward's last; backward's first] (2H).
// Both directions run in one loop: two independent chains keep the core busy.
int clsm_lstm_layer(const float* gx, const float* whh_f, const float* whh_b, int T, int H,
                    float* out, float* hn) {
  if (H > 1024) return 1;
  std::vector<float> hf(H, 0.0f), cf(H, 0.0f), hb(H, 0.0f), cb(H, 0.0f), gf(4 * H), gb(4 * H);
  for (int t = 0; t < T; ++t) {
    const int tb = T - 1 - t;
    linear(hf.data(), H, whh_f, gx + (size_t)t * 8 * H, 4 * H, gf.data());
    linear(hb.data(), H, whh_b, gx + (size_t)tb * 8 * H + 4 * H, 4 * H, gb.data());
    for (int i = 0; i < H; ++i) {
      cf[i] = sigmoid(gf[H + i]) * cf[i] + sigmoid(gf[i]) * std::tanh(gf[2 * H + i]);
      hf[i] = sigmoid(gf[3 * H + i]) * std::tanh(cf[i]);
      cb[i] = sigmoid(gb[H + i]) * cb[i] + sigmoid(gb[i]) * std::tanh(gb[2 * H + i]);
      hb[i] = sigmoid(gb[3 * H + i]) * std::tanh(cb[i]);
    }
    if (out) {
      std::memcpy(out + (size_t)t * 2 * H, hf.data(), H * sizeof(float));
      std::memcpy(out + (size_t)tb * 2 * H + H, hb.data(), H * sizeof(float));
    }
  }
  std::memcpy(hn, hf.data(), H * sizeof(float));
  std::memcpy(hn + H, hb.data(), H * sizeof(float));
  return 0;
}

}  // extern "C"
