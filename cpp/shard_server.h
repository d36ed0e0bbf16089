// The C++ fast path of a shard replica (servefleet/services/shard.py): a generic gRPC server on the
// shard's public port, in front of its Python server (relay.h).
//
// A lookup (the shard's raw method: little-endian int64 keys in, float32 [k, 1 + dim] rows out)
// whose every key this replica holds, and that needs no span, is answered here without the GIL:
// one gather from the rows Python memory-mapped (services/sharding.py ShardPart; this server reads
// the same arrays, so the part stays resident once). Everything else goes to Python, which words
// every error: a length that is not a multiple of 8, a key this shard does not hold, traced
// lookups, and every lookup while the fast path is off (a fault delay injected). Over capacity it
// answers RESOURCE_EXHAUSTED as Python does.
#pragma once

#include "relay.h"

namespace servefleet::direct {

// The rows of one shard part, as views of arrays Python keeps alive for the server's life.
struct PartView {
  const float* linear = nullptr;   // [rows]
  const float* factors = nullptr;  // [rows, dim]
  const int64_t* keys = nullptr;   // hash: the sorted global keys held; range: null
  int64_t lo = 0, rows = 0;        // range: global key lo is row 0
  uint32_t dim = 0;

  // Row of a global key in this part; -1 when the key is not held here.
  int64_t Local(int64_t key) const;
};

class ShardServer final : public RelayServer {
 public:
  ShardServer(const std::vector<double>& latency_bounds_s, const std::string& method, const std::string& name,
              int capacity, const PartView& part, double sample_ratio);

  // Off: every lookup goes to Python (its fault injection, or a drain that Python runs).
  void SetEnabled(bool on) { enabled_.store(on); }
  bool enabled() const { return enabled_.load(); }
  // Rows of `count` keys into out[count * (1 + dim)]; false when a key is not held here.
  bool Gather(const int64_t* keys, size_t count, float* out) const;

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

  const std::string name;
  const int capacity;
  const PartView part;
  const uint64_t sample_below;

 private:
  std::atomic<bool> enabled_{true};
};

}  // namespace servefleet::direct
