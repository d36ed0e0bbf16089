#include "forwarder.h"

#include <algorithm>
#include <chrono>
#include <random>
#include <stdexcept>

#include "grpc_service.pb.h"

namespace servefleet::direct {
namespace {

constexpr char kInfer[] = "/inference.GRPCInferenceService/ModelInfer";
constexpr int kMaxMessageBytes = 64 * 1024 * 1024;

bool Reserved(grpc::string_ref key) {
  return key.starts_with(":") || key.starts_with("grpc-") || key == "user-agent" || key == "content-type" ||
         key == "te";
}

std::string Str(grpc::string_ref s) { return std::string(s.data(), s.size()); }

// The caller's context for the next hop: its deadline and cancellation, and its metadata as is.
std::unique_ptr<grpc::ClientContext> NextHop(const grpc::GenericCallbackServerContext& ctx) {
  auto client = grpc::ClientContext::FromCallbackServerContext(ctx);
  for (const auto& [key, value] : ctx.client_metadata())
    if (!Reserved(key)) client->AddMetadata(Str(key), Str(value));
  return client;
}

uint64_t Draw() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

// True when Python must answer because the request needs a span: a sampled caller, or (no
// caller trace) the sampler's ratio for traces started here.
bool NeedsSpan(const grpc::GenericCallbackServerContext& ctx, uint64_t sample_below) {
  const auto& md = ctx.client_metadata();
  const auto it = md.find("traceparent");
  if (it == md.end()) return sample_below != 0 && Draw() < sample_below;
  const auto& v = it->second;  // version-traceid-parentid-flags: the flags' low bit is "sampled"
  if (v.size() < 2) return true;
  const char c = v.data()[v.size() - 1];
  const int low = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
  return (low & 1) != 0;
}

// The spec's checks (proxy.py check_request); any failure goes to Python for its exact message.
bool Valid(const inference::ModelInferRequest& r, const ForwardTable& t) {
  if (r.model_name() != t.model) return false;
  if (!r.model_version().empty() && r.model_version() != t.version) return false;
  if (t.inputs.empty()) return true;
  const int raw = r.raw_input_contents_size();
  if (raw && raw != r.inputs_size()) return false;
  size_t matched = 0;
  for (int i = 0; i < r.inputs_size(); ++i) {
    const auto& tensor = r.inputs(i);
    const auto want = std::find_if(t.inputs.begin(), t.inputs.end(),
                                   [&](const ForwardInput& in) { return in.name == tensor.name(); });
    if (want == t.inputs.end() || tensor.datatype() != want->datatype) return false;
    if (tensor.shape_size() != static_cast<int>(want->shape.size())) return false;
    int64_t elements = 1;
    for (int d = 0; d < tensor.shape_size(); ++d) {
      if (want->shape[d] != -1 && want->shape[d] != tensor.shape(d)) return false;
      elements *= tensor.shape(d);
    }
    if (raw && want->itemsize && static_cast<int64_t>(r.raw_input_contents(i).size()) != elements * want->itemsize)
      return false;
    ++matched;
  }
  // Every expected input given (names are unique in a spec; a repeated name fails on Python's side).
  return matched == t.inputs.size() && static_cast<size_t>(r.inputs_size()) == t.inputs.size();
}

bool Parse(const grpc::ByteBuffer& buffer, inference::ModelInferRequest* out) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return false;
  if (slices.size() == 1) return out->ParseFromArray(slices[0].begin(), static_cast<int>(slices[0].size()));
  std::string flat;
  for (const auto& s : slices) flat.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out->ParseFromString(flat);
}

// One call from a client. ModelInfer: read the request, then forward it to a replica or relay
// it; any other method: relay from the start. The relay is a bidi pass-through to Python.
class Call final : public grpc::ServerGenericBidiReactor {
 public:
  Call(Forwarder* fwd, grpc::GenericCallbackServerContext* ctx) : fwd_(fwd), ctx_(ctx) {
    if (ctx->method() == kInfer) {
      StartRead(&in_);
    } else {
      Relay(false);
    }
  }

