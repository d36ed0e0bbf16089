#include "shard_router.h"

#include <cstring>
#include <stdexcept>

#include "ctr_model.h"

namespace servefleet::direct {
namespace {

// shard_router.py's constants, for the same behaviour.
constexpr size_t kWindow = 128;     // latency samples kept per replica
constexpr size_t kMinSamples = 16;  // samples a replica needs before its p95 counts
constexpr int kRefresh = 8;         // new samples after which the delay is computed again
constexpr double kMaxTokens = 10.0;
constexpr double kDefaultDeadlineS = 60.0;

// splitmix64's finalizer (services/sharding.py mix64).
uint64_t Mix64(int64_t key) {
  uint64_t z = static_cast<uint64_t>(key) + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

class RouterCall;

// One shard's share of one request: its keys (positions into the distinct keys), the attempts
// sent for it, and whether it is answered.
struct Part {
  std::shared_ptr<ShardPool> pool;
  std::vector<uint32_t> positions;
  grpc::ByteBuffer request;  // the keys, little-endian int64

  struct Attempt {
    std::shared_ptr<ShardReplica> replica;
    grpc::ClientContext context;
    grpc::ByteBuffer request, response;
    std::chrono::steady_clock::time_point began;
    bool hedge = false, done = false;
  };
  std::vector<std::unique_ptr<Attempt>> attempts;
  std::vector<const ShardReplica*> tried;
  int outstanding = 0;
  bool finished = false, hedged = false;
  uint64_t timer = 0;  // the hedge timer that counts (an older one fires for nothing)
  std::string last = "no replica is ready";
};

// The fan-out of one request. Owned by its call and by every callback it has pending (attempts,
// timers), so that losing hedges finish on their own after the call is answered. State under
// mu_; nothing is started on gRPC (calls, cancels) while mu_ is held: a callback may run inline.
class Fanout : public std::enable_shared_from_this<Fanout> {
 public:
  Fanout(RouterCall* call, std::shared_ptr<const RouterTable> table, ShardRouter& router,
         std::vector<int64_t> ids, size_t batch, std::string id, std::chrono::system_clock::time_point deadline,
         std::string traceparent)
      : call_(call),
        table_(std::move(table)),
        attempts_(router.attempts),
        hedge_default_s_(router.hedge_default_s),
        budget_(router.hedge_budget()),
        timers_(&router.timers),
        ids_(std::move(ids)),
        batch_(batch),
        id_(std::move(id)),
        deadline_(deadline),
        traceparent_(std::move(traceparent)) {}

  void Start();
  void Cancel();

 private:
  enum class Outcome { kNone, kAnswer, kRelay, kDeadline, kCancelled };
  using Attempt = Part::Attempt;

  // Under mu_: picks a replica and prepares an attempt (started by the caller, unlocked).
  Attempt* Prepare(size_t part, bool hedge);
  void Launch(const std::vector<std::pair<size_t, Attempt*>>& started);
  void Answered(size_t part, Attempt* attempt, const grpc::Status& status);
  void HedgeDue(size_t part, uint64_t timer);
  // Under mu_: arms the part's hedge timer when hedging is on (armed by the caller, unlocked).
  bool HedgeTimer(size_t part, std::chrono::steady_clock::time_point* when, uint64_t* timer);
  // Under mu_: the request ends (the caller then calls Conclude, unlocked).
  void Close(Outcome how, std::vector<grpc::ClientContext*>* cancel);
  void Conclude(Outcome how, const std::vector<grpc::ClientContext*>& cancel);
  void Merge(grpc::ByteBuffer* out);

  RouterCall* call_;  // until the request ends
  const std::shared_ptr<const RouterTable> table_;
  const int attempts_;
  const double hedge_default_s_, budget_;
  Timers* timers_;
  const std::vector<int64_t> ids_;
  const size_t batch_;
  const std::string id_;
  const std::chrono::system_clock::time_point deadline_;
  const std::string traceparent_;  // every lookup's: unsampled, so shards answer it on their fast path

  std::mutex mu_;
  std::vector<int64_t> keys_;
  std::vector<uint32_t> inverse_;
  std::vector<float> rows_;
  std::vector<Part> parts_;
  size_t remaining_ = 0;
  bool ended_ = false;
  std::string failure_;  // DEADLINE_EXCEEDED's message
};

// One call from a client: a ModelInfer the fast path can serve fans out, anything else is Python's.
class RouterCall final : public RelayCall {
 public:
  RouterCall(ShardRouter* router, grpc::GenericCallbackServerContext* ctx) : RelayCall(router, ctx), router_(router) {
    Begin();
  }

  // The fan-out's end (called once, from any thread).
  void Answer(grpc::ByteBuffer* response) {
    out_ = std::move(*response);
    router_->stats.Answered(grpc::StatusCode::OK, start_);
    StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
  }
  void Fail(const grpc::Status& status) {
    router_->stats.Answered(status.error_code(), start_);
    Finish(status);
  }
  void ToPython() {
    router_->stats.in_flight.fetch_sub(1, std::memory_order_relaxed);
    Relay(true);
  }

 private:
  void OnRequest() override {
    auto table = router_->table();
    inference::ModelInferRequest request;
    std::vector<int64_t> ids;
    if (!table || !table->enabled || NeedsSpan(*ctx_, table->sample_below) || !Parse(in_, &request) ||
        !Servable(request, *table, &ids)) {
      Relay(true);
      return;
    }
    start_ = std::chrono::steady_clock::now();
    router_->stats.in_flight.fetch_add(1, std::memory_order_relaxed);
    auto deadline = ctx_->deadline();
    const auto longest = std::chrono::system_clock::now() +
                         std::chrono::microseconds(static_cast<int64_t>(kDefaultDeadlineS * 1e6));
    if (deadline > longest) deadline = longest;  // no deadline (or a far one): as Python bounds it
    const size_t batch = ids.size() / table->fields;
    auto fanout = std::make_shared<Fanout>(this, std::move(table), *router_, std::move(ids), batch, request.id(),
                                           deadline, UnsampledParent(*ctx_));
    {
      std::lock_guard<std::mutex> lock(fanout_mu_);
      fanout_ = fanout;
    }
    fanout->Start();
  }

  void OnCancelFast() override {
    std::shared_ptr<Fanout> fanout;
    {
      std::lock_guard<std::mutex> lock(fanout_mu_);
      fanout = fanout_;
    }
    if (fanout) fanout->Cancel();
  }

  // The checks of Python's path (check_served, check_request, the key input, check_ids) that
  // this path takes on itself; anything else (other inputs, typed contents, an empty batch, a key
  // out of range) is Python's to answer or word.
  static bool Servable(const inference::ModelInferRequest& r, const RouterTable& t, std::vector<int64_t>* ids) {
    if (!Valid(r, t.model, t.version, t.inputs)) return false;
    if (r.inputs_size() != 1 || r.raw_input_contents_size() != 1) return false;
    const auto& tensor = r.inputs(0);
    if (tensor.name() != t.key_input || tensor.datatype() != "INT64" || tensor.shape_size() != 2) return false;
    const std::string& raw = r.raw_input_contents(0);
    const int64_t batch = tensor.shape(0);
    if (tensor.shape(1) != static_cast<int64_t>(t.fields) || batch < 1 ||
        batch > static_cast<int64_t>(raw.size() / 8) || raw.size() != static_cast<size_t>(batch) * t.fields * 8)
      return false;
    ids->resize(raw.size() / 8);
    std::memcpy(ids->data(), raw.data(), raw.size());  // little-endian, as on the wire
    for (const int64_t id : *ids)
      if (id < 0 || id >= t.num_rows) return false;
    return true;
  }

  ShardRouter* router_;
  std::chrono::steady_clock::time_point start_;
  std::mutex fanout_mu_;  // fanout_: set by the request's reaction, read by a cancellation's
  std::shared_ptr<Fanout> fanout_;
};

void Fanout::Start() {
  std::vector<std::pair<size_t, Attempt*>> started;
  std::vector<std::tuple<size_t, std::chrono::steady_clock::time_point, uint64_t>> armed;
  std::vector<grpc::ClientContext*> cancel;
  Outcome how = Outcome::kNone;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // np.unique(ids, return_inverse=True): the distinct keys, sorted, and each id's place among them.
    keys_ = ids_;
    std::sort(keys_.begin(), keys_.end());
    keys_.erase(std::unique(keys_.begin(), keys_.end()), keys_.end());
    inverse_.resize(ids_.size());
    for (size_t i = 0; i < ids_.size(); ++i)
      inverse_[i] = static_cast<uint32_t>(std::lower_bound(keys_.begin(), keys_.end(), ids_[i]) - keys_.begin());
    rows_.resize(keys_.size() * (1 + size_t{table_->dim}));
    parts_ = std::vector<Part>(table_->pools.size());  // in place: a Part does not move
    for (size_t k = 0; k < keys_.size(); ++k) parts_[table_->Owner(keys_[k])].positions.push_back(static_cast<uint32_t>(k));
    for (size_t p = 0; p < parts_.size(); ++p) {
      Part& part = parts_[p];
      if (part.positions.empty()) continue;
      ++remaining_;
      part.pool = table_->pools[p];
      std::vector<int64_t> keys;
      keys.reserve(part.positions.size());
      for (const uint32_t k : part.positions) keys.push_back(keys_[k]);
      grpc::Slice slice(keys.data(), keys.size() * sizeof(int64_t));
      part.request = grpc::ByteBuffer(&slice, 1);
      {
        std::lock_guard<std::mutex> pool_lock(part.pool->mu);
        ++part.pool->lookups;
        part.pool->tokens = std::min(kMaxTokens, part.pool->tokens + budget_);
      }
      Attempt* attempt = Prepare(p, false);
      if (!attempt) {
        how = Outcome::kRelay;  // a shard with no replica to ask: Python's path decides and words it
        break;
      }
      started.emplace_back(p, attempt);
      std::chrono::steady_clock::time_point when;
      uint64_t timer;
      if (HedgeTimer(p, &when, &timer)) armed.emplace_back(p, when, timer);
    }
    if (how != Outcome::kNone) Close(how, &cancel);
  }
  if (how != Outcome::kNone) {
    Conclude(how, cancel);  // the attempts prepared are not started: nothing was sent
    for (auto& [p, attempt] : started) attempt->replica->in_flight.fetch_sub(1, std::memory_order_relaxed);
    return;
  }
  Launch(started);
  std::weak_ptr<Fanout> weak = weak_from_this();
  for (const auto& [p, when, timer] : armed)
    timers_->At(when, [weak, p = p, timer = timer] {
      if (auto self = weak.lock()) self->HedgeDue(p, timer);
    });
}

Fanout::Attempt* Fanout::Prepare(size_t p, bool hedge) {
  Part& part = parts_[p];
  std::shared_ptr<ShardReplica> replica;
  {
    std::lock_guard<std::mutex> pool_lock(part.pool->mu);
    replica = ChooseP2C(part.pool->replicas, [&](const ShardReplica& r) {
      return r.in_flight.load(std::memory_order_relaxed) < r.capacity &&
             std::find(part.tried.begin(), part.tried.end(), &r) == part.tried.end();
    });
    // A hedge only to a replica that may win (one known to be slow would only add load).
    if (!replica || (hedge && !part.pool->CanWin(replica->name, hedge_default_s_))) return nullptr;
  }
  part.tried.push_back(replica.get());
  auto attempt = std::make_unique<Attempt>();
  attempt->replica = std::move(replica);
  attempt->request = part.request;
  attempt->hedge = hedge;
  attempt->context.set_deadline(deadline_);
  attempt->context.AddMetadata("traceparent", traceparent_);
  attempt->replica->in_flight.fetch_add(1, std::memory_order_relaxed);
  ++part.outstanding;
  part.attempts.push_back(std::move(attempt));
  return part.attempts.back().get();
}

void Fanout::Launch(const std::vector<std::pair<size_t, Attempt*>>& started) {
  auto self = shared_from_this();
  for (const auto& [p, attempt] : started) {
    attempt->began = std::chrono::steady_clock::now();
    attempt->replica->stub->UnaryCall(&attempt->context, table_->method, grpc::StubOptions(), &attempt->request,
                                      &attempt->response,
                                      [self, p = p, attempt = attempt](grpc::Status status) {
                                        self->Answered(p, attempt, status);
                                      });
  }
}

bool Fanout::HedgeTimer(size_t p, std::chrono::steady_clock::time_point* when, uint64_t* timer) {
  Part& part = parts_[p];
  if (part.hedged || budget_ <= 0) return false;
  double delay;
  {
    std::lock_guard<std::mutex> pool_lock(part.pool->mu);
    delay = part.pool->HedgeDelay(hedge_default_s_);
  }
  const auto now = std::chrono::steady_clock::now();
  *when = now + std::chrono::microseconds(static_cast<int64_t>(delay * 1e6));
  // Past the caller's deadline there is nothing to hedge: its attempt ends with the deadline.
  if (std::chrono::system_clock::now() + (*when - now) >= deadline_) return false;
  *timer = ++part.timer;
  return true;
}

void Fanout::HedgeDue(size_t p, uint64_t timer) {
  std::vector<std::pair<size_t, Attempt*>> started;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Part& part = parts_[p];
    if (ended_ || part.finished || part.hedged || part.timer != timer) return;
    part.hedged = true;
    bool spend;
    {
      std::lock_guard<std::mutex> pool_lock(part.pool->mu);
      spend = part.pool->tokens >= 1.0;
    }
    if (!spend) return;
    Attempt* attempt = Prepare(p, true);
    if (!attempt) return;
    std::lock_guard<std::mutex> pool_lock(part.pool->mu);
    part.pool->tokens -= 1.0;
    ++part.pool->hedges;
    started.emplace_back(p, attempt);
  }
  Launch(started);
}

void Fanout::Answered(size_t p, Attempt* attempt, const grpc::Status& status) {
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - attempt->began).count();
  attempt->replica->in_flight.fetch_sub(1, std::memory_order_relaxed);
  std::vector<std::pair<size_t, Attempt*>> started;
  std::vector<std::tuple<size_t, std::chrono::steady_clock::time_point, uint64_t>> armed;
  std::vector<grpc::ClientContext*> cancel;
  Outcome how = Outcome::kNone;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Part& part = parts_[p];
    ShardPool& pool = *part.pool;
    attempt->done = true;
    --part.outstanding;
    const auto code = status.error_code();
    std::string flat;
    const size_t row_bytes = (1 + size_t{table_->dim}) * sizeof(float);
    if (status.ok()) Flatten(attempt->response, &flat);
    const bool rows_ok = status.ok() && flat.size() == part.positions.size() * row_bytes;
    if (rows_ok) {
      std::lock_guard<std::mutex> pool_lock(pool.mu);
      pool.Observe(attempt->replica->name, seconds);  // a lost race's latency counts too
    } else if (code == grpc::StatusCode::UNAVAILABLE) {
      std::lock_guard<std::mutex> pool_lock(pool.mu);  // gone: dropped until the next table
      auto& rs = pool.replicas;
      rs.erase(std::remove(rs.begin(), rs.end(), attempt->replica), rs.end());
    }
    if (!ended_ && !part.finished) {
      if (rows_ok) {
        part.finished = true;
        if (attempt->hedge) {
          std::lock_guard<std::mutex> pool_lock(pool.mu);
          ++pool.hedge_wins;
        }
        for (size_t j = 0; j < part.positions.size(); ++j)
          std::memcpy(rows_.data() + size_t{part.positions[j]} * (1 + table_->dim), flat.data() + j * row_bytes,
                      row_bytes);
        if (--remaining_ == 0) how = Outcome::kAnswer;
      } else if (code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        part.last = code == grpc::StatusCode::UNAVAILABLE ? "replica gone (" + status.error_message() + ")"
                                                          : status.error_message();
        if (part.outstanding == 0) {
          Attempt* retry = static_cast<int>(part.tried.size()) < attempts_ ? Prepare(p, false) : nullptr;
          if (retry) {
            std::lock_guard<std::mutex> pool_lock(pool.mu);
            ++pool.retries;
            started.emplace_back(p, retry);
          } else {
            how = Outcome::kRelay;  // no replica of this shard could answer
          }
        }
        if (!started.empty()) {
          std::chrono::steady_clock::time_point when;
          uint64_t timer;
          if (HedgeTimer(p, &when, &timer)) armed.emplace_back(p, when, timer);
        }
      } else if (code == grpc::StatusCode::DEADLINE_EXCEEDED) {
        failure_ = "shard " + std::to_string(pool.shard) + ": no answer within the deadline";
        how = Outcome::kDeadline;
      } else if (code == grpc::StatusCode::CANCELLED) {
        how = Outcome::kCancelled;
      } else {
        how = Outcome::kRelay;  // the shard's own error (or rows of the wrong size): Python's to word
      }
      if (how != Outcome::kNone) Close(how, &cancel);
    }
  }
  Launch(started);
  std::weak_ptr<Fanout> weak = weak_from_this();
  for (const auto& [part, when, timer] : armed)
    timers_->At(when, [weak, part = part, timer = timer] {
      if (auto self = weak.lock()) self->HedgeDue(part, timer);
    });
  if (how != Outcome::kNone) Conclude(how, cancel);
}

