#include "inference_service.h"

#include <cstring>
#include <limits>
#include <vector>

namespace servefleet::direct {
namespace {

using grpc::Status;
using grpc::StatusCode;

Status Invalid(const std::string& message) { return Status(StatusCode::INVALID_ARGUMENT, message); }

// Counts every RPC and its latency, whatever path it returns by.
class Timed {
 public:
  explicit Timed(Stats* stats) : stats_(stats), start_(std::chrono::steady_clock::now()) { stats_->Begin(); }
  Status operator()(Status status) {
    stats_->Record(status.ok(), std::chrono::steady_clock::now() - start_);
    return status;
  }

 private:
  Stats* stats_;
  std::chrono::steady_clock::time_point start_;
};

std::string ShapeString(const google::protobuf::RepeatedField<int64_t>& shape) {
  std::string out = "[";
  for (int i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace

void Stats::Record(bool ok, std::chrono::steady_clock::duration elapsed) {
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(elapsed).count();
  const size_t bucket = us < 0 ? 0 : std::min<size_t>(static_cast<size_t>(us), kBuckets - 1);
  requests_.fetch_add(1, std::memory_order_relaxed);
  in_flight_.fetch_sub(1, std::memory_order_relaxed);
  if (!ok) errors_.fetch_add(1, std::memory_order_relaxed);
  total_us_.fetch_add(static_cast<uint64_t>(us < 0 ? 0 : us), std::memory_order_relaxed);
  histogram_[bucket].fetch_add(1, std::memory_order_relaxed);
}

std::vector<uint64_t> Stats::LatencyBuckets(const std::vector<uint64_t>& bounds_us, uint64_t* sum_us) const {
  std::vector<uint64_t> out(bounds_us.size() + 1, 0);
  uint64_t seen = 0;
  size_t next = 0;
  for (size_t i = 0; i < kBuckets; ++i) {
    while (next < bounds_us.size() && bounds_us[next] <= i) out[next++] = seen;  // bucket i holds [i, i+1) us
    seen += histogram_[i].load(std::memory_order_relaxed);
  }
  while (next < bounds_us.size()) out[next++] = seen;
  out.back() = seen;
  *sum_us = total_us_.load(std::memory_order_relaxed);
  return out;
}

StatsSnapshot Stats::Snapshot() const {
  StatsSnapshot s;
  s.requests = requests_.load(std::memory_order_relaxed);
  s.errors = errors_.load(std::memory_order_relaxed);
  s.infer_requests = infer_requests_.load(std::memory_order_relaxed);
  s.rows = rows_.load(std::memory_order_relaxed);
  s.in_flight = in_flight_.load(std::memory_order_relaxed);
  std::vector<uint64_t> counts(kBuckets);
  uint64_t total = 0;
  for (size_t i = 0; i < kBuckets; ++i) total += counts[i] = histogram_[i].load(std::memory_order_relaxed);
  if (total == 0) return s;
  s.mean_latency_us = static_cast<double>(total_us_.load(std::memory_order_relaxed)) / total;
  const auto quantile = [&](double q) {
    const auto rank = static_cast<uint64_t>(q * static_cast<double>(total - 1)) + 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < kBuckets; ++i)
      if ((seen += counts[i]) >= rank) return static_cast<double>(i) + 0.5;
    return static_cast<double>(kBuckets);
  };
  s.p50_latency_us = quantile(0.50);
  s.p99_latency_us = quantile(0.99);
  return s;
}

void InferenceService::SetModel(std::shared_ptr<const CtrModel> model, std::string name, std::string version) {
  // Generations come from one process-wide counter, so a thread's cached (service, generation)
  // can never match a later service that happens to reuse a freed one's address.
  static std::atomic<uint64_t> generations{0};
  auto served = std::make_shared<const Served>(Served{std::move(model), std::move(name), std::move(version)});
  std::lock_guard<std::mutex> lock(mu_);
  served_ = std::move(served);
  generation_.store(generations.fetch_add(1, std::memory_order_relaxed) + 1, std::memory_order_release);
}

const std::shared_ptr<const InferenceService::Served>& InferenceService::Current() const {
  thread_local struct {
    const InferenceService* owner = nullptr;
    uint64_t generation = 0;
    std::shared_ptr<const Served> served;
  } cache;
  const uint64_t generation = generation_.load(std::memory_order_acquire);
  if (cache.owner != this || cache.generation != generation) {
    std::lock_guard<std::mutex> lock(mu_);
    cache.owner = this;
    cache.generation = generation_.load(std::memory_order_relaxed);
    cache.served = served_;
  }
  return cache.served;
}

std::string InferenceService::model_name() const {
  const auto& served = Current();
  return served ? served->name : std::string();
}

Status InferenceService::ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                                    inference::ServerLiveResponse* response) {
  Timed timed(stats_);
  response->set_live(true);
  return timed(Status::OK);
}

Status InferenceService::ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                                     inference::ServerReadyResponse* response) {
  Timed timed(stats_);
  response->set_ready(Current() != nullptr);
  return timed(Status::OK);
}

Status InferenceService::ServerMetadata(grpc::ServerContext*, const inference::ServerMetadataRequest*,
                                        inference::ServerMetadataResponse* response) {
  Timed timed(stats_);
  response->set_name("servefleet-direct");
  response->set_version("1");
  return timed(Status::OK);
}

Status InferenceService::ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest* request,
                                    inference::ModelReadyResponse* response) {
  Timed timed(stats_);
  const auto& served = Current();
  response->set_ready(served && request->name() == served->name &&
                      (request->version().empty() || request->version() == served->version));
  return timed(Status::OK);
}

