// The prior's Bi-LSTM recurrence in plain C++ (issue 12): oneDNN's LSTM cell spent ~0.6 ms per
// layer and direction on 64 steps of a 128-unit layer, mostly per-step overhead; the input
// projections of all steps are one matrix product in PyTorch (engine/native.py), the
// recurrence runs here with both directions interleaved (two independent chains).
// float32, PyTorch's gate order (i, f, g, o); tests/test_native.py compares with torch.nn.LSTM.

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

using namespace clsm;

inline v16 sigmoid16(v16 x) { return 1.0f / (1.0f + exp16(-x)); }
// tanh(x) = 2 sigmoid(2x) - 1: absolute error ~1e-7, the size of float rounding at |tanh| ~ 1
inline v16 tanh16(v16 x) { return 2.0f / (1.0f + exp16(-2.0f * x)) - 1.0f; }

// One direction's step: gates g (4H) = gx + h @ whh; then c, h in place.
void cell(const float* gx, const float* whh, int H, float* h, float* c, float* g) {
  linear(h, H, whh, gx, 4 * H, g);
  for (int i = 0; i < H; i += kV) {
    const v16 gi = sigmoid16(load(g + i)), gf = sigmoid16(load(g + H + i));
    const v16 gg = tanh16(load(g + 2 * H + i)), go = sigmoid16(load(g + 3 * H + i));
    const v16 cn = gf * load(c + i) + gi * gg;
    store(c + i, cn);
    store(h + i, go * tanh16(cn));
  }
}

}  // namespace

extern "C" {

// One bidirectional LSTM layer, batch 1: gx (T, 8H) holds the input projections of every step
// plus both biases, the forward direction's 4H first; whh_f / whh_b (H, 4H) are the recurrent
// weights transposed. Writes the outputs (T, 2H) if out is not null, and the final states
// [forward's last; backward's first] (2H). H must be a multiple of 16.
int clsm_lstm_layer(const float* gx, const float* whh_f, const float* whh_b, int T, int H,
                    float* out, float* hn) {
  if (H % kV != 0 || H > 4096 || T < 1) return 1;
  std::vector<float> hf(H, 0.0f), cf(H, 0.0f), hb(H, 0.0f), cb(H, 0.0f), gf(4 * H), gb(4 * H);
  for (int t = 0; t < T; ++t) {
    const int tb = T - 1 - t;
    cell(gx + (size_t)t * 8 * H, whh_f, H, hf.data(), cf.data(), gf.data());
    cell(gx + (size_t)tb * 8 * H + 4 * H, whh_b, H, hb.data(), cb.data(), gb.data());
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