void Fanout::Cancel() {
  std::vector<grpc::ClientContext*> cancel;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ended_) return;
    Close(Outcome::kCancelled, &cancel);
  }
  Conclude(Outcome::kCancelled, cancel);
}

void Fanout::Close(Outcome how, std::vector<grpc::ClientContext*>* cancel) {
  ended_ = true;
  // A winner's siblings finish on their own (their latency keeps the estimates honest); a failed
  // request stops every lookup still out.
  if (how == Outcome::kAnswer) return;
  for (auto& part : parts_)
    for (auto& attempt : part.attempts)
      if (!attempt->done) cancel->push_back(&attempt->context);
}

void Fanout::Conclude(Outcome how, const std::vector<grpc::ClientContext*>& cancel) {
  for (auto* context : cancel) context->TryCancel();
  RouterCall* call = call_;
  call_ = nullptr;  // the call may finish (and be deleted) from here on
  switch (how) {
    case Outcome::kAnswer: {
      grpc::ByteBuffer response;
      Merge(&response);
      call->Answer(&response);
      break;
    }
    case Outcome::kRelay:
      call->ToPython();
      break;
    case Outcome::kDeadline:
      call->Fail(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, failure_));
      break;
    case Outcome::kCancelled:
      call->Fail(grpc::Status(grpc::StatusCode::CANCELLED, "the caller cancelled the call"));
      break;
    case Outcome::kNone:
      break;
  }
}

