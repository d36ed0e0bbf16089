// What the C++ servers in front of a Python gRPC server share (the proxy's forwarder, the sharded
// app's router, a shard replica's lookups): a generic (raw bytes) server that owns the public port,
// answers the calls of its one fast method (ModelInfer, or a shard's lookup) it can on a fast path
// and relays everything else byte for byte to the Python server behind it, which answers as it
// always has (every precise error message, streams, other methods, traced requests). Also: the
// checks the fast paths apply before answering, counts of the calls answered here, and power of
// two choices over replicas.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "grpc_service.pb.h"

namespace servefleet::direct {

constexpr char kInfer[] = "/inference.GRPCInferenceService/ModelInfer";
constexpr int kMaxMessageBytes = 64 * 1024 * 1024;

uint64_t Draw();  // a uniform 64-bit draw (thread-local generator)
std::string Str(grpc::string_ref s);
bool Reserved(grpc::string_ref key);  // metadata gRPC sets itself: never copied onto a next hop

// The caller's context for the next hop: its deadline and cancellation, and its metadata as is.
std::unique_ptr<grpc::ClientContext> NextHop(const grpc::GenericCallbackServerContext& ctx);

// A channel to `address` with the platform's message size limits.
std::unique_ptr<grpc::GenericStub> StubTo(const std::string& address);

// The sample threshold of a ratio (0..1): a request without a traceparent needs a span (Python's)
// when a random 64-bit draw is below it.
uint64_t SampleBelow(double ratio);
// True when Python must answer because the request needs a span: a sampled caller, or (no caller
// trace) the sampler's ratio for traces started here.
bool NeedsSpan(const grpc::GenericCallbackServerContext& ctx, uint64_t sample_below);
// The traceparent the next hops of a call served here (so: not sampled) carry: the caller's, or a
// new unsampled one, so that they do not start traces of their own (parent-based, as Python's).
std::string UnsampledParent(const grpc::GenericCallbackServerContext& ctx);

struct InputSpec {
  std::string name;
  std::string datatype;
  std::vector<int64_t> shape;  // -1: any size
  int itemsize = 0;            // 0: BYTES (size not checked)
};

// The spec's checks (proxy.py check_served / check_request); any failure goes to Python for its
// exact message.
bool Valid(const inference::ModelInferRequest& r, const std::string& model, const std::string& version,
           const std::vector<InputSpec>& inputs);
bool Parse(const grpc::ByteBuffer& buffer, inference::ModelInferRequest* out);
// A message's bytes in one string (false: the buffer could not be read).
bool Flatten(const grpc::ByteBuffer& buffer, std::string* out);

// Counts of the calls answered here (relayed ones are Python's to count).
struct CallStats {
  std::array<std::atomic<uint64_t>, 17> codes{};  // by grpc::StatusCode
  std::atomic<uint64_t> relayed{0}, retried{0}, in_flight{0}, latency_ns{0};
  std::vector<uint64_t> bounds_ns;  // latency bucket upper bounds, fixed at construction
  std::unique_ptr<std::atomic<uint64_t>[]> buckets;  // non-cumulative, one past the last bound

  explicit CallStats(const std::vector<double>& latency_bounds_s);
  // One call answered here with `code`, `start` being when its fast path began (and in_flight up).
  void Answered(grpc::StatusCode code, std::chrono::steady_clock::time_point start);
};

// The server both fast paths run in: listens, relays to `fallback`, keeps the counts.
class RelayServer : public grpc::CallbackGenericService {
 public:
  // `fast_method`: the method whose calls the fast path reads and decides on (others are relayed).
  explicit RelayServer(const std::vector<double>& latency_bounds_s, std::string fast_method = kInfer);
  ~RelayServer() override;

  // Listens on `address` (port 0: a free one); the Python server to relay to is `fallback`.
  int Start(const std::string& address, const std::string& fallback);
  void Stop(double grace_s);
  grpc::GenericStub* fallback() { return fallback_.get(); }

  CallStats stats;
  const std::string fast_method;

 private:
  std::mutex server_mu_;
  std::unique_ptr<grpc::GenericStub> fallback_;
  std::unique_ptr<grpc::Server> server_;
};

// One call from a client. The server's fast method: its message is read, then the subclass either
// answers it (OnRequest, then Reply/Finish) or hands it to Python (Relay(true)); any other method is
// relayed from the start. The relay is a bidi pass-through to Python.
class RelayCall : public grpc::ServerGenericBidiReactor {
 public:
  RelayCall(RelayServer* server, grpc::GenericCallbackServerContext* ctx) : server_(server), ctx_(ctx) {}

  void OnReadDone(bool ok) final;
  void OnWriteDone(bool ok) final;
  void OnCancel() final;
  void OnDone() final { delete this; }

 protected:
  // Starts the call: a subclass calls it last in its constructor (a reaction may run at once, on
  // another thread, and calls OnRequest).
  void Begin();
  // The request message is in in_; the fast path's decision (it may call Relay(true)).
  virtual void OnRequest() = 0;
  // The client went away while the fast path runs (not called once the call is relayed).
  virtual void OnCancelFast() {}
  // Hands the call to Python: `seeded` when the request message has been read already.
  void Relay(bool seeded);

  RelayServer* server_;
  grpc::GenericCallbackServerContext* ctx_;
  grpc::ByteBuffer in_, out_;

 private:
  // Python's side of a relayed call.
  class Upstream final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Upstream(RelayCall* call) : call_(call) {}
    void OnWriteDone(bool ok) override;
    void OnWritesDoneDone(bool) override {}
    void OnReadDone(bool ok) override;
    void OnDone(const grpc::Status& status) override { call_->UpstreamDone(status); }

   private:
    RelayCall* call_;
  };

  void CloseUpstream();
  void UpstreamDone(const grpc::Status& status);

  bool decided_ = false;
  std::unique_ptr<grpc::ClientContext> relay_context_;
  Upstream upstream_{this};
  // writing_, upstream_*, status_, relaying_, operations on upstream_ (recursive: a reaction may
  // run inline in the call that starts an operation)
  std::recursive_mutex mu_;
  bool writing_ = false, upstream_done_ = false, upstream_closing_ = false, relaying_ = false;
  grpc::Status status_;
};

// Power of two choices: the less loaded (in_flight) of two uniform picks among the replicas
// `eligible` accepts; null when there is none.
template <typename Replica, typename Eligible>
std::shared_ptr<Replica> ChooseP2C(const std::vector<std::shared_ptr<Replica>>& replicas, Eligible eligible) {
  std::shared_ptr<Replica> a, b;
  uint64_t seen = 0;
  for (const auto& r : replicas) {  // two uniform picks among the eligible (reservoir sampling)
    if (!eligible(*r)) continue;
    ++seen;
    if (seen == 1) {
      a = r;
    } else if (seen == 2) {
      b = r;
    } else if (Draw() % seen < 2) {
      (Draw() & 1 ? a : b) = r;
    }
  }
  if (!b) return a;
  if (Draw() & 1) std::swap(a, b);  // a tie goes either way (the first listed is not favoured)
  return a->in_flight.load(std::memory_order_relaxed) <= b->in_flight.load(std::memory_order_relaxed) ? a : b;
}

}  // namespace servefleet::direct
