// KServe v2 GRPCInferenceService over a CtrModel, answered entirely on gRPC's C++ threads.
#pragma once

#include <grpcpp/grpcpp.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ctr_model.h"
#include "grpc_service.grpc.pb.h"

namespace servefleet::direct {

// Tensor names and the served model's identity, fixed for the whole process.
inline constexpr char kInputName[] = "feature_ids";
inline constexpr char kOutputName[] = "score";

struct StatsSnapshot {
  uint64_t requests = 0;        // every RPC answered, whatever its status
  uint64_t errors = 0;          // RPCs answered with a non-OK status
  uint64_t infer_requests = 0;  // ModelInfer calls that scored
  uint64_t rows = 0;            // examples scored
  uint64_t in_flight = 0;       // RPCs being handled right now
  double mean_latency_us = 0;
  double p50_latency_us = 0;
  double p99_latency_us = 0;
};

// Lock-free request statistics: counters plus a latency histogram with one bucket per microsecond.
class Stats {
 public:
  void Begin() { in_flight_.fetch_add(1, std::memory_order_relaxed); }
  // Ends an RPC that Begin() counted.
  void Record(bool ok, std::chrono::steady_clock::duration elapsed);
  void AddRows(uint64_t rows) { rows_.fetch_add(rows, std::memory_order_relaxed); }
  void AddInfer() { infer_requests_.fetch_add(1, std::memory_order_relaxed); }
  StatsSnapshot Snapshot() const;
  // Requests faster than each bound (microseconds, ascending), cumulative as Prometheus buckets
  // count them, then every request; and the sum of all latencies in microseconds.
  std::vector<uint64_t> LatencyBuckets(const std::vector<uint64_t>& bounds_us, uint64_t* sum_us) const;

 private:
  static constexpr size_t kBuckets = 100'000;  // 0..100 ms; slower requests land in the last
  std::atomic<uint64_t> requests_{0}, errors_{0}, infer_requests_{0}, rows_{0}, total_us_{0}, in_flight_{0};
  std::array<std::atomic<uint64_t>, kBuckets> histogram_{};
};

class InferenceService final : public inference::GRPCInferenceService::Service {
 public:
  explicit InferenceService(Stats* stats) : stats_(stats) {}

  // Swaps the served model; requests in flight finish on the model they started with.
  void SetModel(std::shared_ptr<const CtrModel> model, std::string name, std::string version);
  std::string model_name() const;

  grpc::Status ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse*) override;
  grpc::Status ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                           inference::ServerReadyResponse*) override;
  grpc::Status ServerMetadata(grpc::ServerContext*, const inference::ServerMetadataRequest*,
                              inference::ServerMetadataResponse*) override;
  grpc::Status ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest*,
                          inference::ModelReadyResponse*) override;
  grpc::Status ModelMetadata(grpc::ServerContext*, const inference::ModelMetadataRequest*,
                             inference::ModelMetadataResponse*) override;
  grpc::Status ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest*,
                          inference::ModelInferResponse*) override;

 private:
  struct Served {
    std::shared_ptr<const CtrModel> model;
    std::string name;
    std::string version;
  };
  // The model a request runs on, without a lock or a shared reference count on the request path:
  // each thread keeps its own reference and refreshes it (under mu_) only when SetModel has
  // published a newer generation. An idle thread may hold a replaced model until its next call.
  const std::shared_ptr<const Served>& Current() const;
  grpc::Status Infer(const inference::ModelInferRequest& request, inference::ModelInferResponse* response);

  Stats* stats_;
  mutable std::mutex mu_;  // guards served_; taken by SetModel and by a thread's refresh only
  std::shared_ptr<const Served> served_;
  std::atomic<uint64_t> generation_{0};  // of served_; unique across instances (see SetModel)
};

}  // namespace servefleet::direct