  void OnReadDone(bool ok) override {
    if (!decided_) {
      decided_ = true;
      if (ok && Forwardable()) {
        start_ = std::chrono::steady_clock::now();
        fwd_->stats.in_flight.fetch_add(1, std::memory_order_relaxed);
        Attempt();
      } else if (ok) {
        Relay(true);
      } else {
        Relay(false);  // no message: Python answers as it would
      }
      return;
    }
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (upstream_closing_) return;  // Python's side has ended: the call finishes with its status
    if (ok) {
      upstream_.StartWrite(&in_);
    } else {
      upstream_.StartWritesDone();
    }
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::recursive_mutex> lock(mu_);
    writing_ = false;
    if (upstream_done_) {
      lock.unlock();
      Finish(status_);
      return;
    }
    if (upstream_closing_) return;
    if (ok) {
      upstream_.StartRead(&out_);
    } else {  // the client is gone: no more reads from Python's side
      client_.back()->TryCancel();
      CloseUpstream();
    }
  }

  void OnCancel() override {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (relaying_ && !upstream_done_) client_.back()->TryCancel();
  }

  void OnDone() override { delete this; }

 private:
  // Python's side of a relayed call.
  class Upstream final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Upstream(Call* call) : call_(call) {}
    void OnWriteDone(bool ok) override {
      if (ok) call_->StartRead(&call_->in_);
    }
    void OnWritesDoneDone(bool) override {}
    void OnReadDone(bool ok) override {
      std::lock_guard<std::recursive_mutex> lock(call_->mu_);
      if (!ok) {
        call_->CloseUpstream();
        return;
      }
      call_->writing_ = true;
      call_->StartWrite(&call_->out_);
    }
    void OnDone(const grpc::Status& status) override { call_->UpstreamDone(status); }

   private:
    Call* call_;
  };

  bool Forwardable() {
    table_ = fwd_->table();
    if (!table_ || table_->replicas.empty() || NeedsSpan(*ctx_, table_->sample_below)) return false;
    inference::ModelInferRequest request;
    return Parse(in_, &request) && Valid(request, *table_);
  }

  void Attempt() {
    replica_ = static_cast<int>(tried_.size()) < fwd_->attempts ? fwd_->Choose(*table_, tried_) : nullptr;
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
    auto& stats = fwd_->stats;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_).count();
    const auto bucket = std::lower_bound(stats.bounds_ns.begin(), stats.bounds_ns.end(), static_cast<uint64_t>(ns)) -
                        stats.bounds_ns.begin();
    stats.buckets[bucket].fetch_add(1, std::memory_order_relaxed);
    stats.latency_ns.fetch_add(static_cast<uint64_t>(ns), std::memory_order_relaxed);
    stats.codes[std::min<size_t>(static_cast<size_t>(code), 16)].fetch_add(1, std::memory_order_relaxed);
    stats.in_flight.fetch_sub(1, std::memory_order_relaxed);
    if (status.ok()) {
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      Finish(status);
    }
  }

  // Python's side may not finish (OnDone) while this side can still start an operation on it: a
  // hold from the start until Python's side has nothing more to send (or the client is gone);
  // from then on, nothing here touches it. Called under mu_.
  void CloseUpstream() {
    if (upstream_closing_) return;
    upstream_closing_ = true;
    upstream_.RemoveHold();
  }

  // Hands the call to Python: `seeded` when the request message has been read already.
  void Relay(bool seeded) {
    decided_ = true;
    fwd_->stats.relayed.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::recursive_mutex> lock(mu_);
    relaying_ = true;
    client_.push_back(NextHop(*ctx_));
    fwd_->fallback()->PrepareBidiStreamingCall(client_.back().get(), Str(ctx_->method()), grpc::StubOptions(),
                                               &upstream_);
    upstream_.AddHold();
    upstream_.StartRead(&out_);
    if (seeded) {
      upstream_.StartWrite(&in_);  // its completion reads the client's next message
    } else {
      StartRead(&in_);
    }
    upstream_.StartCall();
  }

  void UpstreamDone(const grpc::Status& status) {
    for (const auto& [key, value] : client_.back()->GetServerTrailingMetadata())
      if (!Reserved(key)) ctx_->AddTrailingMetadata(Str(key), Str(value));
    std::unique_lock<std::recursive_mutex> lock(mu_);
    upstream_done_ = true;
    status_ = status;
    if (writing_) return;  // the write's completion finishes
    lock.unlock();
    Finish(status_);
  }

  Forwarder* fwd_;
  grpc::GenericCallbackServerContext* ctx_;
  grpc::ByteBuffer in_, out_;
  bool decided_ = false;
  std::chrono::steady_clock::time_point start_;
  std::shared_ptr<const ForwardTable> table_;
  std::shared_ptr<ForwardReplica> replica_;
  std::vector<const ForwardReplica*> tried_;
  std::vector<std::unique_ptr<grpc::ClientContext>> client_;
  Upstream upstream_{this};
  // writing_, upstream_*, status_, relaying_, operations on upstream_ (recursive: a reaction may
  // run inline in the call that starts an operation)
  std::recursive_mutex mu_;
  bool writing_ = false, upstream_done_ = false, upstream_closing_ = false, relaying_ = false;
  grpc::Status status_;
};

