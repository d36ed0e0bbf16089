// Factorization-machine click-through-rate model over sparse feature ids.
//
// The file is written by servefleet/direct/ctr.py (export_model); both sides agree on this layout,
// all little-endian:
//   char[8]  magic "SFCTRFM1"
//   uint32   num_fields   (feature ids per example, one per field)
//   uint32   dim          (factor dimension)
//   uint64   num_rows     (rows of the shared embedding tables)
//   float32  bias
//   uint32   reserved (0)
//   float32  linear[num_rows]
//   float32  factors[num_rows][dim]
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace servefleet::direct {

// numpy's float32 sum of n contiguous values, bit for bit: its pairwise summation (blocks of up
// to 128 summed with 8 accumulators, larger runs split in two at a multiple of 8).
float PairwiseSum(const float* a, size_t n);
// numpy's float32 exp, bit for bit on x86-64 with AVX2+FMA3 or AVX512F (numpy's own SIMD kernel,
// which its CPU dispatch picks there): Cody-Waite reduction, a (5, 2) rational approximation,
// scaled by 2^k. Where numpy dispatches otherwise (libm expf), Python's check of the merge at
// table adoption finds the difference and keeps its own path.
float NumpyExpf(float x);

// Factorization-machine click probabilities of `batch` examples of `fields` rows each, in the
// order and float32 arithmetic of servefleet/direct/ctr.py (pooled_logits, sigmoid), so C++ and
// the numpy reference agree exactly. row(b, f) -> (linear weight, pointer to `dim` factors).
template <typename RowOf>
void FmScores(float bias, size_t batch, uint32_t fields, uint32_t dim, RowOf row, float* out) {
  thread_local std::vector<float> linear, squares, sums, sums_squared;
  linear.resize(fields);
  squares.resize(size_t{fields} * dim);
  sums.resize(dim);
  sums_squared.resize(dim);
  for (size_t b = 0; b < batch; ++b) {
    std::fill(sums.begin(), sums.end(), 0.0f);
    for (uint32_t f = 0; f < fields; ++f) {
      const auto [weight, v] = row(b, f);
      linear[f] = weight;
      float* sq = squares.data() + size_t{f} * dim;
      for (uint32_t k = 0; k < dim; ++k) {
        sums[k] += v[k];  // vectors.sum(axis=1): field by field
        sq[k] = v[k] * v[k];
      }
    }
    for (uint32_t k = 0; k < dim; ++k) sums_squared[k] = sums[k] * sums[k];
    // A reduction starts from 0 (numpy's identity for add), then adds the pairwise sum.
    const float linear_sum = 0.0f + PairwiseSum(linear.data(), fields);
    const float pairs = 0.5f * ((0.0f + PairwiseSum(sums_squared.data(), dim)) -
                                (0.0f + PairwiseSum(squares.data(), squares.size())));
    const float logit = (bias + linear_sum) + pairs;
    out[b] = 1.0f / (1.0f + NumpyExpf(-logit));
  }
}

class CtrModel {
 public:
  // Reads and checks a model file; throws std::invalid_argument naming what is wrong.
  static std::shared_ptr<const CtrModel> Load(const std::string& path);

  uint32_t num_fields() const { return num_fields_; }
  uint32_t dim() const { return dim_; }
  uint64_t num_rows() const { return num_rows_; }

  // Scores `batch` examples of num_fields() ids each. Every id must already be checked to lie in
  // [0, num_rows()): this is the hot path and does no validation.
  void Score(const int64_t* ids, size_t batch, float* out) const;

 private:
  CtrModel() = default;

  uint32_t num_fields_ = 0;
  uint32_t dim_ = 0;
  uint64_t num_rows_ = 0;
  float bias_ = 0.0f;
  std::vector<float> linear_;
  std::vector<float> factors_;
};

}  // namespace servefleet::direct
