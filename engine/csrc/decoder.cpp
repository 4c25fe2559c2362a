// The CLSM decoder's whole decode in plain C++ (issue 12); kernels.h holds the vector kernels.
//
// Why: on one CPU thread a decode step of the shipped model is ~0.3 MFLOP, a few microseconds
// of arithmetic, but ~80 operator calls through PyTorch cost ~110 us. Here a step is a handful
// of loops over weights that stay in L1/L2. No PyTorch headers: the files compile in a few
// seconds with the system compiler and are called through ctypes (engine/native.py), which also
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

#include "kernels.h"

namespace {

using namespace clsm;

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
  // The caches and context rows live in a buffer kept by the thread between calls: fresh
  // megabytes each call cost page faults and zeroing, 1-2 ms of a batch-8 decode. Nothing is
  // read before this call writes it (the attention reads only written key ranges).
  thread_local std::vector<float> arena;
  const size_t cache_total = (size_t)L * B * cache_size;
  const size_t need = 2 * cache_total + (size_t)B * nc * D + (size_t)nc * D;
  if (arena.size() < need) arena.resize(need);
  float* kt = arena.data();
  float* vv = kt + cache_total;
  auto cache = [&](int l, int b) {
    return Cache{kt + ((size_t)l * B + b) * cache_size, vv + ((size_t)l * B + b) * cache_size};
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
  float* const hs_data = vv + cache_total;  // (B, nc, D) context rows
  float* const qs_data = hs_data + (size_t)B * nc * D;  // (nc, D) their queries
  std::vector<Cache> row_cache(std::max(nc, B));
  std::vector<const Memory*> row_mem(std::max(nc, B));
  std::vector<int> row_a1(std::max(nc, B), split), row_pos(B);
  const bool shared = Bx == 1 && B > 1;  // the first layer's self-attention is the same for all
  for (int b = 0; b < B; ++b) {
    const int64_t* xb = x + (size_t)(Bx == 1 ? 0 : b) * (n - 1);
    for (int r = 0; r < nc; ++r)
      dec.embed(pos[r] == 0 ? c.start_token : xb[pos[r] - 1], pos[r], hs_data + ((size_t)b * nc + r) * D);
  }
  for (int l = 0; l < L; ++l) {
    const bool last = l == L - 1;
    const int r_first = last ? split - 1 : 0, r_count = last ? 1 : nc;
    for (int b = 0; b < (shared && l == 0 ? 1 : B); ++b) {
      float* hb = hs_data + (size_t)b * nc * D;
      std::fill(row_cache.begin(), row_cache.end(), cache(l, b));
      dec.keys_values(l, hb, nc, row_cache.data(), pos.data(), qs_data, work);
      dec.attend_rows(l, hb + (size_t)r_first * D, r_count, qs_data + (size_t)r_first * D,
                      row_cache.data(), pos.data() + r_first, row_a1.data(), tend, work);
    }
    if (shared && l == 0)  // the other rows' keys, values and self-attention are row 0's
      for (int b = 1; b < B; ++b) {
        std::memcpy(cache(0, b).kt, cache(0, 0).kt, cache_size * sizeof(float));
        std::memcpy(cache(0, b).v, cache(0, 0).v, cache_size * sizeof(float));
        std::memcpy(hs_data + ((size_t)b * nc + r_first) * D, hs_data + (size_t)r_first * D,
                    (size_t)r_count * D * sizeof(float));
      }
    for (int b = 0; b < B; ++b) {
      std::fill(row_mem.begin(), row_mem.end(), &mems[(size_t)l * B + b]);
      dec.cross_ff(l, hs_data + ((size_t)b * nc + r_first) * D, r_count, row_mem.data(), work);
    }
  }
  // Decode loop: one position at a time, the batch rows together (each weight read once per
  // step for four rows), keys and values cached. Measured: decoding the rows in chunks of 1, 2
  // or 4 to keep their caches in L2 was no faster.
  std::vector<float> h((size_t)B * D), q((size_t)B * D);
  for (int b = 0; b < B; ++b)
    std::memcpy(h.data() + (size_t)b * D, hs_data + ((size_t)b * nc + split - 1) * D, D * sizeof(float));
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

}  // extern "C"
