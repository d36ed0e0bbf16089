// The proxy actor's ModelInfer forwarder: a gRPC generic (raw bytes) server on the proxy's port.
// A ModelInfer for the served model, valid per the spec and needing no span, goes as received to a
// replica picked from the table Python pushes (power of two choices on in-flight counts over
// non-full replicas), on gRPC's threads without the GIL; the caller's deadline and cancellation
// propagate, its metadata (traceparent) is copied unchanged, UNAVAILABLE / RESOURCE_EXHAUSTED go
// to another replica. Everything else (other methods, streams, other models, invalid or traced
// requests, no replica left) is relayed to the Python server (relay.h), which answers as it
// always has.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "relay.h"

namespace servefleet::direct {

struct ForwardReplica {
  std::string name;
  std::string method;  // the replica's raw-bytes Infer method
  int capacity = 0;
  std::unique_ptr<grpc::GenericStub> stub;
  std::atomic<int> in_flight{0};
};

struct ForwardTable {
  std::string model;
  std::string version;
  std::vector<InputSpec> inputs;  // empty: the spec declares none, nothing to check
  std::vector<std::shared_ptr<ForwardReplica>> replicas;
  uint64_t sample_below = 0;  // see SampleBelow
};

class Forwarder final : public RelayServer {
 public:
  Forwarder(const std::vector<double>& latency_bounds_s, int attempts);
  ~Forwarder() override;

  // rows: (name, address, infer method, capacity); inputs: (name, datatype, shape, itemsize).
  void SetTable(const std::string& model, const std::string& version,
                const std::vector<std::tuple<std::string, std::string, std::string, int>>& rows,
                const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, int>>& inputs,
                double sample_ratio);

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

  std::shared_ptr<const ForwardTable> table() const;
  int in_flight_on(const std::string& name) const;

  const int attempts;

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const ForwardTable> table_;
};

}  // namespace servefleet::direct
