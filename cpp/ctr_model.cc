#include "ctr_model.h"

#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace servefleet::direct {
namespace {

constexpr char kMagic[8] = {'S', 'F', 'C', 'T', 'R', 'F', 'M', '1'};
constexpr size_t kHeaderBytes = 32;
constexpr uint32_t kMaxFields = 4096;
constexpr uint32_t kMaxDim = 1024;

template <typename T>
T ReadAt(const char* header, size_t offset) {
  T value;
  std::memcpy(&value, header + offset, sizeof(T));
  return value;
}

}  // namespace

std::shared_ptr<const CtrModel> CtrModel::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::invalid_argument("cannot open model file " + path);
  const auto size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  char header[kHeaderBytes];
  if (size < kHeaderBytes || !in.read(header, kHeaderBytes))
    throw std::invalid_argument(path + ": too short for a CTR model header");
  if (std::memcmp(header, kMagic, sizeof(kMagic)) != 0)
    throw std::invalid_argument(path + ": not a servefleet CTR model (bad magic)");

  std::shared_ptr<CtrModel> model(new CtrModel());
  model->num_fields_ = ReadAt<uint32_t>(header, 8);
  model->dim_ = ReadAt<uint32_t>(header, 12);
  model->num_rows_ = ReadAt<uint64_t>(header, 16);
  model->bias_ = ReadAt<float>(header, 24);
  if (model->num_fields_ == 0 || model->num_fields_ > kMaxFields)
    throw std::invalid_argument(path + ": num_fields out of range");
  if (model->dim_ == 0 || model->dim_ > kMaxDim) throw std::invalid_argument(path + ": dim out of range");
  if (model->num_rows_ == 0 || model->num_rows_ > (uint64_t{1} << 40))
    throw std::invalid_argument(path + ": num_rows out of range");
  const uint64_t expected = kHeaderBytes + 4 * model->num_rows_ * (1 + uint64_t{model->dim_});
  if (size != expected)
    throw std::invalid_argument(path + ": " + std::to_string(size) + " bytes, header says " +
                                std::to_string(expected));

  model->linear_.resize(model->num_rows_);
  model->factors_.resize(model->num_rows_ * model->dim_);
  in.read(reinterpret_cast<char*>(model->linear_.data()),
          static_cast<std::streamsize>(model->linear_.size() * sizeof(float)));
  in.read(reinterpret_cast<char*>(model->factors_.data()),
          static_cast<std::streamsize>(model->factors_.size() * sizeof(float)));
  if (!in) throw std::invalid_argument(path + ": truncated while reading tables");
  return model;
}

void CtrModel::Score(const int64_t* ids, size_t batch, float* out) const {
  std::array<float, kMaxDim> sums;  // on the stack: scoring allocates nothing
  for (size_t b = 0; b < batch; ++b) {
    const int64_t* row = ids + b * num_fields_;
    float logit = bias_;
    float squares = 0.0f;
    std::fill(sums.begin(), sums.begin() + dim_, 0.0f);
    for (uint32_t f = 0; f < num_fields_; ++f) {
      const auto id = static_cast<uint64_t>(row[f]);
      logit += linear_[id];
      const float* v = factors_.data() + id * dim_;
      for (uint32_t k = 0; k < dim_; ++k) {
        sums[k] += v[k];
        squares += v[k] * v[k];
      }
    }
    float pairs = 0.0f;
    for (uint32_t k = 0; k < dim_; ++k) pairs += sums[k] * sums[k];
    logit += 0.5f * (pairs - squares);
    out[b] = 1.0f / (1.0f + std::exp(-logit));
  }
}

}  // namespace servefleet::direct
