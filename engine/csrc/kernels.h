// Vector kernels shared by the native decoder (decoder.cpp) and LSTM (lstm.cpp): products
// written so the compiler keeps accumulators in registers and never reorders a sum, a vector
// exp, softmax over key ranges, layer norm. See decoder.cpp for why this code exists.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace clsm {

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
inline void linear_rows(const float* x, size_t ldx, int M, int K, const float* wt, const float* b,
                 int N, float* y, size_t ldy) {
  int m = 0;
  for (; m + 4 <= M; m += 4) gemm_rows<4, 4>(x + m * ldx, ldx, K, wt, b, N, y + m * ldy, ldy);
  for (; m < M; ++m) gemm_rows<1, 8>(x + m * ldx, ldx, K, wt, b, N, y + m * ldy, ldy);
}

// One row. Narrow outputs (N < 64: the cross-attention scores, the head) split k into four
// interleaved partial sums: one or two accumulators alone would wait on the FMA latency.
inline void linear(const float* x, int K, const float* wt, const float* b, int N, float* y) {
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

inline void scores(const float* q, int dh, const float* kt, int ld, const float* rt, int W, int j0,
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
inline float exp_sum(float* s, int j0, int j1, float mx) {
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

inline float max_of(const float* s, int j0, int j1, float mx) {
  for (int j = j0; j < j1; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// Softmax numerators in place over s[0:a1) and s[r0:n) (the allowed keys); returns 1 / sum.
// s must have room for a vector past n. Lanes are summed in a fixed order.
inline float softmax_ranges(float* s, int a1, int r0, int n) {
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
inline void values(const float* __restrict p, const float* __restrict v, int a1, int r0, int n,
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

inline void values_any(const float* p, const float* v, int dh, int a1, int r0, int n, float* y) {
  for (int e = 0; e < dh; ++e) y[e] = 0.0f;
  for (int j = 0; j < n; ++j)
    if (j < a1 || j >= r0)
      for (int e = 0; e < dh; ++e) y[e] += p[j] * v[(size_t)j * dh + e];
}

inline void layer_norm(const float* __restrict x, const float* __restrict w,
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

}  // namespace clsm
