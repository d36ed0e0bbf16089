#include "shard_server.h"

#include <cstring>

namespace servefleet::direct {
namespace {

class LookupCall final : public RelayCall {
 public:
  LookupCall(ShardServer* server, grpc::GenericCallbackServerContext* ctx) : RelayCall(server, ctx), shard_(server) {
    Begin();
  }

 private:
  void OnRequest() override {
    std::string raw;
    if (!shard_->enabled() || NeedsSpan(*ctx_, shard_->sample_below) || !Flatten(in_, &raw) || raw.size() % 8) {
      Relay(true);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    const auto in_flight = shard_->stats.in_flight.fetch_add(1, std::memory_order_relaxed);
    if (in_flight >= static_cast<uint64_t>(shard_->capacity)) {
      shard_->stats.Answered(grpc::StatusCode::RESOURCE_EXHAUSTED, start);
      Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "shard " + shard_->name + ": " + std::to_string(in_flight) + " lookups in flight (capacity)"));
      return;
    }
    const size_t count = raw.size() / 8;
    std::vector<int64_t> keys(count);
    std::memcpy(keys.data(), raw.data(), raw.size());
    grpc::Slice rows(count * (1 + size_t{shard_->part.dim}) * sizeof(float));
    if (!shard_->Gather(keys.data(), count, reinterpret_cast<float*>(const_cast<uint8_t*>(rows.begin())))) {
      shard_->stats.in_flight.fetch_sub(1, std::memory_order_relaxed);
      Relay(true);  // a key not held here: Python words the error
      return;
    }
    out_ = grpc::ByteBuffer(&rows, 1);
    shard_->stats.Answered(grpc::StatusCode::OK, start);
    StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
  }

  ShardServer* shard_;
};

}  // namespace

int64_t PartView::Local(int64_t key) const {
  if (!keys) {
    const int64_t local = key - lo;
    return local >= 0 && local < rows ? local : -1;
  }
  const int64_t* at = std::lower_bound(keys, keys + rows, key);
  return at != keys + rows && *at == key ? at - keys : -1;
}

ShardServer::ShardServer(const std::vector<double>& latency_bounds_s, const std::string& method,
                         const std::string& name_, int capacity_, const PartView& part_, double sample_ratio)
    : RelayServer(latency_bounds_s, method),
      name(name_),
      capacity(capacity_),
      part(part_),
      sample_below(SampleBelow(sample_ratio)) {}

bool ShardServer::Gather(const int64_t* keys, size_t count, float* out) const {
  const size_t width = 1 + size_t{part.dim};
  for (size_t i = 0; i < count; ++i) {
    const int64_t local = part.Local(keys[i]);
    if (local < 0) return false;
    float* row = out + i * width;
    row[0] = part.linear[local];
    std::memcpy(row + 1, part.factors + static_cast<size_t>(local) * part.dim, part.dim * sizeof(float));
  }
  return true;
}

grpc::ServerGenericBidiReactor* ShardServer::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new LookupCall(this, ctx);
}

}  // namespace servefleet::direct
