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

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace servefleet::direct {

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
