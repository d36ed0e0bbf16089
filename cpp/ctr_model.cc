#include "ctr_model.h"

#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <utility>
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
  const uint32_t fields = num_fields_, dim = dim_;
  FmScores(bias_, batch, fields, dim,
           [&](size_t b, uint32_t f) {
             const auto id = static_cast<uint64_t>(ids[b * fields + f]);
             return std::pair<float, const float*>(linear_[id], factors_.data() + id * dim);
           },
           out);
}

float PairwiseSum(const float* a, size_t n) {
  if (n < 8) {
    float res = -0.0f;
    for (size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return PairwiseSum(a, n2) + PairwiseSum(a + n2, n - n2);
}

float NumpyExpf(float x) {
  // numpy/_core/src/umath/loops_exponent_log.dispatch.c.src, simd_exp_FLOAT, one lane.
  constexpr float kMax = 88.72283935546875f, kMin = -103.97208404541015625f;
  constexpr float kLog2e = 1.442695040888963407359924681001892137f;
  constexpr float kMagic = 0x1.800000p+23f;
  constexpr float kC1 = -6.93145752e-1f, kC2 = -1.42860677e-6f;
  constexpr float kP0 = 9.999999999980870924916e-01f, kP1 = 7.257664613233124478488e-01f,
                  kP2 = 2.473615434895520810817e-01f, kP3 = 5.114512081637298353406e-02f,
                  kP4 = 6.757896990527504603057e-03f, kP5 = 5.082762527590693718096e-04f;
  constexpr float kQ0 = 1.000000000000000000000e+00f, kQ1 = -2.742335390411667452936e-01f,
                  kQ2 = 2.159509375685829852307e-02f;
  if (std::isnan(x)) return std::numeric_limits<float>::quiet_NaN();
  if (x >= kMax) return std::numeric_limits<float>::infinity();
  if (x <= kMin) return 0.0f;
  const float scaled = x * kLog2e;
  volatile float shifted = scaled + kMagic;  // round to nearest, as the kernel does
  const float k = shifted - kMagic;
  float y = std::fma(k, kC1, x);
  y = std::fma(k, kC2, y);
  y = std::fma(k, 0.0f, y);
  float num = std::fma(kP5, y, kP4);
  num = std::fma(num, y, kP3);
  num = std::fma(num, y, kP2);
  num = std::fma(num, y, kP1);
  num = std::fma(num, y, kP0);
  float den = std::fma(kQ2, y, kQ1);
  den = std::fma(den, y, kQ0);
  return std::ldexp(num / den, static_cast<int>(k));
}

}  // namespace servefleet::direct