void Fanout::Merge(grpc::ByteBuffer* out) {
  // Every part has finished and nothing writes rows_ any more (a loser only observes).
  const RouterTable& t = *table_;
  std::vector<float> scores(batch_);
  const size_t width = 1 + size_t{t.dim};
  FmScores(t.bias, batch_, t.fields, t.dim,
           [&](size_t b, uint32_t f) {
             const float* row = rows_.data() + size_t{inverse_[b * t.fields + f]} * width;
             return std::pair<float, const float*>(row[0], row + 1);
           },
           scores.data());
  // As Python's encode_response: model name and version, the request's id, one FP32 [batch] output.
  inference::ModelInferResponse response;
  response.set_model_name(t.model);
  response.set_model_version(t.version);
  response.set_id(id_);
  auto* output = response.add_outputs();
  output->set_name(t.output);
  output->set_datatype("FP32");
  output->add_shape(static_cast<int64_t>(batch_));
  response.add_raw_output_contents(reinterpret_cast<const char*>(scores.data()), scores.size() * sizeof(float));
  grpc::Slice slice(response.SerializeAsString());
  *out = grpc::ByteBuffer(&slice, 1);
}

}  // namespace

double ShardPool::HedgeDelay(double default_s) {
  if (!cached) {
    cached = true;
    p50.clear();
    delay = -1;
    for (const auto& [name, window] : latencies) {
      if (window.size() < kMinSamples) continue;
      std::vector<double> ordered(window.begin(), window.end());
      std::sort(ordered.begin(), ordered.end());
      const double p95 = ordered[static_cast<size_t>(0.95 * static_cast<double>(ordered.size() - 1))];
      p50[name] = ordered[ordered.size() / 2];
      if (delay < 0 || p95 < delay) delay = p95;
    }
    if (delay < 0) delay = default_s;
  }
  return delay;
}

