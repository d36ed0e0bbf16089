// The proxy actor's ModelInfer forwarder: a gRPC generic (raw bytes) server on the proxy's port.
// A ModelInfer for the served model, valid per the spec and needing no span, goes as received to a
// replica picked from the table Python pushes (power of two choices on in-flight counts over
// non-full replicas), on gRPC's threads without the GIL; the caller's deadline and cancellation
// propagate, its metadata (traceparent) is copied unchanged, UNAVAILABLE / RESOURCE_EXHAUSTED go
// to another replica. Everything else (other methods, streams, other models, invalid or traced
// requests, no replica left) is relayed to the Python server, which answers as it always has.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace servefleet::direct {

struct ForwardReplica {
  std::string name;
  std::string method;  // the replica's raw-bytes Infer method
  int capacity = 0;
  std::unique_ptr<grpc::GenericStub> stub;
  std::atomic<int> in_flight{0};
};

struct ForwardInput {
  std::string name;
  std::string datatype;
  std::vector<int64_t> shape;  // -1: any size
  int itemsize = 0;            // 0: BYTES (size not checked)
};

struct ForwardTable {
  std::string model;
  std::string version;
  std::vector<ForwardInput> inputs;  // empty: the spec declares none, nothing to check
  std::vector<std::shared_ptr<ForwardReplica>> replicas;
  uint64_t sample_below = 0;  // a request without a traceparent goes to Python (to start a trace)
                              // when a random 64-bit draw is below this
};

// Counts of requests the forwarder answered itself (relayed ones are Python's to count).
struct ForwardStats {
  std::array<std::atomic<uint64_t>, 17> codes{};  // by grpc::StatusCode
  std::atomic<uint64_t> relayed{0}, retried{0}, in_flight{0}, latency_ns{0};
  std::vector<uint64_t> bounds_ns;  // latency bucket upper bounds, fixed at construction
  std::unique_ptr<std::atomic<uint64_t>[]> buckets;  // non-cumulative, one past the last bound
};

class Forwarder final : public grpc::CallbackGenericService {
 public:
  Forwarder(const std::vector<double>& latency_bounds_s, int attempts);
  ~Forwarder() override;

  // Listens on `address` (port 0: a free one); the Python server to relay to is `fallback`.
  int Start(const std::string& address, const std::string& fallback);
  void Stop(double grace_s);
  // rows: (name, address, infer method, capacity); inputs: (name, datatype, shape, itemsize).
  void SetTable(const std::string& model, const std::string& version,
                const std::vector<std::tuple<std::string, std::string, std::string, int>>& rows,
                const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, int>>& inputs,
                double sample_ratio);

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

  std::shared_ptr<const ForwardTable> table() const;
  std::shared_ptr<ForwardReplica> Choose(const ForwardTable& table, const std::vector<const ForwardReplica*>& tried);
  grpc::GenericStub* fallback() { return fallback_.get(); }
  int in_flight_on(const std::string& name) const;

  ForwardStats stats;
  const int attempts;

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const ForwardTable> table_;
  std::unique_ptr<grpc::GenericStub> fallback_;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace servefleet::direct