std::unique_ptr<grpc::GenericStub> StubTo(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

}  // namespace

Forwarder::Forwarder(const std::vector<double>& latency_bounds_s, int attempts_) : attempts(attempts_) {
  if (attempts < 1) throw std::invalid_argument("attempts must be >= 1");
  for (double b : latency_bounds_s) stats.bounds_ns.push_back(static_cast<uint64_t>(b * 1e9));
  if (!std::is_sorted(stats.bounds_ns.begin(), stats.bounds_ns.end()))
    throw std::invalid_argument("latency bounds must be ascending");
  stats.buckets = std::make_unique<std::atomic<uint64_t>[]>(stats.bounds_ns.size() + 1);
}

Forwarder::~Forwarder() { Stop(0.0); }

int Forwarder::Start(const std::string& address, const std::string& fallback) {
  std::lock_guard<std::mutex> lock(mu_);
  if (server_) throw std::runtime_error("forwarder already started");
  fallback_ = StubTo(fallback);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(this);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) throw std::runtime_error("could not listen on " + address);
  return port;
}

void Forwarder::Stop(double grace_s) {
  std::unique_ptr<grpc::Server> server;
  {
    std::lock_guard<std::mutex> lock(mu_);
    server = std::move(server_);
  }
  if (!server) return;
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::microseconds(static_cast<int64_t>(std::max(grace_s, 0.0) * 1e6)));
  server->Wait();
}

void Forwarder::SetTable(const std::string& model, const std::string& version,
                         const std::vector<std::tuple<std::string, std::string, std::string, int>>& rows,
                         const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, int>>& inputs,
                         double sample_ratio) {
  auto next = std::make_shared<ForwardTable>();
  next->model = model;
  next->version = version;
  for (const auto& [name, datatype, shape, itemsize] : inputs) next->inputs.push_back({name, datatype, shape, itemsize});
  const double ratio = std::clamp(sample_ratio, 0.0, 1.0);
  next->sample_below = ratio >= 1.0 ? UINT64_MAX : static_cast<uint64_t>(ratio * 18446744073709551616.0);
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

std::shared_ptr<ForwardReplica> Forwarder::Choose(const ForwardTable& t, const std::vector<const ForwardReplica*>& tried) {
  std::shared_ptr<ForwardReplica> a, b;
  uint64_t seen = 0;
  for (const auto& r : t.replicas) {  // two uniform picks among the eligible (reservoir sampling)
    if (r->in_flight.load(std::memory_order_relaxed) >= r->capacity) continue;
    if (std::find(tried.begin(), tried.end(), r.get()) != tried.end()) continue;
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
  return a->in_flight.load(std::memory_order_relaxed) <= b->in_flight.load(std::memory_order_relaxed) ? a : b;
}

grpc::ServerGenericBidiReactor* Forwarder::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new Call(this, ctx);
}

}  // namespace servefleet::direct