bool ShardPool::CanWin(const std::string& name, double default_s) {
  const double d = HedgeDelay(default_s);
  const auto it = p50.find(name);
  return (it == p50.end() ? 0.0 : it->second) < d;
}

void ShardPool::Observe(const std::string& name, double seconds) {
  const auto it = latencies.find(name);
  if (it == latencies.end()) return;
  it->second.push_back(seconds);
  if (it->second.size() > kWindow) it->second.pop_front();
  if (++fresh >= kRefresh) {
    cached = false;
    fresh = 0;
  }
}

size_t RouterTable::Owner(int64_t key) const {
  if (hash) return static_cast<size_t>(Mix64(key) % pools.size());
  // np.searchsorted(bounds, key, side="right")
  return static_cast<size_t>(std::upper_bound(bounds.begin(), bounds.end(), key) - bounds.begin());
}

Timers::Timers() : thread_([this] { Run(); }) {}

Timers::~Timers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Timers::At(std::chrono::steady_clock::time_point when, std::function<void()> f) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push({when, next_++, std::move(f)});
  }
  cv_.notify_all();
}

void Timers::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    if (queue_.empty()) {
      cv_.wait(lock);
      continue;
    }
    const auto when = queue_.top().when;
    if (std::chrono::steady_clock::now() < when) {
      cv_.wait_until(lock, when);
      continue;
    }
    auto f = queue_.top().f;
    queue_.pop();
    lock.unlock();
    f();
    lock.lock();
  }
}

