// The C++ fast path of a sharded app's router (servefleet/services/shard_router.py): a generic
// gRPC server on the router's public port, in front of the Python router server (relay.h).
//
// A ModelInfer for the served model whose one input is the key tensor, INT64 [batch, fields] as
// raw contents, every key in [0, rows), and that needs no span, is served here without the GIL:
// the distinct keys are split by owning shard (range bounds or splitmix64, exactly as
// services/sharding.py's Layout), one raw lookup per shard hit goes out in parallel (little-endian
// int64 keys in, float32 [k, 1 + dim] rows out, the shard's own gRPC method) under the caller's
// deadline, per shard: power of two choices on in-flight counts, another replica on UNAVAILABLE
// or RESOURCE_EXHAUSTED, a hedge to another replica when the first has not answered within the
// p95 of the shard's fastest replica (within a token budget, only to a replica whose median is
// below that delay). The rows are merged (ctr_model.h FmScores: bit for bit numpy's merge_ctr) and
// the response built as Python's encode_response does.
//
// Everything else goes to Python, which words every error: invalid requests, other methods,
// traced requests, and a fan-out that cannot complete here (a shard with no replica left, a
// shard's error): Python runs the request again on its own path, with the exact message and its
// rule of re-running a request caught by a table change (resharding). A caller whose deadline
// passes gets DEADLINE_EXCEEDED here (as Python answers it); a caller gone, CANCELLED.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <queue>
#include <thread>
#include <tuple>

#include "relay.h"

namespace servefleet::direct {

struct ShardReplica {
  std::string name, address;
  int capacity = 0;
  std::unique_ptr<grpc::GenericStub> stub;
  std::atomic<int> in_flight{0};
};

// One shard's replicas as this router sees them (ShardPool in shard_router.py): the replicas to
// choose from, latency windows, hedge tokens, counts. Everything under mu.
struct ShardPool {
  explicit ShardPool(int shard_) : shard(shard_) {}

  // Seconds to wait before hedging: the p95 of the fastest replica with enough samples.
  double HedgeDelay(double default_s);
  // A hedge to `name` may win: its median is below the hedge delay.
  bool CanWin(const std::string& name, double default_s);
  void Observe(const std::string& name, double seconds);

  const int shard;
  std::mutex mu;
  std::vector<std::shared_ptr<ShardReplica>> replicas;  // a replica found gone is dropped until the next table
  std::map<std::string, std::deque<double>> latencies;  // every replica of the table's
  double tokens = 0;
  uint64_t lookups = 0, hedges = 0, hedge_wins = 0, retries = 0;
  bool cached = false;  // delay and p50 below are current
  double delay = 0;
  std::map<std::string, double> p50;
  int fresh = 0;
};

struct RouterTable {
  std::string model, version, key_input, output, method;
  std::vector<InputSpec> inputs;
  bool hash = false;
  std::vector<int64_t> bounds;  // range: shard i owns keys below bounds[i] (and not below bounds[i-1])
  int64_t num_rows = 0;
  uint32_t fields = 0, dim = 0;
  float bias = 0;
  std::vector<std::shared_ptr<ShardPool>> pools;
  uint64_t sample_below = 0;
  bool enabled = false;  // false: every call goes to Python

  size_t Owner(int64_t key) const;
};

// Calls functions at given times on one thread of its own (the hedges' timers).
class Timers {
 public:
  Timers();
  ~Timers();
  void At(std::chrono::steady_clock::time_point when, std::function<void()> f);

 private:
  struct Entry {
    std::chrono::steady_clock::time_point when;
    uint64_t order;
    std::function<void()> f;
    bool operator>(const Entry& o) const { return when != o.when ? when > o.when : order > o.order; }
  };
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t next_ = 0;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> queue_;
  std::thread thread_;
};

using ShardRows = std::vector<std::vector<std::tuple<std::string, std::string, int>>>;
using InputRows = std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, int>>;

class ShardRouter final : public RelayServer {
 public:
  ShardRouter(const std::vector<double>& latency_bounds_s, int attempts, double hedge_default_s,
              double hedge_budget);
  ~ShardRouter() override;

  // shards[i]: (name, address, capacity) of shard i's ready replicas. Same layout as the table
  // before (partitioning, bounds, rows): pools and their latency history carry over; a new layout
  // gets new pools while calls in flight finish on the old ones.
  void SetTable(const std::string& model, const std::string& version, const InputRows& inputs,
                const std::string& key_input, const std::string& output, const std::string& partitioning,
                const std::vector<int64_t>& bounds, int64_t num_rows, uint32_t fields, uint32_t dim, float bias,
                const ShardRows& shards, const std::string& method, double sample_ratio, bool enabled);
  void SetHedgeBudget(double budget) { hedge_budget_.store(std::max(0.0, budget)); }
  double hedge_budget() const { return hedge_budget_.load(); }
  std::shared_ptr<const RouterTable> table() const;
  // The owning shard of each key under the current table (what Python's Layout.owners says).
  std::vector<int64_t> Owners(const std::vector<int64_t>& keys) const;

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

  const int attempts;
  const double hedge_default_s;
  Timers timers;

 private:
  std::atomic<double> hedge_budget_;
  mutable std::mutex mu_;
  std::shared_ptr<const RouterTable> table_;
};

}  // namespace servefleet::direct
