#include "forwarder.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace servefleet::direct {
namespace {

// One call from a client: a valid ModelInfer goes to a replica, anything else to Python.
class Call final : public RelayCall {
 public:
  Call(Forwarder* fwd, grpc::GenericCallbackServerContext* ctx) : RelayCall(fwd, ctx), fwd_(fwd) { Begin(); }

 private:
  void OnRequest() override {
    if (!Forwardable()) {
      Relay(true);
      return;
    }
    start_ = std::chrono::steady_clock::now();
    fwd_->stats.in_flight.fetch_add(1, std::memory_order_relaxed);
    Attempt();
  }

  bool Forwardable() {
    table_ = fwd_->table();
    if (!table_ || table_->replicas.empty() || NeedsSpan(*ctx_, table_->sample_below)) return false;
    inference::ModelInferRequest request;
    return Parse(in_, &request) && Valid(request, table_->model, table_->version, table_->inputs);
  }

  void Attempt() {
    replica_ = static_cast<int>(tried_.size()) < fwd_->attempts
                   ? ChooseP2C(table_->replicas,
                               [&](const ForwardReplica& r) {
                                 return r.in_flight.load(std::memory_order_relaxed) < r.capacity &&
                                        std::find(tried_.begin(), tried_.end(), &r) == tried_.end();
                               })
                   : nullptr;
    if (!replica_) {  // none left that is not full or failed: Python's path decides and words it
      fwd_->stats.in_flight.fetch_sub(1, std::memory_order_relaxed);
      Relay(true);
      return;
    }
    if (!tried_.empty()) fwd_->stats.retried.fetch_add(1, std::memory_order_relaxed);
    tried_.push_back(replica_.get());
    replica_->in_flight.fetch_add(1, std::memory_order_relaxed);
    client_.push_back(NextHop(*ctx_));  // kept: a context outlives its call's callback
    replica_->stub->UnaryCall(client_.back().get(), replica_->method, grpc::StubOptions(), &in_, &out_,
                              [this](grpc::Status status) { Answered(std::move(status)); });
  }

  void Answered(grpc::Status status) {
    replica_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    const auto code = status.error_code();
    if ((code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::RESOURCE_EXHAUSTED) &&
        !ctx_->IsCancelled()) {
      Attempt();
      return;
    }
    fwd_->stats.Answered(code, start_);
    if (status.ok()) {
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      Finish(status);
    }
  }

  Forwarder* fwd_;
  std::chrono::steady_clock::time_point start_;
  std::shared_ptr<const ForwardTable> table_;
  std::shared_ptr<ForwardReplica> replica_;
  std::vector<const ForwardReplica*> tried_;
  std::vector<std::unique_ptr<grpc::ClientContext>> client_;
};

}  // namespace

Forwarder::Forwarder(const std::vector<double>& latency_bounds_s, int attempts_)
    : RelayServer(latency_bounds_s), attempts(attempts_) {
  if (attempts < 1) throw std::invalid_argument("attempts must be >= 1");
}

Forwarder::~Forwarder() { Stop(0.0); }

void Forwarder::SetTable(const std::string& model, const std::string& version,
                         const std::vector<std::tuple<std::string, std::string, std::string, int>>& rows,
                         const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, int>>& inputs,
                         double sample_ratio) {
  auto next = std::make_shared<ForwardTable>();
  next->model = model;
  next->version = version;
  for (const auto& [name, datatype, shape, itemsize] : inputs) next->inputs.push_back({name, datatype, shape, itemsize});
  next->sample_below = SampleBelow(sample_ratio);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [name, address, method, capacity] : rows) {
    std::shared_ptr<ForwardReplica> kept;
    if (table_)
      for (const auto& r : table_->replicas)
        if (r->name == name && r->method == method) kept = r;
    if (!kept) {
      kept = std::make_shared<ForwardReplica>();
      kept->name = name;
      kept->method = method;
      kept->stub = StubTo(address);
    }
    kept->capacity = capacity;
    next->replicas.push_back(std::move(kept));
  }
  table_ = std::move(next);
}

std::shared_ptr<const ForwardTable> Forwarder::table() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_;
}

int Forwarder::in_flight_on(const std::string& name) const {
  auto t = table();
  if (t)
    for (const auto& r : t->replicas)
      if (r->name == name) return r->in_flight.load(std::memory_order_relaxed);
  return 0;
}

grpc::ServerGenericBidiReactor* Forwarder::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new Call(this, ctx);
}

}  // namespace servefleet::direct