ShardRouter::ShardRouter(const std::vector<double>& latency_bounds_s, int attempts_, double hedge_default_s_,
                         double hedge_budget)
    : RelayServer(latency_bounds_s),
      attempts(attempts_),
      hedge_default_s(hedge_default_s_),
      hedge_budget_(std::max(0.0, hedge_budget)) {
  if (attempts < 1) throw std::invalid_argument("attempts must be >= 1");
}

ShardRouter::~ShardRouter() { Stop(0.0); }

void ShardRouter::SetTable(const std::string& model, const std::string& version, const InputRows& inputs,
                           const std::string& key_input, const std::string& output,
                           const std::string& partitioning, const std::vector<int64_t>& bounds, int64_t num_rows,
                           uint32_t fields, uint32_t dim, float bias, const ShardRows& shards,
                           const std::string& method, double sample_ratio, bool enabled) {
  if (partitioning != "range" && partitioning != "hash")
    throw std::invalid_argument("partitioning must be range or hash, got " + partitioning);
  if (shards.empty()) throw std::invalid_argument("a layout has at least one shard");
  if (partitioning == "range" && (bounds.size() != shards.size() || bounds.back() != num_rows))
    throw std::invalid_argument("range bounds must give each shard's end, the last one the row count");
  if (fields == 0 || dim == 0) throw std::invalid_argument("fields and dim must be positive");
  auto next = std::make_shared<RouterTable>();
  next->model = model;
  next->version = version;
  for (const auto& [name, datatype, shape, itemsize] : inputs) next->inputs.push_back({name, datatype, shape, itemsize});
  next->key_input = key_input;
  next->output = output;
  next->method = method;
  next->hash = partitioning == "hash";
  next->bounds = bounds;
  next->num_rows = num_rows;
  next->fields = fields;
  next->dim = dim;
  next->bias = bias;
  next->sample_below = SampleBelow(sample_ratio);
  next->enabled = enabled;
  std::lock_guard<std::mutex> lock(mu_);
  const bool same = table_ && table_->hash == next->hash && table_->bounds == next->bounds &&
                    table_->num_rows == num_rows && table_->pools.size() == shards.size();
  for (size_t i = 0; i < shards.size(); ++i) {
    auto pool = same ? table_->pools[i] : std::make_shared<ShardPool>(static_cast<int>(i));
    std::lock_guard<std::mutex> pool_lock(pool->mu);
    if (!same) pool->tokens = kMaxTokens;
    std::vector<std::shared_ptr<ShardReplica>> replicas;
    std::map<std::string, std::deque<double>> latencies;
    for (const auto& [name, address, capacity] : shards[i]) {
      std::shared_ptr<ShardReplica> kept;
      if (same && table_)  // carried over: its in-flight count and channel (a gone one comes back)
        for (const auto& r : table_->pools[i]->replicas)
          if (r->name == name && r->address == address) kept = r;
      if (!kept) {
        kept = std::make_shared<ShardReplica>();
        kept->name = name;
        kept->address = address;
        kept->stub = StubTo(address);
      }
      kept->capacity = capacity;
      replicas.push_back(std::move(kept));
      auto it = pool->latencies.find(name);
      latencies[name] = it == pool->latencies.end() ? std::deque<double>() : std::move(it->second);
    }
    pool->replicas = std::move(replicas);
    pool->latencies = std::move(latencies);
    pool->cached = false;
    next->pools.push_back(std::move(pool));
  }
  table_ = std::move(next);
}

std::shared_ptr<const RouterTable> ShardRouter::table() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_;
}

std::vector<int64_t> ShardRouter::Owners(const std::vector<int64_t>& keys) const {
  auto t = table();
  if (!t) throw std::invalid_argument("no table yet");
  std::vector<int64_t> owners;
  owners.reserve(keys.size());
  for (const int64_t key : keys) owners.push_back(static_cast<int64_t>(t->Owner(key)));
  return owners;
}

grpc::ServerGenericBidiReactor* ShardRouter::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new RouterCall(this, ctx);
}

}  // namespace servefleet::direct
