#include "relay.h"

#include <cstdio>
#include <random>
#include <stdexcept>

namespace servefleet::direct {

uint64_t Draw() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

std::string Str(grpc::string_ref s) { return std::string(s.data(), s.size()); }

bool Reserved(grpc::string_ref key) {
  return key.starts_with(":") || key.starts_with("grpc-") || key == "user-agent" || key == "content-type" ||
         key == "te";
}

std::unique_ptr<grpc::ClientContext> NextHop(const grpc::GenericCallbackServerContext& ctx) {
  auto client = grpc::ClientContext::FromCallbackServerContext(ctx);
  for (const auto& [key, value] : ctx.client_metadata())
    if (!Reserved(key)) client->AddMetadata(Str(key), Str(value));
  return client;
}

std::unique_ptr<grpc::GenericStub> StubTo(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

uint64_t SampleBelow(double ratio) {
  ratio = std::clamp(ratio, 0.0, 1.0);
  return ratio >= 1.0 ? UINT64_MAX : static_cast<uint64_t>(ratio * 18446744073709551616.0);
}

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

std::string UnsampledParent(const grpc::GenericCallbackServerContext& ctx) {
  const auto& md = ctx.client_metadata();
  const auto it = md.find("traceparent");
  if (it != md.end()) return Str(it->second);
  char parent[56];
  std::snprintf(parent, sizeof parent, "00-%016llx%016llx-%016llx-00", static_cast<unsigned long long>(Draw()),
                static_cast<unsigned long long>(Draw()), static_cast<unsigned long long>(Draw()));
  return parent;
}

bool Valid(const inference::ModelInferRequest& r, const std::string& model, const std::string& version,
           const std::vector<InputSpec>& inputs) {
  if (r.model_name() != model) return false;
  if (!r.model_version().empty() && r.model_version() != version) return false;
  if (inputs.empty()) return true;
  const int raw = r.raw_input_contents_size();
  if (raw && raw != r.inputs_size()) return false;
  size_t matched = 0;
  for (int i = 0; i < r.inputs_size(); ++i) {
    const auto& tensor = r.inputs(i);
    const auto want = std::find_if(inputs.begin(), inputs.end(),
                                   [&](const InputSpec& in) { return in.name == tensor.name(); });
    if (want == inputs.end() || tensor.datatype() != want->datatype) return false;
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
  return matched == inputs.size() && static_cast<size_t>(r.inputs_size()) == inputs.size();
}

bool Flatten(const grpc::ByteBuffer& buffer, std::string* out) {
  std::vector<grpc::Slice> slices;
  out->clear();
  if (!buffer.Dump(&slices).ok()) return false;
  for (const auto& s : slices) out->append(reinterpret_cast<const char*>(s.begin()), s.size());
  return true;
}

bool Parse(const grpc::ByteBuffer& buffer, inference::ModelInferRequest* out) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return false;
  if (slices.size() == 1) return out->ParseFromArray(slices[0].begin(), static_cast<int>(slices[0].size()));
  std::string flat;
  return Flatten(buffer, &flat) && out->ParseFromString(flat);
}

CallStats::CallStats(const std::vector<double>& latency_bounds_s) {
  for (double b : latency_bounds_s) bounds_ns.push_back(static_cast<uint64_t>(b * 1e9));
  if (!std::is_sorted(bounds_ns.begin(), bounds_ns.end()))
    throw std::invalid_argument("latency bounds must be ascending");
  buckets = std::make_unique<std::atomic<uint64_t>[]>(bounds_ns.size() + 1);
}

void CallStats::Answered(grpc::StatusCode code, std::chrono::steady_clock::time_point start) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
  const auto bucket =
      std::lower_bound(bounds_ns.begin(), bounds_ns.end(), static_cast<uint64_t>(ns)) - bounds_ns.begin();
  buckets[bucket].fetch_add(1, std::memory_order_relaxed);
  latency_ns.fetch_add(static_cast<uint64_t>(ns), std::memory_order_relaxed);
  codes[std::min<size_t>(static_cast<size_t>(code), 16)].fetch_add(1, std::memory_order_relaxed);
  in_flight.fetch_sub(1, std::memory_order_relaxed);
}

RelayServer::RelayServer(const std::vector<double>& latency_bounds_s, std::string fast_method_)
    : stats(latency_bounds_s), fast_method(std::move(fast_method_)) {}

RelayServer::~RelayServer() { Stop(0.0); }

int RelayServer::Start(const std::string& address, const std::string& fallback) {
  std::lock_guard<std::mutex> lock(server_mu_);
  if (server_) throw std::runtime_error("server already started");
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

void RelayServer::Stop(double grace_s) {
  std::unique_ptr<grpc::Server> server;
  {
    std::lock_guard<std::mutex> lock(server_mu_);
    server = std::move(server_);
  }
  if (!server) return;
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::microseconds(static_cast<int64_t>(std::max(grace_s, 0.0) * 1e6)));
  server->Wait();
}

void RelayCall::Begin() {
  if (ctx_->method() == server_->fast_method) {
    StartRead(&in_);
  } else {
    Relay(false);
  }
}

void RelayCall::OnReadDone(bool ok) {
  if (!decided_) {
    decided_ = true;
    if (ok) {
      OnRequest();
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

void RelayCall::OnWriteDone(bool ok) {
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
    relay_context_->TryCancel();
    CloseUpstream();
  }
}

void RelayCall::OnCancel() {
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (relaying_) {
      if (!upstream_done_) relay_context_->TryCancel();
      return;
    }
  }
  OnCancelFast();
}

void RelayCall::Upstream::OnWriteDone(bool ok) {
  if (ok) call_->StartRead(&call_->in_);
}

void RelayCall::Upstream::OnReadDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(call_->mu_);
  if (!ok) {
    call_->CloseUpstream();
    return;
  }
  call_->writing_ = true;
  call_->StartWrite(&call_->out_);
}

// Python's side may not finish (OnDone) while this side can still start an operation on it: a
// hold from the start until Python's side has nothing more to send (or the client is gone); from
// then on, nothing here touches it. Called under mu_.
void RelayCall::CloseUpstream() {
  if (upstream_closing_) return;
  upstream_closing_ = true;
  upstream_.RemoveHold();
}

void RelayCall::Relay(bool seeded) {
  decided_ = true;
  server_->stats.relayed.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::recursive_mutex> lock(mu_);
  relaying_ = true;
  relay_context_ = NextHop(*ctx_);
  server_->fallback()->PrepareBidiStreamingCall(relay_context_.get(), Str(ctx_->method()), grpc::StubOptions(),
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

void RelayCall::UpstreamDone(const grpc::Status& status) {
  for (const auto& [key, value] : relay_context_->GetServerTrailingMetadata())
    if (!Reserved(key)) ctx_->AddTrailingMetadata(Str(key), Str(value));
  std::unique_lock<std::recursive_mutex> lock(mu_);
  upstream_done_ = true;
  status_ = status;
  if (writing_) return;  // the write's completion finishes
  lock.unlock();
  Finish(status_);
}

}  // namespace servefleet::direct