Status InferenceService::ModelMetadata(grpc::ServerContext*, const inference::ModelMetadataRequest* request,
                                       inference::ModelMetadataResponse* response) {
  Timed timed(stats_);
  const auto& served = Current();
  if (!served || request->name() != served->name)
    return timed(Status(StatusCode::NOT_FOUND, "model '" + request->name() + "' is not served here"));
  response->set_name(served->name);
  response->add_versions(served->version);
  response->set_platform("servefleet_direct_ctr");
  auto* input = response->add_inputs();
  input->set_name(kInputName);
  input->set_datatype("INT64");
  input->add_shape(-1);
  input->add_shape(served->model->num_fields());
  auto* output = response->add_outputs();
  output->set_name(kOutputName);
  output->set_datatype("FP32");
  output->add_shape(-1);
  return timed(Status::OK);
}

Status InferenceService::ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest* request,
                                    inference::ModelInferResponse* response) {
  Timed timed(stats_);
  return timed(Infer(*request, response));
}

Status InferenceService::Infer(const inference::ModelInferRequest& request,
                               inference::ModelInferResponse* response) {
  const auto& served = Current();
  if (!served) return Status(StatusCode::UNAVAILABLE, "no model loaded yet");
  if (request.model_name() != served->name)
    return Status(StatusCode::NOT_FOUND,
                  "model '" + request.model_name() + "' is not served here (serving '" + served->name + "')");
  if (!request.model_version().empty() && request.model_version() != served->version)
    return Status(StatusCode::NOT_FOUND, "model '" + served->name + "' has no version '" +
                                             request.model_version() + "' (serving '" + served->version +
                                             "')");
  const CtrModel& model = *served->model;
  const int64_t fields = model.num_fields();
  if (request.inputs_size() != 1 || request.inputs(0).name() != kInputName)
    return Invalid("expected exactly one input tensor '" + std::string(kInputName) + "', got " +
                   std::to_string(request.inputs_size()) + " input(s)" +
                   (request.inputs_size() > 0 ? " starting with '" + request.inputs(0).name() + "'" : ""));
  for (const auto& wanted : request.outputs())
    if (wanted.name() != kOutputName)
      return Invalid("unknown output '" + wanted.name() + "'; this model has only '" + kOutputName + "'");
  const auto& input = request.inputs(0);
  if (input.datatype() != "INT64")
    return Invalid("input '" + std::string(kInputName) + "' must be INT64, got '" + input.datatype() + "'");
  const auto& shape = input.shape();
  if (shape.size() != 2 || shape[0] < 0 || shape[1] != fields)
    return Invalid("input '" + std::string(kInputName) + "' must have shape [batch, " + std::to_string(fields) +
                   "], got " + ShapeString(shape));
  const int64_t batch = shape[0];
  if (batch > std::numeric_limits<int32_t>::max() / fields)
    return Invalid("batch of " + std::to_string(batch) + " is too large");
  const auto count = static_cast<size_t>(batch * fields);

  // Sizes are checked against what was actually sent before anything is allocated: the shape
  // alone is client-controlled and may claim billions of ids.
  // Per-thread scratch, grown once: the request path allocates nothing of its own.
  thread_local std::vector<int64_t> ids;
  thread_local std::vector<float> scores;
  ids.clear();
  if (request.raw_input_contents_size() > 0) {
    if (request.raw_input_contents_size() != 1)
      return Invalid("1 input but " + std::to_string(request.raw_input_contents_size()) +
                     " raw_input_contents entries");
    const std::string& raw = request.raw_input_contents(0);
    if (raw.size() != count * sizeof(int64_t))
      return Invalid("input '" + std::string(kInputName) + "' has " + std::to_string(raw.size()) +
                     " bytes, expected " + std::to_string(count * sizeof(int64_t)) + " for shape " +
                     ShapeString(shape));
    ids.resize(count);
    if (count > 0) std::memcpy(ids.data(), raw.data(), raw.size());
  } else {
    const auto& values = input.contents().int64_contents();
    if (static_cast<size_t>(values.size()) != count)
      return Invalid("input '" + std::string(kInputName) + "' has " + std::to_string(values.size()) +
                     " int64_contents values, expected " + std::to_string(count));
    ids.assign(values.begin(), values.end());
  }
  const auto rows = static_cast<int64_t>(model.num_rows());
  for (size_t i = 0; i < count; ++i)
    if (ids[i] < 0 || ids[i] >= rows)
      return Invalid("feature id " + std::to_string(ids[i]) + " at example " + std::to_string(i / fields) +
                     ", field " + std::to_string(i % fields) + " is outside [0, " + std::to_string(rows) + ")");

  response->set_model_name(served->name);
  response->set_model_version(served->version);
  response->set_id(request.id());
  auto* output = response->add_outputs();
  output->set_name(kOutputName);
  output->set_datatype("FP32");
  output->add_shape(batch);
  std::string* raw_out = response->add_raw_output_contents();
  raw_out->resize(static_cast<size_t>(batch) * sizeof(float));
  scores.resize(static_cast<size_t>(batch));
  model.Score(ids.data(), static_cast<size_t>(batch), scores.data());
  if (batch > 0) std::memcpy(raw_out->data(), scores.data(), raw_out->size());
  stats_->AddInfer();
  stats_->AddRows(static_cast<uint64_t>(batch));
  return Status::OK;
}

}  // namespace servefleet::direct
